"""Attention for the update's short sequences: grouped-query attention as two batched matrix products.

The update runs the policy over a few hundred tokens per sequence (a 128-token passage and its instruction, then
32 completion tokens). At these lengths PyTorch's CPU flash-attention kernel spends its time on per-block overhead,
not arithmetic, and its backward pass is the second-largest cost of the update after the linear layers
(benchmarks/NOTES.md). Plain matrix products do the same work several times faster here:

    S = (Q K^T) * scale + mask          Q: (B, Hk, r*Tq, D)   the r = Hq/Hk query heads that share a key/value
                                                               head stacked along the query axis, so K and V are
                                                               never copied once per query head (no repeat_kv)
    P = softmax(S) in float32           (B, Hk, r*Tq, Tk)
    O = P V                             (B, Hk, r*Tq, D) -> (B, Tq, Hq, D)

This is the textbook attention of Vaswani et al. 2017 (eq. 1) with grouped-query heads (Ainslie et al. 2023); the
softmax is taken in float32 under bfloat16 autocast, as transformers' eager attention does. It is registered with
transformers' ``AttentionInterface`` under :data:`NAME` and switched on only inside :func:`grouped_attention`, for
the update's forward and backward; generation keeps the model's own attention, and nothing about the model or its
saved config changes. Masks are built exactly as for ``sdpa`` (a boolean "may attend" mask, or None for plainly
causal), so both implementations see the same positions; the equality is tested in tests/lm/test_fast_paths.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["NAME", "grouped_attention", "grouped_attention_forward"]

NAME = "policygrad_grouped"
"""The name under which :func:`grouped_attention_forward` is registered with transformers."""


def grouped_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function interface: ``query`` (B, Hq, Tq, D), ``key``/``value`` (B, Hk, Tk, D),
    ``attention_mask`` a boolean (B or 1, 1, Tq, Tk) "may attend" mask, an additive float mask, or None; returns
    ((B, Tq, Hq, D), None).

    A query row with nothing to attend to (a left-padding position) gets a uniform average instead of NaN; its
    output is never used.
    """
    if dropout:
        raise ValueError(f"{NAME} attention has no dropout (the policy runs in eval mode), got {dropout}")
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = causal and q_len > 1 and attention_mask is None  # sdpa's own rule: a mask, when given, says it all
    if causal and key.shape[2] > q_len:  # prefill into an empty static cache: sdpa crops the keys the same way
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    kv_len = key.shape[2]
    # (B, Hq, Tq, D) -> (B, Hk, r*Tq, D): query head h = k*r + j reads key/value head k (repeat_kv's layout)
    q = query.reshape(batch, kv_heads, group * q_len, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)).float().view(batch, kv_heads, group, q_len, kv_len) * scale
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # (B|1, 1, Tq, Tk), True: may attend
        scores = scores.masked_fill(~attention_mask.unsqueeze(2), torch.finfo(scores.dtype).min)
    elif attention_mask is not None:  # an additive float mask
        scores = scores + attention_mask.float().unsqueeze(2)
    elif causal:  # upper-left aligned, as sdpa's is_causal (here Tq == Tk)
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(batch, kv_heads, group * q_len, kv_len)
    out = torch.matmul(probs, value)  # (B, Hk, r*Tq, D)
    return out.view(batch, heads, q_len, dim).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, grouped_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


@contextmanager
def grouped_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model``'s attention layers with :func:`grouped_attention_forward` inside the block, where the model
    uses transformers' ``sdpa`` attention (others, e.g. a model loaded with ``flash_attention_2`` on a GPU, keep
    theirs); the model's own setting is back on exit, also after an error."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    if previous != "sdpa":
        yield
        return
    _register()
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
