"""The playground's figure: what a baseline does to learning and to the noise of the gradient estimate."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from policygrad.bandit.core import BanditRun

SMOOTHING = 10  # steps in the moving average of the variance curve


def plot_comparison(runs: dict[str, BanditRun], means: Tensor, path: Path, title: str) -> None:
    """Three panels over update steps, for runs keyed by baseline name (all with the same seeds):

    1. expected reward J: median over seeds and the 10-90% band, with the best arm's mean as a dashed line;
    2. variance of the gradient estimate, mean over seeds of ||g - grad J||^2 (log scale, 10-step moving average);
    3. the action probabilities of the first seed of the last run, stacked, to show where the mass goes.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    for name, run in runs.items():
        J = run.expected_reward  # (steps + 1, S)
        x = torch.arange(J.shape[0])
        low, mid, high = torch.quantile(J, torch.tensor([0.1, 0.5, 0.9], dtype=J.dtype), dim=1)
        (line,) = axes[0].plot(x, mid, label=f"baseline: {name}")
        axes[0].fill_between(x, low, high, color=line.get_color(), alpha=0.2)
        variance = run.gradient_variance  # (steps,)
        window = max(1, min(SMOOTHING, variance.shape[0]))
        smooth = variance.unfold(0, window, 1).mean(-1)  # moving average over `window` steps
        axes[1].plot(
            torch.arange(window, variance.shape[0] + 1), smooth, color=line.get_color(), label=f"baseline: {name}"
        )
    axes[0].axhline(float(means.max()), color="grey", ls="--", lw=1, label="best arm")
    axes[0].set(xlabel="update step", ylabel="expected reward J", title="Learning (median, 10-90% of seeds)")
    axes[0].legend()
    axes[1].set(
        xlabel="update step",
        ylabel="E ||g - grad J||²",
        yscale="log",
        title=f"Variance of the gradient estimate ({SMOOTHING}-step average)",
    )
    axes[1].legend()

    name, run = list(runs.items())[-1]
    probs = run.probs[:, 0, :]  # (steps + 1, K)
    axes[2].stackplot(
        torch.arange(probs.shape[0]), probs.T, labels=[f"arm {k} (mean {float(m):g})" for k, m in enumerate(means)]
    )
    axes[2].set(xlabel="update step", ylabel="probability", ylim=(0, 1), title=f"Policy, one seed (baseline: {name})")
    axes[2].legend(loc="lower left", fontsize="small")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
