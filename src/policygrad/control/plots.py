"""Learning curves of a run: episode return against environment steps and against wall time."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_curves"]


def plot_curves(records: list[dict], path: Path, title: str) -> None:
    """Two panels sharing the y axis, from the per-step records of :func:`policygrad.control.train.train`
    (``env_steps``, ``time``, ``episode_returns``, ``return_recent``).

    Dots are single episodes (at the end of the batch they finished in); the line is the mean of the last 10.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, key, label in ((axes[0], "env_steps", "environment steps"), (axes[1], "time", "wall time (s)")):
        xs = [r[key] for r in records for _ in r["episode_returns"]]
        ys = [g for r in records for g in r["episode_returns"]]
        ax.scatter(xs, ys, s=4, alpha=0.25, color="tab:blue", label="episode")
        line = [(r[key], r["return_recent"]) for r in records if r["return_recent"] is not None]
        if line:
            ax.plot(*zip(*line), color="tab:blue", label="mean of last 10")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("episode return")
    axes[0].legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
