"""The update step of each algorithm, chosen by name from :data:`UPDATES`.

Every update takes the same inputs, a flat batch of B = T * N steps with their advantages and returns already
estimated, and returns a dict of floats to log. They differ only in how they move the policy:

    reinforce, a2c   one gradient step on  -mean(A * log pi) - c_H * H          (Williams 1992; Mnih et al. 2016)
    ppo              epochs x minibatches on the clipped surrogate               (Schulman et al. 2017)
    npg              one natural-gradient step scaled to a KL trust region       (Kakade 2001; Schulman et al. 2015)

(REINFORCE and A2C share the update; they differ in the advantages, lambda = 1 versus lambda < 1, and in their
batch presets, see ``config.ALGO_DEFAULTS``.) Every algorithm then fits the value baseline by regression on the
returns, ``epochs x minibatches`` Adam steps.
"""

from __future__ import annotations

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
    """A flattened rollout (B = T * N rows) with its estimates."""

    obs: Tensor  # (B, O)
    actions: Tensor  # (B,) or (B, D)
    old_logprobs: Tensor  # (B,)
    advantages: Tensor  # (B,)
    returns: Tensor  # (B,) value targets

    def rows(self, index: Tensor) -> "Batch":
        return Batch(self.obs[index], self.actions[index], self.old_logprobs[index], self.advantages[index], self.returns[index])


def _normalized(advantages: Tensor, enabled: bool) -> Tensor:
    # a per-batch scale makes one learning rate fit returns of any size (Andrychowicz et al. 2021, section 3.5)
    if not enabled or advantages.numel() < 2:
        return advantages
    return (advantages - advantages.mean()) / (advantages.std() + 1e-8)


def _step(optimizer: torch.optim.Optimizer, loss: Tensor, module: nn.Module, max_grad_norm: float) -> float:
    """One optimiser step; returns the gradient norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(module.parameters(), max_grad_norm if max_grad_norm > 0 else float("inf"))
    optimizer.step()
    return float(norm)


def _minibatches(size: int, count: int, generator: torch.Generator) -> list[Tensor]:
    return list(torch.randperm(size, generator=generator).chunk(count))


def fit_value(learner: Learner, batch: Batch, cfg: ControlConfig, generator: torch.Generator) -> dict[str, float]:
    """Regress V(s) on the returns: ``epochs x minibatches`` steps of 1/2 (V - R)^2."""
    metrics: dict[str, float] = {}
    for _ in range(cfg.epochs):
        for index in _minibatches(len(batch.returns), cfg.minibatches, generator):
            loss, metrics = value_loss(learner.value_net(batch.obs[index]), batch.returns[index])
            _step(learner.value_opt, loss, learner.value_net, cfg.max_grad_norm)
    return {"value_loss": float(loss.detach()), "explained_variance": metrics["explained_variance"]}


def vanilla_update(learner: Learner, batch: Batch, cfg: ControlConfig, generator: torch.Generator) -> dict[str, float]:
    """One step of the score-function estimator with an entropy bonus (REINFORCE with baseline / A2C)."""
    family = learner.policy.family
    params = learner.policy(batch.obs)
    loss, _ = policy_loss(family.log_prob(params, batch.actions), _normalized(batch.advantages, cfg.normalize_advantages))
    entropy = family.entropy(params).mean()
    grad_norm = _step(learner.policy_opt, loss - cfg.ent_coef * entropy, learner.policy, cfg.max_grad_norm)
    return {"policy_loss": float(loss.detach()), "entropy": float(entropy.detach()), "grad_norm": grad_norm, **fit_value(learner, batch, cfg, generator)}


def ppo_update(learner: Learner, batch: Batch, cfg: ControlConfig, generator: torch.Generator) -> dict[str, float]:
    """Several epochs of minibatch steps on the clipped surrogate, then the value fit."""
    family = learner.policy.family
    clip_fractions, kls = [], []
    for _ in range(cfg.epochs):
        for index in _minibatches(len(batch.returns), cfg.minibatches, generator):
            mb = batch.rows(index)
            params = learner.policy(mb.obs)
            loss, metrics = policy_loss(family.log_prob(params, mb.actions), _normalized(mb.advantages, cfg.normalize_advantages),
                                        old_logprobs=mb.old_logprobs, clip_eps_low=cfg.clip_eps)
            entropy = family.entropy(params).mean()
            _step(learner.policy_opt, loss - cfg.ent_coef * entropy, learner.policy, cfg.max_grad_norm)
            clip_fractions.append(metrics["clip_fraction"])
            kls.append(metrics["approx_kl"])
    return {"policy_loss": float(loss.detach()), "entropy": float(entropy.detach()), "clip_fraction": sum(clip_fractions) / len(clip_fractions),
            "approx_kl": kls[-1], **fit_value(learner, batch, cfg, generator)}


def npg_update(learner: Learner, batch: Batch, cfg: ControlConfig, generator: torch.Generator) -> dict[str, float]:
    """Natural gradient ascent on the importance-sampled surrogate inside a KL trust region.

        L(theta) = mean[ pi_theta(a|s) / pi_old(a|s) * A ] + c_H * H         (TRPO, Schulman et al. 2015, eq. 14)
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
        return (ratio * advantages).mean() + cfg.ent_coef * family.entropy(params).mean()

    objective = surrogate()
    gradient = flat_grad(objective, params_list)  # (P,)
    fvp = fisher_vector_product(family.kl(old_params, policy(batch.obs)).mean(), params_list, cfg.damping)
    direction = conjugate_gradient(fvp, gradient, cfg.cg_iters)
    full_step = trust_region_step(direction, fvp(direction), cfg.max_kl)
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
    return {"surrogate": float(objective.detach()), "step_fraction": fraction, "kl": kl, "entropy": entropy,
            **fit_value(learner, batch, cfg, generator)}


UPDATES: dict[str, Callable[[Learner, Batch, ControlConfig, torch.Generator], dict[str, float]]] = {
    "reinforce": vanilla_update,
    "a2c": vanilla_update,
    "ppo": ppo_update,
    "npg": npg_update,
}
"""The update of each ``--algo``, by name."""
