"""The language-model arms of the studies (docs/studies.md): study 1 (entropy bonus, dynamic against constant against
none) and study 2 (KL to the pre-trained policy against plain GRPO), from the runs of one sweep folder.

    python benchmarks/lm_studies.py runs/studies/lm --json benchmarks/results/lm_studies.json
    python benchmarks/lm_studies.py runs/studies/lm --only 'kl_coef=0.1' --analyse-only    # split over processes

The runs come from ``policygrad sweep recipes/studies/lm.yaml ...`` (the commands are in docs/studies.md). For the
pre-trained model and for each run's final policy this script measures, with the library's functions:

- the greedy reward of every held-out prompt (``policygrad.lm.evaluate.evaluate_heldout``, the run's own task and
  evaluation settings: the first ``eval_size`` held-out prompts; read from the run's eval.json when it holds them);
- KL(policy || pre-trained) on the first ``--kl-prompts`` held-out prompts, ``--kl-samples`` completions each at
  temperature 1 (``policygrad.lm.retention.sequence_kl``);
- the greedy answers to the 30 factual questions of ``policygrad.lm.retention.FACTS``.

Each run's measurements go to ``<run>/retention.json`` (``pretrained.json`` in the sweep folder for the pre-trained
model), so a rerun skips what is done and two processes on disjoint ``--only`` arms split the work. Then, per arm,
over seeds (mean and 95% Student-t half-width, ``policygrad.compare.mean_interval``), from metrics.jsonl: the training
reward of the last 10 steps, the batch reward variance, the entropy, the realised entropy weight and KL weight (means
over steps), the first step whose 5-step mean training reward reaches ``--threshold``; and the measurements above.
Study 2's falsifier counts: for each KL arm and each seed s, the held-out prompts on which its policy's reward is
lower than the GRPO arm's policy of the same seed (and higher, and tied).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from policygrad.compare import find_runs, group_runs, mean_interval, read_series

PRETRAINED = "pretrained.json"
RETENTION = "retention.json"


def measure(model: str, config_path: Path, kl_prompts: int, kl_samples: int, reference: Any = None) -> dict[str, Any]:
    """Held-out rewards, KL to the pre-trained model and the factual answers of ``model`` (a checkpoint folder, or
    "default"), on the task of the run config at ``config_path``."""
    from policygrad.lm.config import EvalConfig, load_config
    from policygrad.lm.data import prompts_for
    from policygrad.lm.device import use_threads
    from policygrad.lm.evaluate import evaluate_heldout
    from policygrad.lm.models import load_model
    from policygrad.lm.retention import factual_answers, sequence_kl

    config = load_config(config_path)
    use_threads(config)
    started = time.perf_counter()
    final = Path(model).parent / "eval.json"  # the run's own end-of-run evaluation, when it kept every reward
    heldout = json.loads(final.read_text()) if final.is_file() else {}
    if "rewards" not in heldout.get("greedy", {}):
        heldout = evaluate_heldout(EvalConfig.of(config, model=model, progress=False))
    greedy = heldout["greedy"]
    policy, tokenizer = load_model(model)
    reference, _ = reference or load_model(config.model)
    prompts = [r["prompt"] for r in prompts_for(config, tokenizer).heldout[:kl_prompts]]
    kl = sequence_kl(policy, reference, tokenizer, prompts, samples=kl_samples, max_new_tokens=config.max_new_tokens)
    facts = factual_answers(policy, tokenizer)
    return {
        "model": model,
        "rewards": greedy["rewards"],
        "mean_reward": greedy["mean_reward"],
        "pass_rate": greedy["pass_rate"],
        "digits_rate": greedy["digits_rate"],
        "mean_length": greedy["mean_length"],
        "kl_per_prompt": kl.tolist(),
        "kl": float(kl.mean()),
        "facts": facts,
        "facts_correct": sum(f["correct"] for f in facts),
        "seconds": time.perf_counter() - started,
    }


def training_summary(folder: Path, threshold: float) -> dict[str, float]:
    """Means over the run's steps of what metrics.jsonl logs, and the step where the 5-step mean training reward
    first reaches ``threshold`` (inf: never)."""
    from policygrad.lm.plot import read_metrics

    steps = [r for r in read_metrics(folder / "metrics.jsonl") if "reward_mean" in r]
    rewards = [r["reward_mean"] for r in steps]
    reached = next(
        (i + 5 for i in range(len(rewards) - 4) if statistics.fmean(rewards[i : i + 5]) >= threshold), math.inf
    )

    def mean(key: str) -> float:
        values = [r[key] for r in steps if key in r]
        return statistics.fmean(values) if values else math.nan

    return {
        "final_train_reward": statistics.fmean(rewards[-10:]),
        "reward_variance": statistics.fmean(r["reward_std"] ** 2 for r in steps),
        "entropy": mean("entropy"),
        "entropy_weight": mean("entropy_weight"),
        "kl_weight": mean("kl_weight"),
        "kl_train": mean("kl"),
        "steps_to_threshold": float(reached),
        "step_time": mean("step_time"),
    }


def falsifiers(kl_run: dict[str, Any], grpo_run: dict[str, Any]) -> dict[str, int]:
    """Held-out prompts where the KL-constrained policy's greedy reward is lower than GRPO's, higher, tied."""
    pairs = [(a, b) for a, b in zip(kl_run["rewards"], grpo_run["rewards"]) if not (math.isnan(a) or math.isnan(b))]
    return {
        "lower": sum(a < b for a, b in pairs),
        "higher": sum(a > b for a, b in pairs),
        "tied": sum(a == b for a, b in pairs),
    }


def _interval(values: list[float]) -> list[float]:
    return list(mean_interval(values))


def _cell(pair: list[float], digits: int = 3) -> str:
    mean, half = pair
    if not math.isfinite(mean):
        return "n/a" if math.isnan(mean) else "never"
    return f"{mean:.{digits}f}" + (f" +- {half:.{digits}f}" if math.isfinite(half) else "")


def markdown(table: dict[str, Any]) -> str:
    """The tables of docs/studies.md: one row per arm, then study 2's falsifier counts."""
    pre = table["pretrained"]
    columns = [
        ("train reward, last 10 steps", "final_train_reward", 3),
        (f"steps to a 5-step train reward of {table['threshold']} (seeds that got there)", "steps_to_threshold", 1),
        ("reward variance", "reward_variance", 4),
        ("entropy (nats/token)", "entropy", 2),
        ("entropy weight", "entropy_weight", 4),
        ("KL weight", "kl_weight", 3),
        ("held-out reward", "heldout_mean_reward", 3),
        ("held-out pass rate", "heldout_pass_rate", 2),
        ("KL to pre-trained (nats)", "heldout_kl", 2),
        ("facts right (of 30)", "heldout_facts_correct", 1),
    ]
    lines = [
        "| arm | seeds | " + " | ".join(title for title, _, _ in columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
        f"| pre-trained | - | - | - | - | - | - | - | {pre['mean_reward']:.3f} | {pre['pass_rate']:.2f} | 0 | "
        f"{pre['facts_correct']} |",
    ]
    for name, row in table["arms"].items():
        cells = [_cell(row[key], digits) for _, key, digits in columns]
        cells[1] += f" ({round(row['reached_threshold'] * len(row['seeds']))} of {len(row['seeds'])})"
        lines.append(f"| {name} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| KL arm, against GRPO of the same seed | prompts lower (falsifiers) | higher | tied | per seed (lower/higher/tied) |",
        "|---|---:|---:|---:|---|",
    ]
    for name, counts in table["falsifiers"].items():
        seeds = ", ".join(f"{seed}: {c['lower']}/{c['higher']}/{c['tied']}" for seed, c in counts["per_seed"].items())
        lines.append(
            f"| {name} | {_cell(counts['lower'], 1)} | {_cell(counts['higher'], 1)} | {_cell(counts['tied'], 1)} | {seeds} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="the sweep folder (policygrad sweep --output-dir)")
    parser.add_argument("--only", nargs="*", default=None, help="measure only these arms (folder names; pretrained)")
    parser.add_argument("--grpo-arm", default="kl_coef=0", help="the arm without KL or entropy terms")
    parser.add_argument("--kl-prompts", type=int, default=20)
    parser.add_argument("--kl-samples", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=0.4, help="training reward (5-step mean) to reach")
    parser.add_argument("--analyse-only", action="store_true", help="measure, then stop without the tables")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    series = [read_series(folder) for folder in find_runs([args.sweep])]
    arms = group_runs([s for s in series if (s.folder / "final").is_dir()])
    from policygrad.lm.models import load_model

    first_config = next(iter(arms.values()))[0].folder / "config.yaml"
    base_model = yaml.safe_load(first_config.read_text())["model"]
    reference = None
    pretrained_file = args.sweep / PRETRAINED
    if not pretrained_file.exists() and (args.only is None or "pretrained" in args.only):
        reference = load_model(base_model)
        pretrained_file.write_text(
            json.dumps(measure(base_model, first_config, args.kl_prompts, args.kl_samples, reference))
        )
        print(f"measured the pre-trained model ({base_model})", file=sys.stderr)
    for name, runs in arms.items():
        if args.only is not None and name not in args.only:
            continue
        for run in runs:
            out = run.folder / RETENTION
            if out.exists():
                continue
            reference = reference or load_model(base_model)
            result = measure(
                str(run.folder / "final"), run.folder / "config.yaml", args.kl_prompts, args.kl_samples, reference
            )
            out.write_text(json.dumps(result))
            print(f"measured {run.folder} in {result['seconds']:.0f} s", file=sys.stderr)
    if args.analyse_only:
        return 0

    pretrained = json.loads(pretrained_file.read_text())
    measured = {
        name: {run.folder.name: json.loads((run.folder / RETENTION).read_text()) for run in runs}
        for name, runs in arms.items()
    }
    table: dict[str, Any] = {
        "pretrained": {key: pretrained[key] for key in ("mean_reward", "pass_rate", "kl", "facts_correct")},
        "threshold": args.threshold,
        "arms": {},
        "falsifiers": {},
    }
    for name, runs in arms.items():
        train = [training_summary(run.folder, args.threshold) for run in runs]
        after = list(measured[name].values())
        row = {key: _interval([t[key] for t in train]) for key in train[0]}
        row["reached_threshold"] = sum(math.isfinite(t["steps_to_threshold"]) for t in train) / len(train)
        for key in ("mean_reward", "pass_rate", "kl", "facts_correct"):
            row[f"heldout_{key}"] = _interval([m[key] for m in after])
        row["seeds"] = sorted(measured[name])
        table["arms"][name] = row
    grpo = measured.get(args.grpo_arm, {})
    for name in arms:
        if name == args.grpo_arm or not name.startswith("kl_"):
            continue
        counts = {seed: falsifiers(run, grpo[seed]) for seed, run in measured[name].items() if seed in grpo}
        table["falsifiers"][name] = {
            "per_seed": counts,
            **{key: _interval([c[key] for c in counts.values()]) for key in ("lower", "higher", "tied")},
        }
    text = json.dumps(table, indent=2, default=str)
    print(markdown(table))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
