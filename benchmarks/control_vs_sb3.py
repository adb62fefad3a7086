"""policygrad's control algorithms against Stable-Baselines3 (PPO and A2C, default hyper-parameters) on CartPole-v1.

Every run gets the same environment-step budget; for each we record the environment steps and wall time at which the
mean return of the last 10 finished training episodes first reaches 475 (CartPole-v1's "solved" line), the final
value of that mean, and the mean return of 10 deterministic evaluation episodes after training. Wall time counts
training only (from the first environment step), measured the same way for both libraries; both run with one torch
thread, one run at a time, in this process.

    python benchmarks/control_vs_sb3.py                      # 5 seeds, 50,000 steps each (about 10 minutes)
    python benchmarks/control_vs_sb3.py --seeds 2 --steps 20000 --algos ppo sb3-ppo

Needs gymnasium and stable-baselines3 (only this script uses the latter).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import deque
from pathlib import Path

import torch

from policygrad.control.config import ControlConfig
from policygrad.control.train import RECENT_EPISODES, train

THRESHOLD = 475.0
POLICYGRAD = ("reinforce", "a2c", "ppo", "npg")
SB3 = ("sb3-ppo", "sb3-a2c")


def run_policygrad(algo: str, seed: int, steps: int) -> dict:
    """One policygrad run with the algorithm's tuned defaults (config.ALGO_DEFAULTS)."""
    hit: dict = {}
    curve: list[tuple[int, float, float]] = []

    def watch(record: dict) -> None:
        if record["return_recent"] is None:
            return
        curve.append((record["env_steps"], record["time"], record["return_recent"]))
        if not hit and record["return_recent"] >= THRESHOLD:
            hit.update(steps=record["env_steps"], time=record["time"])

    cfg = ControlConfig(env="CartPole-v1", algo=algo, total_steps=steps, seed=seed, progress=False, eval_episodes=10)
    result = train(cfg, on_step=watch)
    return {
        "steps_to_solve": hit.get("steps"),
        "time_to_solve": hit.get("time"),
        "final_recent": curve[-1][2],
        "eval_return": statistics.fmean(result.eval_returns),
        "total_time": result.records[-1]["time"],
        "curve": curve,
    }


def run_sb3(algo: str, seed: int, steps: int) -> dict:
    """One Stable-Baselines3 run with its default hyper-parameters (PPO: 1 env, 2048 steps per update; A2C: 1 env,
    5 steps per update), watching the same 10-episode training mean through the Monitor's episode records."""
    from stable_baselines3 import A2C, PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.evaluation import evaluate_policy

    class Watch(BaseCallback):
        def _on_training_start(self) -> None:
            self.start, self.recent, self.hit, self.curve = time.perf_counter(), deque(maxlen=RECENT_EPISODES), {}, []

        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    self.recent.append(float(info["episode"]["r"]))
                    mean, now = statistics.fmean(self.recent), time.perf_counter() - self.start
                    self.curve.append((self.num_timesteps, now, mean))
                    if not self.hit and mean >= THRESHOLD:
                        self.hit = {"steps": self.num_timesteps, "time": now}
            return True

    model = {"sb3-ppo": PPO, "sb3-a2c": A2C}[algo]("MlpPolicy", "CartPole-v1", seed=seed, device="cpu", verbose=0)
    watch = Watch()
    model.learn(total_timesteps=steps, callback=watch)
    total = time.perf_counter() - watch.start
    eval_returns, _ = evaluate_policy(
        model, model.get_env(), n_eval_episodes=10, deterministic=True, return_episode_rewards=True
    )
    return {
        "steps_to_solve": watch.hit.get("steps"),
        "time_to_solve": watch.hit.get("time"),
        "final_recent": watch.curve[-1][2],
        "eval_return": statistics.fmean(eval_returns),
        "total_time": total,
        "curve": watch.curve,
    }


def _median(values: list) -> float | None:
    """Median over seeds, counting a seed that never solved as infinitely slow; None if half or more never did."""
    ordered = sorted(float("inf") if v is None else v for v in values)
    middle = statistics.median(ordered)
    return None if middle == float("inf") else middle


