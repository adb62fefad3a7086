"""The update step of each algorithm, chosen by name from :data:`UPDATES`.

Every update takes the same inputs, a flat batch of B = T * N steps with their advantages and returns already
estimated and the weight w_H of the entropy bonus for this batch (``entropy_coef``, or the dynamic weight of
:mod:`policygrad.regularizers`), and returns a dict of floats to log. They differ only in how they move the policy:

    reinforce, a2c   one gradient step on  -mean(A * log pi) - w_H * H          (Williams 1992; Mnih et al. 2016)
    ppo              epochs x minibatches on the clipped surrogate               (Schulman et al. 2017)
    npg              one natural-gradient step scaled to a KL trust region       (Kakade 2001; Schulman et al. 2015)

(REINFORCE and A2C share the update; they differ in the advantages, lambda = 1 versus lambda < 1, and in their
batch presets, see ``config.ALGO_DEFAULTS``.) Every algorithm then fits the value baseline by regression on the
returns, ``epochs x minibatches`` Adam steps.

A step whose loss or gradient norm is NaN or inf (an environment that returned NaN, an overflow) is skipped: the
gradients are dropped before ``optimizer.step()``, so neither the weights nor Adam's moments see them, and the
update reports how many it skipped as ``skipped_updates`` (the trainer stops a run after several steps in a row that
skipped any, see docs/reliability.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from policygrad.control.config import ControlConfig
from policygrad.losses import policy_loss, value_loss
from policygrad.natural_gradient import (
    backtracking_line_search,
    conjugate_gradient,
    fisher_vector_product,
    flat_grad,
    trust_region_step,
)

__all__ = ["Learner", "Batch", "UPDATES"]


@dataclass
class Learner:
    """The networks and their optimisers."""

    policy: nn.Module
    value_net: nn.Module
    policy_opt: torch.optim.Optimizer
    value_opt: torch.optim.Optimizer


@dataclass
class Batch:
    """A flattened rollout (B = T * N rows, time-major: t0 env0, t0 env1, ..., t1 env0, ...) with its estimates."""

    obs: Tensor  # (B, O)
    actions: Tensor  # (B,) or (B, D)
    old_logprobs: Tensor  # (B,)
    advantages: Tensor  # (B,)
    returns: Tensor  # (B,) value targets

    def rows(self, index: Tensor) -> Batch:
        return Batch(
            self.obs[index], self.actions[index], self.old_logprobs[index], self.advantages[index], self.returns[index]
        )


def _normalized(advantages: Tensor, enabled: bool) -> Tensor:
    # a per-batch scale makes one learning rate fit returns of any size (Andrychowicz et al. 2021, section 3.5)
    if not enabled or advantages.numel() < 2:
        return advantages
    return (advantages - advantages.mean()) / (advantages.std() + 1e-8)


def _step(optimizer: torch.optim.Optimizer, loss: Tensor, module: nn.Module, max_grad_norm: float) -> tuple[float, int]:
    """One optimiser step, unless the loss or the gradient norm is not finite; returns (the gradient norm before
    clipping, 1 if the step was skipped else 0)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = float(nn.utils.clip_grad_norm_(module.parameters(), max_grad_norm if max_grad_norm > 0 else float("inf")))
    if not (math.isfinite(norm) and math.isfinite(float(loss.detach()))):
        optimizer.zero_grad(set_to_none=True)
        return norm, 1
    optimizer.step()
    return norm, 0


def _minibatches(size: int, count: int, generator: torch.Generator) -> list[Tensor]:
    # exactly ``count`` parts, also when count does not divide size (``chunk`` may return fewer)
    return list(torch.randperm(size, generator=generator).tensor_split(count))


def fit_value(learner: Learner, batch: Batch, cfg: ControlConfig, generator: torch.Generator) -> dict[str, float]:
    """Regress V(s) on the returns: ``epochs x minibatches`` steps of 1/2 (V - R)^2."""
    metrics: dict[str, float] = {}
    skipped = 0
    for _ in range(cfg.epochs):
        for index in _minibatches(len(batch.returns), cfg.minibatches, generator):
            loss, metrics = value_loss(learner.value_net(batch.obs[index]), batch.returns[index])
            skipped += _step(learner.value_opt, loss, learner.value_net, cfg.max_grad_norm)[1]
    return {
        "value_loss": float(loss.detach()),
        "explained_variance": metrics["explained_variance"],
        "skipped_updates": skipped,
    }


def _with_policy_skips(metrics: dict[str, float], skipped: int) -> dict[str, float]:
    """The value fit's metrics with the policy's skipped optimiser steps added to its own."""
    return {**metrics, "skipped_updates": metrics["skipped_updates"] + skipped}


def vanilla_update(
    learner: Learner, batch: Batch, cfg: ControlConfig, generator: torch.Generator, entropy_weight: float
) -> dict[str, float]:
    """One step of the score-function estimator with an entropy bonus (REINFORCE with baseline / A2C)."""
    family = learner.policy.family
    params = learner.policy(batch.obs)
    loss, _ = policy_loss(
        family.log_prob(params, batch.actions), _normalized(batch.advantages, cfg.normalize_advantages)
    )
    entropy = family.entropy(params).mean()
    grad_norm, skipped = _step(learner.policy_opt, loss - entropy_weight * entropy, learner.policy, cfg.max_grad_norm)
    return {
        "policy_loss": float(loss.detach()),
        "entropy": float(entropy.detach()),
        "grad_norm": grad_norm,
        **_with_policy_skips(fit_value(learner, batch, cfg, generator), skipped),
    }


