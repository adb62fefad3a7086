"""The seed's entropy-scaling hypothesis on a sparse-reward control task (issue 19, study 1): A2C on FrozenLake with an
entropy bonus weighted by the inverse variance of the batch's episode returns (``--entropy-weight dynamic``) against
a constant bonus of the same mean weight, and against none.

FrozenLake-v1 (Gymnasium's 4x4 slippery lake): an episode pays 1 when it reaches the goal and 0 otherwise, so the
return of an episode is its only reward and most early batches hold no success at all (their return variance is 0,
their advantages nearly so). The observation, a Discrete state, reaches the networks one-hot
(``policygrad.control.envs.make_env``). Each run is ``policygrad.control.train.train`` as ``policygrad control`` runs
it, with the algorithm's defaults (A2C: 4 environments x 64 steps per update, lr 1e-2 annealed, GAE lambda 0.95);
the dynamic weight is ``w = clip(c / (Var(R) + eps), 0, w_max)`` over the returns R of the episodes that ended in
the batch (``policygrad.regularizers.DynamicEntropyWeight``).

The constant arm is matched to the dynamic one: its weight is the dynamic arm's mean realised weight (over all its
seeds and steps), so the two differ in *when* they spend the bonus, not how much. Reported per arm, over seeds (95%
Student-t intervals): the environment steps until the success rate of the last 100 training episodes first reaches
the threshold (a run that never does is counted at the budget), the fraction of seeds that reached it, the success
rate of the deterministic policy at the end (``--eval-episodes`` episodes), the batch return variance and the policy
entropy (means over steps), and the entropy over the last tenth of training.

    python benchmarks/entropy_control.py --json benchmarks/results/entropy_control.json --plot docs/study1_control.png
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import time
from pathlib import Path

from entropy_ablation import summary_row

from policygrad.compare import mean_interval
from policygrad.control.config import ControlConfig
from policygrad.control.train import train

WINDOW = 100  # training episodes in the success-rate window


def one_run(job: tuple[str, float, int, argparse.Namespace]) -> dict:
    """One seed of one arm: its per-step curves and summary numbers."""
    weight, coef, seed, args = job
    cfg = ControlConfig(
        env=args.env,
        algo=args.algo,
        total_steps=args.total_steps,
        entropy_weight=weight,
        entropy_coef=coef,
        entropy_max_weight=args.max_weight,
        entropy_eps=args.eps,
        seed=seed,
        eval_episodes=args.eval_episodes,
        progress=False,
        threads=1,
    )
    result = train(cfg)
    episodes: list[float] = []
    success, entropy, variance, weights, reached = [], [], [], [], math.inf
    for record in result.records:
        returns = record["episode_returns"]
        episodes.extend(returns)
        window = episodes[-WINDOW:]
        rate = statistics.fmean(window) if window else 0.0
        success.append(rate)
        if len(window) == WINDOW and rate >= args.threshold and math.isinf(reached):
            reached = record["env_steps"]
        entropy.append(record["entropy"])
        variance.append(statistics.variance(returns) if len(returns) > 1 else 0.0)
        weights.append(record["entropy_weight"])
    tail = entropy[-max(1, len(entropy) // 10) :]
    return {
        "seed": seed,
        "env_steps": [r["env_steps"] for r in result.records],
        "success": success,
        "entropy_curve": entropy,
        "steps": reached,
        "final_success": statistics.fmean(result.eval_returns),
        "return_var": statistics.fmean(variance),
        "entropy": statistics.fmean(entropy),
        "final_entropy": statistics.fmean(tail),
        "weight": statistics.fmean(weights),
    }


def arm(name: str, weight: str, coef: float, args: argparse.Namespace, pool) -> dict:
    started = time.perf_counter()
    results = pool.map(one_run, [(weight, coef, seed, args) for seed in range(args.seeds)])
    keys = ("final_success", "return_var", "entropy", "final_entropy", "weight")
    row = summary_row(name, weight, coef, results, keys, results[0]["env_steps"][-1], started)
    row["curves"] = {
        "env_steps": results[0]["env_steps"],
        "success": [r["success"] for r in results],
        "entropy": [r["entropy_curve"] for r in results],
    }
    print(f"{name}: {len(results)} seeds in {row['seconds']:.0f} s", flush=True)
    return row


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        x = row["curves"]["env_steps"]
        for ax, key in zip(axes, ("success", "entropy")):
            columns = list(zip(*row["curves"][key]))
            bands = [mean_interval(column) for column in columns]
            mean = [m for m, _ in bands]
            (line,) = ax.plot(x, mean, label=row["arm"])
            ax.fill_between(x, [m - h for m, h in bands], [m + h for m, h in bands], color=line.get_color(), alpha=0.2)
    axes[0].set_ylabel(f"success rate, last {WINDOW} training episodes")
    axes[1].set_ylabel("policy entropy (nats)")
    for ax in axes:
        ax.set_xlabel("environment steps")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="FrozenLake-v1")
    parser.add_argument("--algo", default="a2c")
    parser.add_argument("--total-steps", type=int, default=50_000)
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--coefs", type=float, nargs="+", default=[1e-4, 1e-3], help="c of c / (Var(R) + eps)")
    parser.add_argument("--eps", type=float, default=0.01)
    parser.add_argument("--max-weight", type=float, default=1.0)
    parser.add_argument("--threshold", type=float, default=0.5, help="success rate of the last 100 episodes")
    parser.add_argument("--eval-episodes", type=int, default=200)
    parser.add_argument("--processes", type=int, default=2, help="runs side by side, one thread each")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    with multiprocessing.get_context("fork").Pool(args.processes) as pool:
        rows = [arm("none", "constant", 0.0, args, pool)]
        for coef in args.coefs:
            rows.append(arm(f"dynamic, c = {coef:g}", "dynamic", coef, args, pool))
            matched = rows[-1]["weight"][0]  # the dynamic arm's mean realised weight
            rows.append(arm(f"constant, matched to c = {coef:g}", "constant", matched, args, pool))
    print(
        f"{args.env}, {args.algo}, {args.total_steps} environment steps, {args.seeds} seeds per arm; threshold: "
        f"success rate >= {args.threshold} over the last {WINDOW} training episodes"
    )
    print(
        "| arm | mean weight | seeds reaching the threshold | median steps (those that did) | steps (unreached: the "
        "budget) | success at the end | return variance | entropy (nats) | entropy, last tenth |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")

    def cell(pair, digits=3):
        return f"{pair[0]:.{digits}f} +- {pair[1]:.{digits}f}"

    for row in rows:
        print(
            f"| {row['arm']} | {row['weight'][0]:.2g} | {row['reached']:.2f} | {row['median_steps_reached']} | "
            f"{cell(row['steps_capped'], 0)} | {cell(row['final_success'])} | {cell(row['return_var'], 4)} | "
            f"{cell(row['entropy'])} | {cell(row['final_entropy'])} |"
        )
    if args.plot is not None:
        plot(rows, args.plot, f"{args.env}, {args.algo}: mean and 95% interval over {args.seeds} seeds per arm")
    if args.json is not None:
        settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
        summary = [{key: value for key, value in row.items() if key != "curves"} for row in rows]
        args.json.write_text(json.dumps({"settings": settings, "arms": summary}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
