"""The tables that open docs/results.md, from the flagship's run folders.

For each run: the training minutes at every step (the sum of the steps' own ``step_time``; the periodic evaluations
are not counted), and its best held-out strict pass rate among the evaluations within ``--minutes`` of training (ties:
the higher held-out mean reward, then the earliest). Then, for the best of those (or ``--detail RUN``), the pass rate of each digit-sum target S as the run
logged it and, with ``--replies``, the checkpoint of that step evaluated again (the run's own settings: same prompts,
batches, threads and precision, so the same numbers) with one greedy reply per target and its verdict.

    python benchmarks/flagship_results.py runs/dyn-seed0 runs/dyn-seed1 runs/dyn-seed2
    python benchmarks/flagship_results.py runs/dyn-seed* --replies --checkpoints runs/keep
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def curve(run: Path) -> list[dict]:
    """The run's held-out evaluations in order, each with its step and the training minutes spent before it."""
    minutes, points = 0.0, []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        minutes += row.get("step_time", 0.0) / 60
        if "eval/greedy/pass_rate" in row:
            points.append({**row, "minutes": minutes})
    return points


def best(points: list[dict], budget: float) -> dict:
    within = [p for p in points if p["minutes"] <= budget + 1e-9]
    return max(within, key=_rank)


def dynamics(run: Path) -> str:
    """One row on exploration: the entropy, when it collapsed, and how often groups had no reward spread."""
    steps = [row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in row]
    collapsed = next((row["step"] for row in steps if row["entropy"] < 0.01), None)
    first = [row.get("dynamic/first_zero_spread", row["zero_spread_groups"]) for row in steps]
    extra = sum(row.get("dynamic/extra_groups", 0.0) for row in steps)
    trained = sum(row["zero_spread_groups"] for row in steps) / len(steps)
    return (
        f"| {run} | {len(steps)} | {steps[-1]['entropy']:.3f} | {collapsed or 'none'} | "
        f"{sum(first) / len(steps):.2f} | {trained:.2f} | {extra:.0f} |"
    )


def _rank(point: dict) -> tuple:
    """Best first: the strict pass rate, then (between equal pass rates) the held-out mean reward, then earliest."""
    return (point["eval/greedy/pass_rate"], point["eval/greedy/mean_reward"], -point["step"])


def targets(point: dict) -> list[tuple[int, dict]]:
    parts: dict[int, dict] = {}
    for key, value in point.items():
        if key.startswith("eval/greedy/S="):
            target, metric = key[len("eval/greedy/S=") :].split("/")
            parts.setdefault(int(target), {})[metric] = value
    return sorted(parts.items())


def seed_of(run: Path) -> int:
    return int(yaml.safe_load((run / "config.yaml").read_text())["seed"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--minutes", type=float, default=60.0, help="training budget per run")
    parser.add_argument("--detail", type=Path, help="the run of the per-target table (default: the best)")
    parser.add_argument("--replies", action="store_true", help="evaluate the checkpoint again and show replies")
    parser.add_argument("--checkpoints", type=Path, help="a folder holding <run name>/step-N copies of checkpoints")
    args = parser.parse_args()

    bests = {run: best(curve(run), args.minutes) for run in args.runs}
    print(f"| seed | best held-out pass rate | step | training minutes |  (within {args.minutes:g} training minutes)")
    print("|---:|---:|---:|---:|")
    for run, point in bests.items():
        print(f"| {seed_of(run)} | {point['eval/greedy/pass_rate']:.2f} | {point['step']} | {point['minutes']:.1f} |")
    print()
    print(
        "| run | step | training minutes | pass rate | S < 10 passes | S >= 10 passes | length rule | digit-sum rule |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for run in args.runs:
        for point in curve(run):
            low = sum(round(v["prompts"] * v["pass_rate"]) for s, v in targets(point) if s < 10)
            high = sum(round(v["prompts"] * v["pass_rate"]) for s, v in targets(point) if s >= 10)
            print(
                f"| {run} | {point['step']} | {point['minutes']:.1f} | {point['eval/greedy/pass_rate']:.2f} | "
                f"{low} | {high} | {point['eval/greedy/length_rate']:.2f} | {point['eval/greedy/digits_rate']:.2f} |"
            )
    print()
    print(
        "| run | steps | entropy at the last step | first step with entropy < 0.01 | groups without spread "
        "(first draw) | groups without spread (trained) | extra groups sampled |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for run in args.runs:
        print(dynamics(run))
    detail = args.detail or max(bests, key=lambda r: _rank(bests[r]))
    point = bests[detail]
    print(f"\nper target S: {detail} at step {point['step']} ({point['minutes']:.1f} training minutes)\n")
    print("| S | prompts | pass rate | length rule | digit-sum rule |")
    print("|---:|---:|---:|---:|---:|")
    for target, values in targets(point):
        print(
            f"| {target} | {values['prompts']} | {values['pass_rate']:.2f} | {values['length_rate']:.2f} | "
            f"{values['digits_rate']:.2f} |"
        )
    if args.replies:
        replies(detail, point, args.checkpoints)


def replies(run: Path, point: dict, checkpoints: Path | None) -> None:
    """Evaluate the checkpoint of ``point`` again and print one reply per target."""
    import policygrad.lm.evaluate as evaluate
    from policygrad.lm.config import load_config
    from policygrad.lm.tasks import check

    folder = (checkpoints / run.name if checkpoints else run / "checkpoints") / f"step-{point['step']:06d}"
    if not folder.exists() and point["step"] == curve(run)[-1]["step"]:
        folder = run / "final"  # the run's last step
    config = load_config(run / "config.yaml", {"model": str(folder), "eval_decoding": ["greedy"]})
    evaluate.EXAMPLES = config.eval_size  # keep every reply
    result = evaluate.evaluate_heldout(config)["greedy"]
    print(
        f"\n{folder} evaluated again: pass rate {result['pass_rate']:.2f} (logged: {point['eval/greedy/pass_rate']:.2f})\n"
    )
    print("| S | reply (greedy) | characters | digit sum | passes |")
    print("|---:|---|---:|---:|---|")
    from transformers import AutoTokenizer

    from policygrad.lm.data import prompts_for

    records = prompts_for(config, AutoTokenizer.from_pretrained(str(folder))).heldout[: config.eval_size]
    seen: set[int] = set()
    for record, example in zip(records, result["examples"]):
        target = record["target_digit_sum"]
        if target in seen:
            continue
        seen.add(target)
        verdict = check(example["completion"], record["target_length"], target)
        text = example["completion"].strip().replace("|", "\\|").replace("\n", "\\n")
        print(f"| {target} | `{text}` | {verdict.length} | {verdict.digit_sum} | {'yes' if verdict.passed else 'no'} |")


if __name__ == "__main__":
    main()
