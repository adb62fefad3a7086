"""Configuration of ``policygrad control``. Imports nothing heavy (no torch, no gymnasium), so ``--help`` and argument
errors are instant; checks that need the environment (its id, its action space) happen in :func:`train.run`.

Like ``policygrad train``, a run can be described by a YAML recipe of field values (``--recipe FILE``; a run's own
``config.yaml`` is one, which is how a run is resumed) with command-line flags on top, see :func:`load_config`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from policygrad import configs
from policygrad.configs import default_hint
from policygrad.errors import UsageError
from policygrad.errors import require as _require
from policygrad.variants import ENTROPY_WEIGHTS

ALGORITHMS = ("reinforce", "a2c", "ppo", "npg")

# Tuned on CartPole-v1 (see docs/control.md for how they were chosen and what they reach). A field left at None takes
# its algorithm's value from here, so `--algo npg` alone is a sensible run and every number can still be overridden.
_ONE_STEP = dict(num_envs=4, num_steps=64, lr=1e-2, value_lr=1e-2, anneal_lr=True, gamma=0.99, epochs=10, minibatches=4)
_SEVERAL_STEPS = dict(
    num_envs=8, num_steps=32, lr=1e-3, value_lr=1e-3, anneal_lr=False, gamma=0.98, epochs=10, minibatches=4
)
ALGO_DEFAULTS: dict[str, dict[str, object]] = {
    "reinforce": {**_ONE_STEP, "gae_lambda": 1.0, "entropy_coef": 0.0},
    "a2c": {**_ONE_STEP, "gae_lambda": 0.95, "entropy_coef": 0.0},
    "ppo": {**_SEVERAL_STEPS, "gae_lambda": 0.8, "entropy_coef": 0.0},
    "npg": {**_SEVERAL_STEPS, "gae_lambda": 0.8, "entropy_coef": 0.0},
}
"""Per-algorithm defaults of the fields that are None in :class:`ControlConfig`. For NPG ``lr`` is unused (the step
size comes from ``max_kl``); for REINFORCE, A2C and NPG ``epochs``/``minibatches`` apply to the value network only
(a well-fitted baseline was the biggest single gain for the one-step methods)."""

PRESET_FIELDS = tuple(ALGO_DEFAULTS["ppo"])
"""The fields that take their algorithm's value when left at None."""

ONLY_FOR = {"clip_eps": ("ppo",), "max_kl": ("npg",), "cg_iters": ("npg",), "damping": ("npg",)}
"""Fields that only some algorithms read: set to anything but the default with another ``--algo``, they are refused
(a flag that silently does nothing is a trap)."""


