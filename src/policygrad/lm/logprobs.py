"""The log-probability and entropy of each sampled token, from the logits, in one fused pass over the vocabulary.

For logits z over a vocabulary of V tokens at temperature tau, and the drawn token y:

    s = z / tau,        L = logsumexp(s),        log pi(j) = s_j - L,        pi(j) = exp(s_j - L)
    logprob = s_y - L                                                   (the policy-gradient term's log pi(y))
    entropy = - sum_j pi(j) log pi(j) = L - sum_j pi(j) s_j             (the entropy bonus's H(pi))

and their gradients, with upstream gradients g (of the log-prob) and h (of the entropy):

    d logprob / d s_j = [j = y] - pi(j)
    d entropy / d s_j = - pi(j) (log pi(j) + H)
    d / d z_j         = ( g ([j = y] - pi(j)) - h pi(j) (log pi(j) + H) ) / tau

The plain path (``log_softmax``, ``gather``, ``p * logp``) runs about eight passes over a (M, T, V) tensor per update
(a float32 copy, the log-softmax, its exponential, a product, the gather's zero-filled backward, the log-softmax's
backward, a cast back) and keeps a float32 (M, T, V) tensor alive for the backward pass: at GRPO's 16 x 32 x 49,152
that is 100 MB per pass, and the passes took 0.5 s of a 3 s update on a 2-core CPU (benchmarks/NOTES.md, change 13).
Here the forward pass reads the logits once and writes (M, T) numbers, the backward pass reads them once and writes
the gradient once, and both work through the rows a slice at a time, so no float32 copy of the whole tensor exists.

Entries with probability 0 (a logit of -inf) contribute 0 to the entropy and its gradient, as in
:func:`policygrad.regularizers.entropy`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["token_logprobs"]

SLICE_ELEMENTS = 1 << 20  # float32 numbers per slice of rows (4 MB): the working set of one pass, not the tensor's


def _slices(rows: int, width: int) -> list[slice]:
    size = max(1, SLICE_ELEMENTS // max(width, 1))
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


def _scaled(logits: Tensor, temperature: float) -> Tensor:
    s = logits.float()  # (r, V), a new tensor unless the logits are float32
    return s / temperature if temperature != 1.0 else s


def _log_pi(s: Tensor, lse: Tensor) -> Tensor:
    """log pi = s - L, (r, V) float32, with -inf (pi = 0) raised to the lowest float, so that pi x log pi is 0, not
    0 x -inf = NaN."""
    return (s - lse[:, None]).clamp_(min=torch.finfo(torch.float32).min)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor, temperature: float):
        # logits: (R, V) any float dtype; tokens: (R,) long  ->  (R,) log-probs, (R,) entropies; float32
        rows, width = logits.shape
        logprobs, entropies, lse = (logits.new_empty(rows, dtype=torch.float32) for _ in range(3))
        for part in _slices(rows, width):
            s = _scaled(logits[part], temperature)
            lse[part] = torch.logsumexp(s, dim=-1)
            log_pi = _log_pi(s, lse[part])
            logprobs[part] = log_pi.gather(1, tokens[part, None]).squeeze(1)
            entropies[part] = -(log_pi.exp() * log_pi).sum(-1)
        ctx.save_for_backward(logits, tokens, lse, entropies)
        ctx.temperature = temperature
        return logprobs, entropies

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor | None, h: Tensor | None):
        # g, h: (R,) gradients of the log-probs and of the entropies (None when one is not used)
        logits, tokens, lse, entropies = ctx.saved_tensors
        if g is None and h is None:
            return None, None, None
        tau = ctx.temperature
        grad = torch.empty_like(logits)  # (R, V) in the logits' dtype, as the plain path's cast back gives
        for part in _slices(*logits.shape):
            log_pi = _log_pi(_scaled(logits[part], tau), lse[part])  # (r, V)
            pi = log_pi.exp()
            if h is None:  # - g pi
                out = pi.mul_(-g[part, None])
            else:  # - h pi (log pi + H)  [- g pi]
                out = log_pi.add_(entropies[part, None]).mul_(pi).mul_(-h[part, None])
                if g is not None:
                    out.sub_(pi.mul_(g[part, None]))
            if g is not None:  # + g [j = y]
                out.scatter_add_(1, tokens[part, None], g[part, None])
            grad[part] = out.div_(tau) if tau != 1.0 else out
        return grad, None, None


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(..., V) logits and (...) token ids -> (log pi(y), H(pi)), each (...) float32; see the module's equations.

    The same values as ``log_softmax(z / tau).gather(y)`` and :func:`policygrad.regularizers.entropy` of ``z / tau``,
    and the same gradients (tested to float32 rounding), from one pass over the vocabulary each way. The gradient
    to ``logits`` has their dtype. Differentiable once (no double backward).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    shape = tokens.shape
    flat_logits = logits.reshape(-1, logits.shape[-1])  # (R, V)
    logprobs, entropies = _TokenLogprobs.apply(flat_logits, tokens.reshape(-1), float(temperature))
    return logprobs.view(shape), entropies.view(shape)
