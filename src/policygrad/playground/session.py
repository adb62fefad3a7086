"""A learner per browser tab, and the checks on everything a page sends.

A :class:`Session` is :func:`policygrad.bandit.core.bandit_step` kept open between requests: the same generator,
estimators and draws as ``policygrad bandit``, so a tab that never changed its settings mid-run has taken exactly the
steps of ``policygrad bandit --json`` with the same flags (:meth:`Session.command` writes that command). Settings
arrive as JSON and become a :class:`~policygrad.bandit.config.BanditConfig`, validated by it, within the bounds of
:data:`LIMITS` that keep one request cheap; nothing a page sends is evaluated, only converted to numbers or matched
against the baseline names. :class:`Sessions` bounds how many learners are kept and forgets idle ones.

Letters: K arms, N samples per update.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import shlex
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from policygrad.bandit.config import BanditConfig
from policygrad.bandit.core import (
    BanditStep,
    bandit_step,
    check_finite,
    estimator_moments,
    exact_gradient,
    expected_reward,
    gradient_scale,
    group_mean_expected_gradient,
    make_estimators,
)
from policygrad.errors import UsageError
from policygrad.rng import step_seed
from policygrad.variants import BANDIT_BASELINES

# what one request may cost: bounds on the settings (beyond BanditConfig's own checks) and on the steps taken
LIMITS = {
    "arms": 12,  # K
    "mean": 1000.0,  # |mu_k|
    "noise": 1000.0,
    "lr": 100.0,
    "samples": 256,  # N
    "epochs": 20,
    "entropy_coef": 100.0,
    "steps_per_request": 200,
    "text": 40,  # characters of one value
}
# M, the batches behind each estimator's mean and variance at the current policy: as many as M * N <= 32768 samples
# allow (a state costs about 15 ms), within [200, 4000]
MONTE_CARLO_SAMPLES, MONTE_CARLO_BATCHES = 32_768, (200, 4000)
DTYPE = torch.float64  # as `policygrad bandit`: the page shows the terminal's numbers exactly

# how the page names each baseline (the names themselves are policygrad.variants.BANDIT_BASELINES)
LABELS = {
    "none": "REINFORCE (no baseline)",
    "mean": "moving average",
    "loo": "leave-one-out (RLOO)",
    "group": "group mean (includes itself)",
    "grpo": "GRPO (group mean and std)",
}


def _text(field: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UsageError(field, f"must be a number, got {type(value).__name__}")
    text = str(value).strip()
    if len(text) > LIMITS["text"]:
        raise UsageError(field, f"must be a number, got {text[: LIMITS['text']]!r}... ({len(text)} characters)")
    return text


def _float(field: str, value: Any) -> float:
    text = _text(field, value)
    try:
        return float(text)
    except ValueError:
        raise UsageError(field, f"must be a number, got {text!r}") from None


def _int(field: str, value: Any) -> int:
    text = _text(field, value)
    try:
        return int(text)
    except ValueError:
        raise UsageError(field, f"must be a whole number, got {text!r}") from None


def _floats(field: str, value: Any) -> tuple[float, ...]:
    if isinstance(value, str):
        value = [part for part in value.replace(",", " ").split() if part]
    if not isinstance(value, list):
        raise UsageError(field, f"must be a list of numbers, got {type(value).__name__}")
    if len(value) > LIMITS["arms"]:
        raise UsageError(field, f"at most {LIMITS['arms']} arms, got {len(value)}")
    return tuple(_float(f"{field}[{k}]", item) for k, item in enumerate(value))


def _name(field: str, value: Any) -> str:
    BANDIT_BASELINES.check(field, value)
    return value


# the settings a page may send, by the name of their BanditConfig field, each with its converter
PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "means": _floats,
    "noise": _float,
    "baseline": _name,
    "baseline_decay": _float,
    "entropy_coef": _float,
    "samples": _int,
    "lr": _float,
    "epochs": _int,
    "clip_eps": _float,
    "seed": _int,
}
SETTINGS = tuple(PARSERS)


def parse_settings(data: Any, current: BanditConfig | None = None) -> BanditConfig:
    """The settings a page sent (a JSON object of :data:`SETTINGS`, numbers or their text; missing ones keep
    ``current``'s or the defaults), checked by :class:`BanditConfig` and :data:`LIMITS`.

    Raises:
        UsageError: naming the setting as the page does (``noise``, ``means[2]``), in one line.
    """
    if not isinstance(data, dict):
        raise UsageError("settings", f"must be a JSON object, got {type(data).__name__}")
    unknown = [str(key)[: LIMITS["text"]] for key in data if key not in PARSERS]
    if unknown:
        raise UsageError(unknown[0], f"is not a setting; the settings are {', '.join(SETTINGS)}")
    values = {name: PARSERS[name](name, value) for name, value in data.items()}
    base = current or BanditConfig()
    merged = {name: values.get(name, getattr(base, name)) for name in SETTINGS}
    try:
        settings = BanditConfig(**merged)
    except UsageError as err:  # BanditConfig names its flags (--noise); the page names its settings (noise)
        field = err.field.lstrip("-").replace("-", "_")
        raise UsageError(field, str(err).removeprefix(f"{err.field}: ")) from None
    for k, mean in enumerate(settings.means):
        _bounded(
            f"means[{k}]", abs(mean), LIMITS["mean"], f"must be between -{LIMITS['mean']:g} and {LIMITS['mean']:g}"
        )
    for name in ("noise", "lr", "samples", "epochs", "entropy_coef"):
        _bounded(name, getattr(settings, name), LIMITS[name], f"must be at most {LIMITS[name]:g} here")
    return settings


def _bounded(field: str, value: float, limit: float, message: str) -> None:
    if value > limit:
        raise UsageError(field, f"{message}, got {value:g}")


def settings_json(settings: BanditConfig) -> dict[str, Any]:
    """The page's settings as JSON, named as :data:`SETTINGS`."""
    return {name: (list(settings.means) if name == "means" else getattr(settings, name)) for name in SETTINGS}


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: those become null (the page shows a dash)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


class Session:
    """One learner: S = 1 row of :func:`~policygrad.bandit.core.bandit_step`, every estimator of
    :data:`~policygrad.variants.BANDIT_BASELINES` fed the same draws, the chosen one driving the updates."""

    def __init__(self, settings: BanditConfig):
        self.settings = settings
        self.generation = 0  # counts resets; the page drops frames of an older generation
        self.lock = asyncio.Lock()  # one request at a time changes the learner
        self.running = False  # a run stream is going; pause clears it
        self.stream: object | None = None  # the token of the newest run stream; an older one stops
        self.last_used = 0.0  # kept by Sessions, on its clock
        self.reset()

    def reset(self) -> None:
        """Back to uniform logits and the seed's first draw."""
        s = self.settings
        self.generator = torch.Generator().manual_seed(s.seed)
        self.means = torch.tensor(s.means, dtype=DTYPE)  # (K,)
        self.logits = torch.zeros(1, len(s.means), dtype=DTYPE)  # (1, K)
        self.estimators = make_estimators(BANDIT_BASELINES.names, s.samples, s.baseline_decay)
        self.steps = 0
        self.replayable = True  # no setting changed since the reset: `policygrad bandit` replays this run
        self.generation += 1

    def configure(self, settings: BanditConfig) -> bool:
        """Take new settings; return True when they need a reset (another number of arms or another seed), which it
        does. Otherwise learning goes on from where it is, the estimators keeping their memory."""
        old, self.settings = self.settings, settings
        if len(settings.means) != len(old.means) or settings.seed != old.seed:
            self.reset()
            return True
        if settings != old:
            self.replayable = self.steps == 0
            self.means = torch.tensor(settings.means, dtype=DTYPE)
        if (settings.samples, settings.baseline_decay) != (old.samples, old.baseline_decay):
            memory = {name: estimator.state() for name, estimator in self.estimators.items()}
            self.estimators = make_estimators(BANDIT_BASELINES.names, settings.samples, settings.baseline_decay)
            for name, estimator in self.estimators.items():
                estimator.restore(memory[name])
        return False

    def advance(self, steps: int) -> list[dict[str, Any]]:
        """Take ``steps`` updates; one record per update, keyed as ``policygrad bandit --json``'s steps plus what the
        page shows beside them.

        Raises:
            UsageError: when an update diverges (the learner stays where it was before that update).
        """
        records = []
        for _ in range(steps):
            s = self.settings
            result = bandit_step(
                self.logits,
                self.means,
                s.noise,
                s.samples,
                s.lr,
                self.estimators,
                s.baseline,
                self.generator,
                entropy_coef=s.entropy_coef,
                epochs=s.epochs,
                clip_eps=s.clip_eps,
            )
            try:
                check_finite(result.logits, self.steps + 1)
            except FloatingPointError as err:
                raise UsageError("lr", f"{err}; lower lr or the size of the rewards (means, noise), or reset") from None
            records.append(self._record(result))
            self.logits = result.logits
            self.steps += 1
        return records

    def _record(self, result: BanditStep) -> dict[str, Any]:
        """One update as JSON: ``policygrad bandit --json``'s keys (computed as it computes them), then the draws,
        every estimator's estimate and squared error on them, the ratio pi_new / pi_sample per arm, and
        :func:`~policygrad.bandit.core.policy_update`'s metrics."""
        exact = result.exact_gradient[0]  # (K,)
        return _finite(
            {
                "step": self.steps,
                "probs": result.probs[0].tolist(),
                "expected_reward": expected_reward(result.probs, self.means)[0].item(),  # from (1, K), as the terminal
                "gradient_estimate": result.gradient_estimate[0].tolist(),
                "exact_gradient": exact.tolist(),
                "actions": result.actions[0].tolist(),
                "rewards": result.rewards[0].tolist(),
                "advantages": result.advantages[0].tolist(),
                "estimates": {name: g[0].tolist() for name, g in result.estimates.items()},
                "squared_errors": {name: ((g[0] - exact) ** 2).sum().item() for name, g in result.estimates.items()},
                "ratios": (result.logits[0].softmax(-1) / result.probs[0]).tolist(),
                **result.metrics,
            }
        )

    def state(self) -> dict[str, Any]:
        """Where the learner is now: the policy, J, the exact gradient and what each estimator would give here on
        average (Monte Carlo over M batches of fresh draws, seeded by (seed, step), so the learner's own draws are
        untouched). ``scale_error`` bounds the standard error of ``scale``: sqrt(Var[g] / M) / ||grad J||, since no
        direction's variance exceeds the total."""
        s = self.settings
        probs = self.logits[0].softmax(-1)  # (K,)
        exact = exact_gradient(probs, self.means)
        batches = min(max(MONTE_CARLO_SAMPLES // s.samples, MONTE_CARLO_BATCHES[0]), MONTE_CARLO_BATCHES[1])
        generator = torch.Generator().manual_seed(step_seed(s.seed, self.steps) % 2**63)
        moments = estimator_moments(
            self.logits[0], self.means, s.noise, s.samples, self.estimators, batches, generator, s.entropy_coef
        )
        norm = exact.norm().item()
        return _finite(
            {
                "step": self.steps,
                "generation": self.generation,
                "running": self.running,
                "probs": probs.tolist(),
                "expected_reward": expected_reward(self.logits.softmax(-1), self.means)[0].item(),
                "best": max(s.means),
                "exact_gradient": exact.tolist(),
                "group_mean_expected_gradient": group_mean_expected_gradient(probs, self.means, s.samples).tolist(),
                "moments": {
                    name: {
                        "mean": mean.tolist(),
                        "variance": variance.item(),
                        "scale": gradient_scale(mean, exact).item(),
                        "scale_error": math.sqrt(variance.item() / batches) / norm if norm > 0 else None,
                    }
                    for name, (mean, variance) in moments.items()
                },
                "monte_carlo_batches": batches,
                "command": self.command(),
                "replayable": self.replayable,
            }
        )

    def command(self) -> str:
        """The ``policygrad bandit`` command that takes the steps this session took (with fixed settings)."""
        s, args = self.settings, ["policygrad", "bandit", "--means", *(f"{m!r}" for m in self.settings.means)]
        for name in SETTINGS[1:]:
            args += ["--" + name.replace("_", "-"), str(getattr(s, name))]
        return shlex.join([*args, "--steps", str(max(self.steps, 1)), "--json"])


class Sessions:
    """The live sessions by id: at most ``limit``, the least recently used forgotten first, and none idle for more
    than ``idle_seconds``. ``clock`` is injectable for tests."""

    def __init__(self, limit: int, idle_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.limit, self.idle_seconds, self.clock = limit, idle_seconds, clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, settings: BanditConfig) -> tuple[str, Session]:
        self._forget_idle()
        while len(self._sessions) >= self.limit:
            _, oldest = self._sessions.popitem(last=False)
            oldest.running = False
        key = secrets.token_urlsafe(16)
        session = Session(settings)
        session.last_used = self.clock()
        self._sessions[key] = session
        return key, session

    def get(self, key: str) -> Session:
        """The session ``key``, now the most recently used. Raises KeyError when there is none (or no longer)."""
        self._forget_idle()
        session = self._sessions[key]
        self._sessions.move_to_end(key)
        session.last_used = self.clock()
        return session

    def touch(self, session: Session) -> None:
        """Count ``session`` as used now (a run stream keeps its tab alive)."""
        session.last_used = self.clock()

    def _forget_idle(self) -> None:
        now = self.clock()
        for key in [key for key, s in self._sessions.items() if now - s.last_used > self.idle_seconds]:
            self._sessions.pop(key).running = False


__all__ = ["LABELS", "LIMITS", "PARSERS", "SETTINGS", "Session", "Sessions", "parse_settings", "settings_json"]