@dataclasses.dataclass
class ControlConfig:
    """Train a policy on a Gymnasium environment with REINFORCE, A2C, PPO or the natural policy gradient (NPG)."""

    env: Annotated[
        str | None, default_hint("CartPole-v1, or with --eval the environment the policy was trained on")
    ] = None
    """Gymnasium environment id with Discrete or Box actions and flat Box or Discrete (made one-hot) observations"""
    algo: Literal["reinforce", "a2c", "ppo", "npg"] = "ppo"
    """reinforce: Monte Carlo returns minus a value baseline, one step per batch; a2c: GAE advantages, one step per
    batch; ppo: clipped surrogate, several epochs of minibatches; npg: natural gradient in a KL trust region"""
    policy: Literal["auto", "categorical", "gaussian"] = "auto"
    """action distribution: auto picks categorical for Discrete and gaussian (learned log-std) for Box actions"""
    total_steps: int = 50_000
    """environment steps to train for, summed over the vectorised environments"""
    num_envs: Annotated[int | None, default_hint("per algorithm")] = None
    """environments stepped side by side"""
    num_steps: Annotated[int | None, default_hint("per algorithm")] = None
    """steps per environment in each batch; a batch has num_envs * num_steps steps"""
    lr: Annotated[float | None, default_hint("per algorithm")] = None
    """Adam learning rate of the policy (unused by npg)"""
    value_lr: Annotated[float | None, default_hint("per algorithm")] = None
    """Adam learning rate of the value network"""
    anneal_lr: Annotated[bool | None, default_hint("per algorithm")] = None
    """decay both learning rates linearly to 0 over the run"""
    gamma: Annotated[float | None, default_hint("per algorithm")] = None
    """discount factor in [0, 1]"""
    gae_lambda: Annotated[float | None, default_hint("per algorithm")] = None
    """GAE lambda in [0, 1]; 1 gives Monte Carlo returns minus the baseline"""
    epochs: Annotated[int | None, default_hint("per algorithm")] = None
    """passes over each batch (ppo: policy and value network; reinforce, a2c, npg: the value network only, the policy
    takes one step per batch)"""
    minibatches: Annotated[int | None, default_hint("per algorithm")] = None
    """minibatches per epoch"""
    clip_eps: float = 0.2
    """PPO clip range of the probability ratio"""
    entropy_coef: Annotated[float | None, default_hint("per algorithm")] = None
    """weight of the entropy bonus (constant) or its numerator (dynamic)"""
    entropy_weight: Literal[ENTROPY_WEIGHTS.names] = "constant"
    """constant: the bonus weight is entropy_coef; dynamic: entropy_coef / (Var(returns) + entropy_eps), bounded, with
    Var the variance of the returns of the episodes that ended in the batch"""
    entropy_min_weight: float = 0.0
    """dynamic entropy weight: lower bound"""
    entropy_max_weight: float = 1.0
    """dynamic entropy weight: upper bound"""
    entropy_eps: float = 0.01
    """dynamic entropy weight: added to the return variance"""
    max_grad_norm: float = 0.5
    """clip the global gradient norm of each network to this (0 for no clipping)"""
    normalize_advantages: bool = True
    """standardise the advantages of each (mini)batch to mean 0, std 1"""
    max_kl: float = 0.05
    """npg: trust-region radius, the largest mean KL(old || new) per update, in nats"""
    cg_iters: int = 10
    """npg: conjugate-gradient iterations"""
    damping: float = 0.1
    """npg: added to the Fisher matrix's diagonal for a stable solve"""
    hidden: tuple[int, ...] = (64, 64)
    """widths of the hidden tanh layers of the policy and value networks"""
    seed: int = 0
    """random seed (environments, network initialisation, action sampling)"""
    eval_episodes: int = 10
    """episodes of the deterministic policy (argmax / mean action) after training, or with --eval"""
    output_dir: Path = Path("runs/control")
    """run folder: config.yaml, metrics.jsonl, TensorBoard events, checkpoints/, policy.pt (and curves.png with
    --plot); refused if it holds a run already, unless --resume or --overwrite"""
    overwrite: bool = False
    """delete a previous run in output_dir and start again"""
    resume: bool = False
    """continue the run in output_dir from its newest checkpoint; give the run's own settings with
    --recipe <output_dir>/config.yaml"""
    allow_config_change: bool = False
    """with --resume: continue even though the settings differ from the ones the checkpoint was trained with (the
    resumed run is then not the same run)"""
    plot: bool = False
    """also write curves.png: episode return against environment steps and wall time"""
    eval: Path | None = None
    """evaluate a saved policy (a policy.pt written by a run) instead of training; --env defaults to the one it was trained on"""
    progress: bool = True
    """show a progress bar"""
    threads: int = 1
    """torch CPU threads; 1 is fastest for these small networks"""
    save_every: int = 10
    """write a checkpoint (networks, optimisers, random generators, environment state) every this many steps (one
    step: a batch of num_envs * num_steps environment steps and its update); 0 never"""
    keep_checkpoints: int = 3
    """checkpoints kept in the run's checkpoints/ folder, the newest (0 keeps all)"""
    max_bad_steps: int = 3
    """stop the run (exit 3, saving the state from before the first of them) after this many steps in a row with a
    non-finite loss or gradient norm; each such optimiser update is skipped and counted in skipped_updates"""

    def __post_init__(self) -> None:
        if self.algo not in ALGORITHMS:
            raise UsageError("--algo", f"must be one of {', '.join(ALGORITHMS)}, got {configs.short(self.algo)}")
        for name, algos in ONLY_FOR.items():
            default = next(item.default for item in dataclasses.fields(self) if item.name == name)
            if self.algo not in algos and getattr(self, name) != default:
                raise UsageError(
                    configs.flag(name), f"applies to --algo {' or '.join(algos)} only; --algo {self.algo} ignores it"
                )
        for name in PRESET_FIELDS:
            if getattr(self, name) is None:
                setattr(self, name, ALGO_DEFAULTS[self.algo][name])
        self.hidden = tuple(self.hidden)
        if self.env is None and self.eval is None:
            self.env = "CartPole-v1"
        _require(self.env is None or bool(self.env.strip()), "--env", "give a Gymnasium id such as CartPole-v1")
        _require(
            self.policy in ("auto", "categorical", "gaussian"),
            "--policy",
            f"must be auto, categorical or gaussian, got {configs.short(self.policy)}",
        )
        _require(self.total_steps >= 1, "--total-steps", f"must be at least 1, got {self.total_steps}")
        _require(self.num_envs >= 1, "--num-envs", f"must be at least 1, got {self.num_envs}")
        _require(self.num_steps >= 1, "--num-steps", f"must be at least 1, got {self.num_steps}")
        _positive(self.lr, "--lr")
        _positive(self.value_lr, "--value-lr")
        _require(0 <= self.gamma <= 1, "--gamma", f"must be in [0, 1], got {self.gamma}")
        _require(0 <= self.gae_lambda <= 1, "--gae-lambda", f"must be in [0, 1], got {self.gae_lambda}")
        _require(self.epochs >= 1, "--epochs", f"must be at least 1, got {self.epochs}")
        batch = self.num_envs * self.num_steps
        _require(
            1 <= self.minibatches <= batch,
            "--minibatches",
            f"must be in [1, num_envs * num_steps = {batch}], got {self.minibatches}",
        )
        _require(0 < self.clip_eps < 1, "--clip-eps", f"must be in (0, 1), got {self.clip_eps}")
        _require(
            math.isfinite(self.entropy_coef) and self.entropy_coef >= 0,
            "--entropy-coef",
            f"must be a finite number >= 0, got {self.entropy_coef}",
        )
        ENTROPY_WEIGHTS.check("--entropy-weight", self.entropy_weight)
        for name in ("entropy_min_weight", "entropy_max_weight"):
            value = getattr(self, name)
            _require(
                math.isfinite(value) and value >= 0, configs.flag(name), f"must be a finite number >= 0, got {value}"
            )
        _positive(self.entropy_eps, "--entropy-eps")
        _require(
            self.entropy_max_weight >= self.entropy_min_weight,
            "--entropy-max-weight",
            f"must be >= --entropy-min-weight ({self.entropy_min_weight}), got {self.entropy_max_weight}",
        )
        _require(
            math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0,
            "--max-grad-norm",
            f"must be a finite number >= 0, got {self.max_grad_norm}",
        )
        _positive(self.max_kl, "--max-kl")
        _require(self.cg_iters >= 1, "--cg-iters", f"must be at least 1, got {self.cg_iters}")
        _require(
            math.isfinite(self.damping) and self.damping >= 0,
            "--damping",
            f"must be a finite number >= 0, got {self.damping}",
        )
        _require(
            len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden),
            "--hidden",
            f"give one or more positive widths, got {self.hidden}",
        )
        _require(self.eval_episodes >= 0, "--eval-episodes", f"must be at least 0, got {self.eval_episodes}")
        _require(1 <= self.threads <= 1024, "--threads", f"must be in [1, 1024], got {self.threads}")
        # Gymnasium refuses negative seeds, and environment copies and evaluation episodes take seed + i
        _require(0 <= self.seed < 2**32, "--seed", f"must be in [0, 2**32), got {self.seed}")
        if self.eval is not None:
            _require(self.eval.is_file(), "--eval", f"no such file: {self.eval}")
            _require(self.eval_episodes >= 1, "--eval-episodes", "must be at least 1 with --eval")
        _require(self.save_every >= 0, "--save-every", f"must be >= 0, got {self.save_every}")
        _require(self.keep_checkpoints >= 0, "--keep-checkpoints", f"must be >= 0, got {self.keep_checkpoints}")
        _require(self.max_bad_steps >= 1, "--max-bad-steps", f"must be at least 1, got {self.max_bad_steps}")
        self.output_dir = Path(self.output_dir)
        _require("\x00" not in str(self.output_dir), "--output-dir", "must not contain a NUL character")
        _require(not (self.overwrite and self.resume), "--overwrite", "cannot be combined with --resume")
        _require(self.eval is None or not self.resume, "--resume", "cannot be combined with --eval")

    @property
    def batch_size(self) -> int:
        """Environment steps per update."""
        return self.num_envs * self.num_steps


