"""``policygrad bandit``: the live view, ``--json`` for scripts and ``--plot`` for the figure."""

from __future__ import annotations

import json
import sys

import torch

from policygrad.bandit.config import BanditConfig
from policygrad.bandit.core import BanditRun, run_bandit
from policygrad.errors import UsageError


def _run(config: BanditConfig, baseline: str, seeds: int, on_step=None) -> BanditRun:
    means = torch.tensor(config.means, dtype=torch.float64)
    return run_bandit(
        means,
        noise=config.noise,
        baseline=baseline,
        samples=config.samples,
        lr=config.lr,
        steps=config.steps,
        seed=config.seed,
        seeds=seeds,
        entropy_coef=config.entropy_coef,
        baseline_decay=config.baseline_decay,
        epochs=config.epochs,
        clip_eps=config.clip_eps,
        on_step=on_step,
    )


def to_json(config: BanditConfig, run: BanditRun) -> dict:
    """The first seed's run as plain lists: per step the probabilities before the update, J, the estimate and the
    exact gradient pi_k (mu_k - J) at those probabilities; then ``final_probs`` after the last update."""
    steps = [
        {
            "step": t,
            "probs": run.probs[t, 0].tolist(),
            "expected_reward": run.expected_reward[t, 0].item(),
            "gradient_estimate": run.gradient_estimates[t, 0].tolist(),
            "exact_gradient": run.exact_gradients[t, 0].tolist(),
        }
        for t in range(config.steps)
    ]
    return {
        "config": {k: (str(v) if k == "plot" and v is not None else v) for k, v in vars(config).items()},
        "steps": steps,
        "final_probs": run.probs[-1, 0].tolist(),
        "final_expected_reward": run.expected_reward[-1, 0].item(),
    }


def main(config: BanditConfig) -> int:
    try:
        return _main(config)
    except FloatingPointError as err:
        raise UsageError("--lr", f"{err}; lower --lr or the size of the rewards (--means, --noise)") from None


def _main(config: BanditConfig) -> int:
    title = f"REINFORCE, baseline {config.baseline}, N={config.samples}, lr={config.lr}"
    if config.json:
        json.dump(to_json(config, _run(config, config.baseline, seeds=1)), sys.stdout)
        sys.stdout.write("\n")
    else:
        from policygrad.bandit.view import LiveView

        with LiveView(config.means, config.steps, title, config.delay) as view:
            run = _run(
                config, config.baseline, seeds=1, on_step=lambda step, probs: view.update(step, probs[0].tolist())
            )
            view.finish(run.probs[-1, 0].tolist())
    if config.plot is not None:
        from policygrad.bandit.plot import plot_comparison

        compared = ["none", config.baseline if config.baseline != "none" else "loo"]
        runs = {name: _run(config, name, seeds=config.plot_seeds) for name in compared}
        plot_comparison(
            runs,
            torch.tensor(config.means, dtype=torch.float64),
            config.plot,
            f"{config.plot_seeds} seeds, N={config.samples} samples per update, lr={config.lr}, noise={config.noise}",
        )
        print(f"wrote {config.plot}", file=sys.stderr)
    return 0
