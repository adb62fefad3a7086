"""What a baseline buys on the bandit playground's default problem, measured side by side in one run.

    python benchmarks/bandit_baselines.py            # about 10 s on 2 CPU cores

Same arms, seeds, samples and learning rate for every baseline; prints, per baseline, the variance of the gradient
estimate (mean over seeds of ||g - grad J||^2, the estimator's total variance since all of these are unbiased, except
`group` which is scaled by (N-1)/N), its ratio to no baseline, and how learning went.
"""

from __future__ import annotations

import torch

from policygrad.bandit.config import BanditConfig
from policygrad.bandit.core import run_bandit

SEEDS = 32


def main() -> None:
    config = BanditConfig()
    means = torch.tensor(config.means, dtype=torch.float64)
    print(
        f"arms {config.means}, noise {config.noise}, N={config.samples}, lr={config.lr}, steps={config.steps}, "
        f"{SEEDS} seeds"
    )
    print(
        f"{'baseline':>9} {'var(g) steps 1-50':>18} {'ratio to none':>14} {'median J@50':>12} {'median J@end':>13} "
        f"{'seeds J@end<3.9':>16}"
    )
    reference = None
    for name in ("none", "mean", "loo", "group"):
        run = run_bandit(means, config.noise, name, config.samples, config.lr, config.steps, config.seed, SEEDS)
        variance = run.gradient_variance[:50].mean().item()
        reference = reference or variance
        J = run.expected_reward
        print(
            f"{name:>9} {variance:>18.4f} {variance / reference:>14.3f} {J[50].median().item():>12.3f} "
            f"{J[-1].median().item():>13.3f} {int((J[-1] < 3.9).sum()):>13}/{SEEDS}"
        )


if __name__ == "__main__":
    main()