def _positive(value: float, field: str) -> None:
    _require(math.isfinite(value) and value > 0, field, f"must be a finite number > 0, got {value}")


RESUME_MAY_CHANGE = frozenset(
    {
        "total_steps",
        "output_dir",
        "threads",
        "progress",
        "plot",
        "eval",
        "eval_episodes",
        "save_every",
        "keep_checkpoints",
        "max_bad_steps",
    }
)
"""Fields a resumed run may change without ``--allow-config-change`` (besides ``resume``, ``overwrite`` and
``allow_config_change`` themselves): how long to train (extending a run is a deliberate act, said in a line, as for
``policygrad train --max-steps``; with ``anneal_lr`` the learning rate then decays over the new total), where and how
often to save, how to show and evaluate the run, when to give up on non-finite steps."""

OLD_RUN = (
    "holds a run written by an older policygrad control (config.json, checkpoints/update-N), which this version "
    "cannot resume"
)


def older_run(folder: Path) -> bool:
    """Whether ``folder`` holds a run written by policygrad control before issue 13: a ``config.json`` of control
    settings (``run_dir``, ``ent_coef``) or ``checkpoints/update-N`` folders, and no ``config.yaml``."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / "config.yaml").is_file():
        return False
    if any((folder / "checkpoints").glob("update-*")):
        return True
    try:
        saved = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {"algo", "run_dir"} <= set(saved)


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | Sequence[str] = ()) -> ControlConfig:
    """A :class:`ControlConfig` from a YAML recipe and overrides (:func:`policygrad.configs.load_config`); the recipe
    loader of ``policygrad control --recipe FILE``."""
    if path is not None and Path(path).name == "config.json" and older_run(Path(path).parent):
        raise UsageError(
            "--recipe",
            f"{Path(path).parent} {OLD_RUN}; start it again with --output-dir {Path(path).parent} --overwrite, or "
            "choose another --output-dir",
        )
    return configs.load_config(ControlConfig, path, overrides)
