"""Policies and value networks for classic control: a categorical policy for Discrete actions, a diagonal Gaussian with
a learned, state-independent log-std for Box actions, and an MLP state-value baseline.

A policy network maps observations to *distribution parameters* (a plain tensor); the distribution's math lives in
two small stateless families, :class:`Categorical` and :class:`Gaussian`, chosen by name from :data:`FAMILIES`. Keeping
the parameters a tensor makes the old policy of PPO and NPG just a detached copy of it.

Letters: B observations, O observation size, A actions (Discrete), D action dimensions (Box).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policygrad.regularizers import entropy as categorical_entropy

__all__ = ["Categorical", "Gaussian", "FAMILIES", "mlp", "Policy", "ValueNet"]

_LOG_2PI = math.log(2.0 * math.pi)


class Categorical:
    """Softmax distribution over A actions; parameters are the logits (B, A), actions are integer indices (B,)."""

    @staticmethod
    def sample(params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return torch.multinomial(F.softmax(params, dim=-1), 1, generator=generator).squeeze(-1)  # (B,)

    @staticmethod
    def mode(params: Tensor) -> Tensor:
        return params.argmax(-1)  # (B,)

    @staticmethod
    def log_prob(params: Tensor, actions: Tensor) -> Tensor:
        """log pi(a|s): (B, A), (B,) -> (B,)."""
        return F.log_softmax(params, dim=-1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def entropy(params: Tensor) -> Tensor:
        return categorical_entropy(params)  # (B,)

    @staticmethod
    def kl(old_params: Tensor, params: Tensor) -> Tensor:
        """KL(old || new) = sum_a p_old(a) (log p_old(a) - log p_new(a)), per state: (B,)."""
        old_logp = F.log_softmax(old_params, dim=-1)
        return (old_logp.exp() * (old_logp - F.log_softmax(params, dim=-1))).sum(-1)


class Gaussian:
    """Diagonal Gaussian; parameters are ``[mean | log_std]`` concatenated (B, 2D), actions are real vectors (B, D)."""

    @staticmethod
    def _split(params: Tensor) -> tuple[Tensor, Tensor]:
        return params.chunk(2, dim=-1)  # (B, D) each

    @staticmethod
    def sample(params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mean, log_std = Gaussian._split(params)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return mean + log_std.exp() * noise  # (B, D)

    @staticmethod
    def mode(params: Tensor) -> Tensor:
        return Gaussian._split(params)[0]

    @staticmethod
    def log_prob(params: Tensor, actions: Tensor) -> Tensor:
        """log N(a; mu, sigma^2) summed over the D independent dimensions: -> (B,)."""
        mean, log_std = Gaussian._split(params)
        z = (actions - mean) / log_std.exp()
        return (-0.5 * z**2 - log_std - 0.5 * _LOG_2PI).sum(-1)

    @staticmethod
    def entropy(params: Tensor) -> Tensor:
        """H = sum_d (log sigma_d + 1/2 log(2 pi e)): -> (B,)."""
        log_std = Gaussian._split(params)[1]
        return (log_std + 0.5 * (_LOG_2PI + 1.0)).sum(-1)

    @staticmethod
    def kl(old_params: Tensor, params: Tensor) -> Tensor:
        """KL(N0 || N1) = sum_d [ log(s1/s0) + (s0^2 + (m0 - m1)^2) / (2 s1^2) - 1/2 ], per state: (B,)."""
        m0, log_s0 = Gaussian._split(old_params)
        m1, log_s1 = Gaussian._split(params)
        var0, var1 = (2 * log_s0).exp(), (2 * log_s1).exp()
        return (log_s1 - log_s0 + (var0 + (m0 - m1) ** 2) / (2 * var1) - 0.5).sum(-1)


FAMILIES: dict[str, type] = {"categorical": Categorical, "gaussian": Gaussian}
"""Action distributions by the name of ``--policy``."""


def mlp(sizes: list[int], output_gain: float, dtype: torch.dtype | None = None) -> nn.Sequential:
    """Tanh MLP with orthogonal initialisation: gain sqrt(2) on hidden layers and ``output_gain`` on the last.
    Its parameters are ``dtype`` (None: torch's default dtype).

    A small output gain (0.01 for a policy) starts the policy near uniform / zero-mean, which the PPO
    implementation study found to matter (Andrychowicz et al. 2021, "What Matters in On-Policy RL?", section 3.2).
    """
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(fan_in, fan_out, dtype=dtype)
        last = i == len(sizes) - 2
        nn.init.orthogonal_(linear.weight, output_gain if last else math.sqrt(2.0))
        nn.init.zeros_(linear.bias)
        layers += [linear] if last else [linear, nn.Tanh()]
    return nn.Sequential(*layers)


class Policy(nn.Module):
    """Observation (B, O) -> distribution parameters: logits (B, A) or ``[mean | log_std]`` (B, 2D).

    The Gaussian log-std is one learned vector shared by all states (Schulman et al. 2015, TRPO; the PPO default),
    initialised to ``log_std_init``. The parameters are ``dtype`` (None: torch's default dtype); the trainer builds
    float32 networks (``train.NETWORK_DTYPE``), a test may build float64 ones.
    """

    def __init__(
        self,
        obs_size: int,
        action_size: int,
        hidden: tuple[int, ...],
        family: str,
        log_std_init: float = 0.0,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.family_name = family
        self.family = FAMILIES[family]
        self.body = mlp([obs_size, *hidden, action_size], output_gain=0.01, dtype=dtype)
        if family == "gaussian":
            self.log_std = nn.Parameter(torch.full((action_size,), float(log_std_init), dtype=dtype))

    def forward(self, obs: Tensor) -> Tensor:
        out = self.body(obs)
        if self.family_name == "gaussian":
            out = torch.cat([out, self.log_std.expand_as(out)], dim=-1)  # (B, 2D)
        return out


class ValueNet(nn.Module):
    """State-value baseline V(s): (B, O) -> (B,), with parameters of ``dtype`` (None: torch's default dtype)."""

    def __init__(self, obs_size: int, hidden: tuple[int, ...], dtype: torch.dtype | None = None):
        super().__init__()
        self.body = mlp([obs_size, *hidden, 1], output_gain=1.0, dtype=dtype)

    def forward(self, obs: Tensor) -> Tensor:
        return self.body(obs).squeeze(-1)
