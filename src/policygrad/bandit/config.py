"""Configuration of ``policygrad bandit``. Imports nothing heavy, so ``--help`` and argument errors are instant."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Literal

from policygrad.errors import UsageError
from policygrad.errors import require as _require
from policygrad.variants import BANDIT_BASELINES

PLOT_SUFFIXES = (".png", ".pdf", ".svg")
COMPARING_BASELINES = ("loo", "group", "grpo")  # baselines made of the other samples of the batch


@dataclasses.dataclass
class BanditConfig:
    """Watch REINFORCE learn a K-armed softmax bandit, live. Each arm pays its mean plus Gaussian noise."""

    means: tuple[float, ...] = (3.2, 4.0, 3.6, 3.0)
    """mean reward of each arm (one number per arm); the default's common offset of 3 is what a baseline removes"""
    noise: float = 0.5
    """standard deviation of the Gaussian reward noise"""
    baseline: Literal[BANDIT_BASELINES.names] = "loo"
    """none: raw rewards; mean: moving average of past rewards; loo: leave-one-out mean of the other samples (RLOO);
    group: mean of all samples including itself (GRPO without std, biased by (N-1)/N); grpo: GRPO's group mean and
    std normalisation"""
    baseline_decay: float = 0.9
    """memory of the moving-average baseline (mean), in [0, 1)"""
    entropy_coef: float = 0.0
    """weight of the entropy bonus (0 for none)"""
    samples: int = 4
    """actions sampled per update (N)"""
    lr: float = 0.3
    """learning rate of the gradient-ascent step on the logits"""
    epochs: int = 1
    """gradient steps on each batch; after the first, PPO's clipped ratio to the sampling policy"""
    clip_eps: float = 0.2
    """clip range of the ratio in the later epochs: [1 - clip_eps, 1 + clip_eps]"""
    steps: int = 300
    """number of updates"""
    seed: int = 0
    """random seed"""
    plot: Path | None = None
    """write a figure (.png, .pdf or .svg): expected reward and gradient variance with vs without the baseline"""
    plot_seeds: int = 32
    """independent runs averaged in the figure"""
    json: bool = False
    """print the run as JSON on stdout instead of the live view"""
    delay: float = 0.01
    """seconds between frames of the live view (0 for as fast as possible)"""

    def __post_init__(self) -> None:
        self.means = tuple(self.means)
        if len(self.means) < 2:  # one arm leaves nothing to learn: the policy is 1 from the start
            raise UsageError("--means", f"give at least two arms, e.g. --means 1 0 0.5 (got {len(self.means)})")
        for mean in self.means:
            if not math.isfinite(mean):
                raise UsageError("--means", f"every mean must be a finite number, got {mean}")
        _require(
            math.isfinite(self.noise) and self.noise >= 0, "--noise", f"must be a finite number >= 0, got {self.noise}"
        )
        BANDIT_BASELINES.check("--baseline", self.baseline)
        _require(0 <= self.baseline_decay < 1, "--baseline-decay", f"must be in [0, 1), got {self.baseline_decay}")
        _require(
            math.isfinite(self.entropy_coef) and self.entropy_coef >= 0,
            "--entropy-coef",
            f"must be a finite number >= 0, got {self.entropy_coef}",
        )
        _require(math.isfinite(self.lr) and self.lr > 0, "--lr", f"must be a finite number > 0, got {self.lr}")
        _require(self.epochs >= 1, "--epochs", f"must be at least 1, got {self.epochs}")
        _require(
            math.isfinite(self.clip_eps) and 0 < self.clip_eps < 1,
            "--clip-eps",
            f"must be a number in (0, 1), got {self.clip_eps}",
        )
        _require(self.steps >= 1, "--steps", f"must be at least 1, got {self.steps}")
        _require(self.samples >= 1, "--samples", f"must be at least 1, got {self.samples}")
        if self.baseline in COMPARING_BASELINES and self.samples < 2:
            raise UsageError("--samples", f"baseline {self.baseline!r} compares samples, so it needs at least 2")
        _require(0 <= self.seed < 2**63, "--seed", f"must be in [0, 2**63), got {self.seed}")
        _require(self.plot_seeds >= 1, "--plot-seeds", f"must be at least 1, got {self.plot_seeds}")
        _require(
            math.isfinite(self.delay) and self.delay >= 0, "--delay", f"must be a finite number >= 0, got {self.delay}"
        )
        if self.plot is not None:
            if self.plot.suffix.lower() not in PLOT_SUFFIXES:
                raise UsageError("--plot", f"file name must end in one of {', '.join(PLOT_SUFFIXES)}, got {self.plot}")
            if not self.plot.parent.is_dir():
                raise UsageError("--plot", f"folder {self.plot.parent} does not exist")