def ppo_update(
    learner: Learner, batch: Batch, cfg: ControlConfig, generator: torch.Generator, entropy_weight: float
) -> dict[str, float]:
    """Several epochs of minibatch steps on the clipped surrogate, then the value fit."""
    family = learner.policy.family
    clip_fractions, kls, skipped = [], [], 0
    for _ in range(cfg.epochs):
        for index in _minibatches(len(batch.returns), cfg.minibatches, generator):
            mb = batch.rows(index)
            params = learner.policy(mb.obs)
            loss, metrics = policy_loss(
                family.log_prob(params, mb.actions),
                _normalized(mb.advantages, cfg.normalize_advantages),
                old_logprobs=mb.old_logprobs,
                clip_eps_low=cfg.clip_eps,
            )
            entropy = family.entropy(params).mean()
            skipped += _step(learner.policy_opt, loss - entropy_weight * entropy, learner.policy, cfg.max_grad_norm)[1]
            clip_fractions.append(metrics["clip_fraction"])
            kls.append(metrics["approx_kl"])
    return {
        "policy_loss": float(loss.detach()),
        "entropy": float(entropy.detach()),
        "clip_fraction": sum(clip_fractions) / len(clip_fractions),
        "approx_kl": kls[-1],
        **_with_policy_skips(fit_value(learner, batch, cfg, generator), skipped),
    }


def npg_update(
    learner: Learner, batch: Batch, cfg: ControlConfig, generator: torch.Generator, entropy_weight: float
) -> dict[str, float]:
    """Natural gradient ascent on the importance-sampled surrogate inside a KL trust region.

    L(theta) = mean[ pi_theta(a|s) / pi_old(a|s) * A ] + w_H * H         (TRPO, Schulman et al. 2015, eq. 14)
    x = F^-1 grad L   (conjugate gradient on Fisher-vector products)
    theta <- theta + (backtracked) sqrt(2 delta / x^T F x) x
    """
    policy, family = learner.policy, learner.policy.family
    params_list = list(policy.parameters())
    advantages = _normalized(batch.advantages, cfg.normalize_advantages)
    with torch.no_grad():
        old_params = policy(batch.obs)  # (B, P_dist): pi_old, a constant from here on

    def surrogate() -> Tensor:
        params = policy(batch.obs)
        ratio = torch.exp(family.log_prob(params, batch.actions) - batch.old_logprobs)
        return (ratio * advantages).mean() + entropy_weight * family.entropy(params).mean()

    objective = surrogate()
    gradient = flat_grad(objective, params_list)  # (P,)
    if not (math.isfinite(float(objective.detach())) and bool(torch.isfinite(gradient).all())):
        return _npg_skipped(learner, batch, cfg, generator, float(objective.detach()))
    fvp = fisher_vector_product(family.kl(old_params, policy(batch.obs)).mean(), params_list, cfg.damping)
    direction = conjugate_gradient(fvp, gradient, cfg.cg_iters)
    full_step = trust_region_step(direction, fvp(direction), cfg.max_kl)
    if not bool(torch.isfinite(full_step).all()):  # a Fisher matrix that overflowed on the way
        return _npg_skipped(learner, batch, cfg, generator, float(objective.detach()))
    start = parameters_to_vector(params_list).detach()

    @torch.no_grad()
    def evaluate(step: Tensor) -> tuple[float, float]:
        vector_to_parameters(start + step, params_list)
        improvement = float(surrogate() - objective)
        kl = float(family.kl(old_params, policy(batch.obs)).mean())
        vector_to_parameters(start, params_list)
        return improvement, kl

    step, fraction = backtracking_line_search(evaluate, full_step, float(gradient @ full_step), cfg.max_kl)
    with torch.no_grad():
        vector_to_parameters(start + step, params_list)
        new_params = policy(batch.obs)
        kl = float(family.kl(old_params, new_params).mean())
        entropy = float(family.entropy(new_params).mean())
    return {
        "surrogate": float(objective.detach()),
        "step_fraction": fraction,
        "kl": kl,
        "entropy": entropy,
        **fit_value(learner, batch, cfg, generator),
    }


def _npg_skipped(
    learner: Learner, batch: Batch, cfg: ControlConfig, generator: torch.Generator, objective: float
) -> dict[str, float]:
    """NPG's metrics when the surrogate, its gradient or the step is not finite: the policy is left as it was."""
    with torch.no_grad():
        entropy = float(learner.policy.family.entropy(learner.policy(batch.obs)).mean())
    return {
        "surrogate": objective,
        "step_fraction": 0.0,
        "kl": 0.0,
        "entropy": entropy,
        **_with_policy_skips(fit_value(learner, batch, cfg, generator), 1),
    }


UPDATES: dict[str, Callable[[Learner, Batch, ControlConfig, torch.Generator, float], dict[str, float]]] = {
    "reinforce": vanilla_update,
    "a2c": vanilla_update,
    "ppo": ppo_update,
    "npg": npg_update,
}
"""The update of each ``--algo``, by name."""