def table(results: dict[str, list[dict]]) -> str:
    """Markdown table of the medians over seeds, with wall-time ratios against SB3's PPO and A2C."""
    medians = {
        algo: (_median([r["steps_to_solve"] for r in runs]), _median([r["time_to_solve"] for r in runs]))
        for algo, runs in results.items()
    }

    def ratio(algo: str, ref: str) -> str:
        if ref not in medians or medians[algo][1] is None or medians[ref][1] is None:
            return "-"
        return f"{medians[algo][1] / medians[ref][1]:.2f}"

    lines = [
        "| algorithm | solved seeds | median steps to 475 | median wall s to 475 | final mean return (last 10) | "
        "eval return | total wall s | time / SB3 PPO | time / SB3 A2C |",
        "|" + "---|" * 9,
    ]
    for algo, runs in results.items():
        steps, secs = medians[algo]
        solved = sum(r["steps_to_solve"] is not None for r in runs)
        lines.append(
            f"| {algo} | {solved}/{len(runs)} | {'-' if steps is None else f'{steps:,.0f}'} | "
            f"{'-' if secs is None else f'{secs:.1f}'} | {statistics.fmean(r['final_recent'] for r in runs):.1f} | "
            f"{statistics.fmean(r['eval_return'] for r in runs):.1f} | {statistics.fmean(r['total_time'] for r in runs):.1f} | "
            f"{ratio(algo, 'sb3-ppo')} | {ratio(algo, 'sb3-a2c')} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], path: Path) -> None:
    """The 10-episode mean against environment steps and wall time: the median over seeds as a thick line per
    algorithm (each seed's curve held at its last value after it ends), every seed as a thin one."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for column, ax in enumerate(axes):
        end = max(run["curve"][-1][column] for runs in results.values() for run in runs)
        grid = np.linspace(0, end, 300)
        for i, (algo, runs) in enumerate(results.items()):
            seeds = []
            for run in runs:
                x, means = [c[column] for c in run["curve"]], [c[2] for c in run["curve"]]
                ax.plot(x, means, color=f"C{i}", alpha=0.15, lw=0.8)
                seeds.append(np.interp(grid, x, means, left=np.nan))
            ax.plot(grid, np.nanmedian(np.array(seeds), axis=0), color=f"C{i}", lw=2, label=algo)
        ax.axhline(THRESHOLD, color="grey", ls="--", lw=0.8)
        ax.set_xlabel(("environment steps", "wall time (s)")[column])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"mean return of last {RECENT_EPISODES} training episodes")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle("CartPole-v1: policygrad vs Stable-Baselines3 (thick: median over seeds; thin: each seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50_000, help="environment steps per run, the same for every run")
    parser.add_argument("--algos", nargs="+", default=[*POLICYGRAD, *SB3], choices=[*POLICYGRAD, *SB3])
    parser.add_argument("--json", type=Path, help="write every run's numbers and curves here")
    parser.add_argument("--plot", type=Path, help="write the curves of every run here (PNG)")
    parser.add_argument("--from-json", type=Path, help="run nothing: print the table and plot of an earlier --json")
    args = parser.parse_args()

    torch.set_num_threads(1)  # both libraries: one thread is fastest for 64x64 networks, and the comparison is fair
    results: dict[str, list[dict]] = {algo: [] for algo in args.algos}
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        args.seeds = len(next(iter(results.values())))
    for seed in range(0 if args.from_json else args.seeds):  # seeds outermost: drifts in machine load hit all alike
        for algo in args.algos:
            run = (run_sb3 if algo in SB3 else run_policygrad)(algo, seed, args.steps)
            results[algo].append(run)
            print(
                f"seed {seed} {algo:9s} steps to 475: {run['steps_to_solve']}  time to 475: "
                f"{'-' if run['time_to_solve'] is None else round(run['time_to_solve'], 1)} s  "
                f"final: {run['final_recent']:.1f}  eval: {run['eval_return']:.1f}  total: {run['total_time']:.1f} s",
                flush=True,
            )
    print()
    print(
        f"CartPole-v1, {args.seeds} seeds, {args.steps:,} environment steps per run (unless --from-json), medians over seeds:"
    )
    print(table(results))
    if args.json and not args.from_json:
        args.json.write_text(json.dumps(results))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
