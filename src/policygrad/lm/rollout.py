"""Batched sampling: G completions for each of B prompts, with the log-probabilities the update needs.

Letters used throughout the LM code:
    B  prompts in a batch           G  completions per prompt (the group)     N = B * G  sequences
    P  prompt tokens (left-padded)  T  completion tokens (right-padded)       V  vocabulary size

Layout: sequence ``i`` answers prompt ``i // G``; a group is G consecutive rows, the layout
:func:`policygrad.advantages.group_advantages` expects. Prompts are LEFT-padded so that every prompt ends at column
P and generation starts at the same column for all rows; completions are right-padded after their first EOS.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from policygrad.lm.logprobs import token_logprobs

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "Rollout",
    "assemble",
    "autocast_context",
    "completion_logprobs",
    "completion_mask",
    "draw",
    "encode_prompts",
    "eos_token_ids",
    "generate",
    "join_groups",
    "micro_batches",
    "pad_token_id",
    "rollout_logprobs",
    "sample",
    "sequence_logprobs",
    "top_p_filter",
]


@dataclass
class Rollout:
    """One batch of sampled completions. Tensors live on the model's device."""

    prompts: list[str]  # (N,) the raw prompt of each row (before chat formatting), repeated G times
    prompt_ids: Tensor  # (N, P) left-padded
    prompt_mask: Tensor  # (N, P) 1 for real prompt tokens
    completion_ids: Tensor  # (N, T) right-padded
    completion_mask: Tensor  # (N, T) 1 up to and including the first EOS
    completions: list[str]  # (N,) decoded masked tokens, special tokens skipped
    logprobs: Tensor | None  # (N, T) log pi_old of the sampled tokens (0 where masked), no grad; None if not scored
    group_size: int
    truncated: Tensor  # (N,) bool: cut off by max_new_tokens, i.e. no EOS among the completion's tokens
    sampler_logprobs: Tensor | None = None  # (N, T) log of the probability each token was drawn with, or None

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)  # (N, P + T)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)  # (N, P + T)

    @property
    def completion_start(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def completion_lengths(self) -> Tensor:
        return self.completion_mask.sum(-1)  # (N,)

    def to(self, device: torch.device | str) -> Rollout:
        """This rollout with its tensors on ``device`` (the CPU, to pickle it for another rank)."""
        names = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "logprobs", "truncated")
        names += ("sampler_logprobs",)
        moved = {name: getattr(self, name).to(device) for name in names if getattr(self, name) is not None}
        return dataclasses.replace(self, **moved)

    def widened(self, width: int) -> Rollout:
        """This rollout with its completions right-padded to ``width`` tokens (mask 0, so nothing that counts
        changes): under FSDP every rank must run the same forward passes (:mod:`policygrad.lm.fsdp`)."""
        extra = width - self.completion_ids.shape[1]
        if extra <= 0:
            return self
        names = ("completion_ids", "completion_mask", "logprobs", "sampler_logprobs")
        padded = {name: F.pad(getattr(self, name), (0, extra)) for name in names if getattr(self, name) is not None}
        return dataclasses.replace(self, **padded)

    def rows(self, rows: slice) -> dict[str, Tensor]:
        """The inputs of :func:`completion_logprobs` for a micro-batch of consecutive rows: each distinct prompt
        once, and the completion rows with the index of their prompt."""
        first, stop, _ = rows.indices(self.completion_ids.shape[0])
        group = torch.arange(first, stop, device=self.prompt_ids.device) // self.group_size  # (M,) prompt of a row
        distinct = torch.unique_consecutive(group)  # (U,)
        return {
            "prompt_ids": self.prompt_ids[distinct * self.group_size],  # (U, P)
            "prompt_mask": self.prompt_mask[distinct * self.group_size],
            "completion_ids": self.completion_ids[rows],  # (M, T)
            "completion_mask": self.completion_mask[rows],
            "prompt_index": group - distinct[0],  # (M,) in 0..U-1
        }


def join_groups(picks: Sequence[tuple[Rollout, int]], pad_id: int) -> Rollout:
    """A rollout made of chosen groups of other rollouts, in the order given: ``(rollout, g)`` is group ``g`` of
    ``rollout`` (its rows ``g * G .. g * G + G - 1``). Prompts are left-padded again to the longest P among the picks
    and completions right-padded to the longest T (with ``pad_id``, mask 0), so every row reads as it did before.
    All rollouts must have the same G, and log-probs either everywhere or nowhere.
    """
    group_size = picks[0][0].group_size
    if any(rollout.group_size != group_size for rollout, _ in picks):
        raise ValueError("join_groups: every rollout must have the same group size")
    width_p = max(rollout.prompt_ids.shape[1] for rollout, _ in picks)
    width_t = max(rollout.completion_ids.shape[1] for rollout, _ in picks)

    def padded(tensor: Tensor, width: int, value: float, left: bool) -> Tensor:
        extra = width - tensor.shape[1]
        return F.pad(tensor, (extra, 0) if left else (0, extra), value=value)

    columns: dict[str, list[Tensor]] = {name: [] for name in ("pi", "pm", "ci", "cm", "lp", "sl", "tr")}
    prompts: list[str] = []
    completions: list[str] = []
    for rollout, group in picks:
        rows = slice(group * group_size, (group + 1) * group_size)
        columns["pi"].append(padded(rollout.prompt_ids[rows], width_p, pad_id, left=True))
        columns["pm"].append(padded(rollout.prompt_mask[rows], width_p, 0, left=True))
        columns["ci"].append(padded(rollout.completion_ids[rows], width_t, pad_id, left=False))
        columns["cm"].append(padded(rollout.completion_mask[rows], width_t, 0, left=False))
        if rollout.logprobs is not None:
            columns["lp"].append(padded(rollout.logprobs[rows], width_t, 0.0, left=False))
        if rollout.sampler_logprobs is not None:
            columns["sl"].append(padded(rollout.sampler_logprobs[rows], width_t, 0.0, left=False))
        columns["tr"].append(rollout.truncated[rows])
        prompts += rollout.prompts[rows]
        completions += rollout.completions[rows]
    if len(columns["lp"]) not in (0, len(picks)) or len(columns["sl"]) not in (0, len(picks)):
        raise ValueError("join_groups: some rollouts have log-probs and some do not")
    return Rollout(
        prompts=prompts,
        prompt_ids=torch.cat(columns["pi"]),  # (N, P)
        prompt_mask=torch.cat(columns["pm"]),
        completion_ids=torch.cat(columns["ci"]),  # (N, T)
        completion_mask=torch.cat(columns["cm"]),
        completions=completions,
        logprobs=torch.cat(columns["lp"]) if columns["lp"] else None,
        group_size=group_size,
        truncated=torch.cat(columns["tr"]),
        sampler_logprobs=torch.cat(columns["sl"]) if columns["sl"] else None,
    )


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token id that ends a completion: the tokenizer's EOS and the generation config's (instruct models often
    list their end-of-turn token there, e.g. ``<|im_end|>``)."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, configured):
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    if not ids:
        raise ValueError("the tokenizer and model have no EOS token, so completions could never end")
    return sorted(ids)


def completion_mask(completion_ids: Tensor, eos_ids: Sequence[int]) -> Tensor:
    """1 for the tokens of each completion up to and including its first EOS, 0 after.

        mask_t = 1  iff  no EOS among tokens 0 .. t-1

    A row without EOS (cut off by max_new_tokens) is all ones. The EOS itself is kept because choosing to stop is
    an action the policy took and is rewarded or punished for.

    Args:
        completion_ids: (N, T).
        eos_ids: token ids that end a completion.
    Returns:
        (N, T) long mask.
    """
    is_eos = torch.isin(completion_ids, torch.as_tensor(list(eos_ids), device=completion_ids.device))  # (N, T)
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # (N, T): EOS count strictly before t
    return (eos_before == 0).long()


def sequence_logprobs(
    model: PreTrainedModel,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_start: int,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Log-probabilities and entropies of the completion tokens under ``model``, in one forward pass.

        logprobs[i, t]  = log softmax(z_{i, s+t-1} / tau)[x_{i, s+t}]      s = completion_start, tau = temperature
        entropies[i, t] = H(softmax(z_{i, s+t-1} / tau))

    The logits at position j predict token j + 1, hence the shift by one. Dividing by the sampling temperature makes
    these the log-probs of the distribution the tokens were actually drawn from (top-p truncation is not modelled,
    the usual approximation). Position ids are counted from the first real token, as ``generate`` counts them for
    left-padded rows, so the values match what sampling saw. Gradients flow when called with grad enabled.

    Args:
        model: a causal LM returning ``.logits``.
        input_ids: (N, P + T) prompt then completion.
        attention_mask: (N, P + T).
        completion_start: P, the column where completions begin.
        temperature: tau > 0.
    Returns:
        (logprobs, entropies), each (N, T), float32; values at masked positions are meaningless (mask them).
    """
    completion_len = input_ids.shape[1] - completion_start
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (N, P + T)
    # use_cache False: one pass over whole sequences needs no key/value cache (and a checkpointed layer refuses one)
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "use_cache": False,
    }
    if _accepts_logits_to_keep(model):
        # only the last T + 1 positions' logits: skips the (N, P, V) prompt logits, the largest tensor by far
        kwargs["logits_to_keep"] = completion_len + 1
    logits = model(**kwargs).logits  # (N, T + 1, V) or (N, P + T, V)
    return token_logprobs(logits[:, -(completion_len + 1) : -1], input_ids[:, completion_start:], temperature)


def autocast_context(device: torch.device | str, dtype: torch.dtype | None) -> torch.autocast:
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a disabled one (a no-op) when ``dtype`` is None.

    Weights stay float32 (the master copy the optimiser updates); only matmuls run in the lower precision.
    """
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _accepts_logits_to_keep(model: PreTrainedModel) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _cache_argument(model: PreTrainedModel) -> str:
    """The name ``forward`` takes the key/value cache under: ``cache`` since transformers 5.24 (which warns on the
    old name and drops it in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(out):
    """The key/value cache a forward pass returned, under either name (see :func:`_cache_argument`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """Chat-format (when the model has a template) and left-pad prompts: -> (ids (B, P), mask (B, P)).

    The chat form already holds the template's special tokens as text, so it is encoded without adding more.
    """
    from policygrad.lm.models import format_prompt, has_chat_template

    texts = [format_prompt(tokenizer, p) for p in prompts]
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # every prompt must end where generation starts
    try:
        encoded = tokenizer(
            texts, return_tensors="pt", padding=True, add_special_tokens=not has_chat_template(tokenizer)
        )
    finally:
        tokenizer.padding_side = previous_side
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


def _positions(attention_mask: Tensor) -> Tensor:
    """Position ids counted from each row's first real token (left padding gets 0), as ``generate`` counts them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _prefill(
    model: PreTrainedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    prompt_index: Tensor,
    prompt_embeds: Tensor | None = None,
    copy: bool = True,
):
    """One forward pass over the U distinct prompts, its key/value cache then copied out to the M rows (``copy``)
    or left with one row per prompt.

    Args:
        prompt_ids, prompt_mask: (U, P), left-padded.
        prompt_index: (M,) which prompt each row continues.
        prompt_embeds: (U, P, D) the prompts' input embeddings, when the caller has looked them up already.
    Returns:
        (logits (M, V) at each prompt's last position, i.e. of the first completion token; the cache, M rows or U)
    """
    kwargs = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    inputs = {"input_ids": prompt_ids} if prompt_embeds is None else {"inputs_embeds": prompt_embeds}
    out = model(**inputs, attention_mask=prompt_mask, position_ids=_positions(prompt_mask), use_cache=True, **kwargs)
    cache = _returned_cache(out)
    if copy:
        cache.reorder_cache(prompt_index)  # (U, ...) -> (M, ...); autograd flows back to the shared prompt states
    return out.logits[:, -1].index_select(0, prompt_index), cache  # (M, V)


def completion_logprobs(
    model: PreTrainedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    prompt_index: Tensor,
    temperature: float = 1.0,
    embed_once: bool = True,
) -> tuple[Tensor, Tensor]:
    """:func:`sequence_logprobs` with each prompt's forward pass done ONCE for the G completions that share it.

    The G rows of a group have the same prompt, so its hidden states, keys and values are the same G times over.
    This runs the U distinct prompts once, then runs only the completion tokens on top of them; gradients flow back
    into the one prompt pass. With P prompt and T completion tokens the transformer sees U*P + M*T tokens instead
    of M*(P + T): for GRPO's G = 8, P = 160, T = 32 that is 3.7x fewer. Same function, same values up to
    floating-point reordering (tested against :func:`sequence_logprobs`).

    Under SDPA or eager attention the completions of a prompt are packed end to end into ONE row after it
    (:class:`Packing`), each without the padding after its end, and a mask lets each token see the prompt and its
    own completion's earlier tokens only. So no work goes to the padding of completions shorter than the longest,
    and attention reads each prompt's keys and values where the prompt pass left them, instead of a copy per
    completion and another per query head (benchmarks/NOTES.md, change 21). Other attention kernels, and batches
    whose packed mask would pass :data:`PACKED_MASK_LIMIT` (long completions), get one row per completion on copies
    of the cache.

        logprobs[i, t]  = log softmax(z_{i, t} / tau)[y_{i, t}]      z_{i, 0} from the prompt's last position
        entropies[i, t] = H(softmax(z_{i, t} / tau))

    Args:
        prompt_ids, prompt_mask: (U, P) distinct prompts, left-padded.
        completion_ids, completion_mask: (M, T); the mask is 1 on a prefix of each row (:func:`completion_mask`).
        prompt_index: (M,) long, the prompt row (in 0..U-1) that completion row i continues.
        temperature: tau > 0.
        embed_once: look up the prompt and completion tokens' embeddings in one call, outside the model's forward
            (faster, see below); False lets each forward pass look up its own, for FSDP, whose root unit reduces
            the embedding's gradient when the forward passes' backward ends (:mod:`policygrad.lm.fsdp`).
    Returns:
        (logprobs, entropies), each (M, T), float32; values at masked positions are meaningless (mask them).
    """
    packing = Packing.of(model, prompt_mask, completion_mask, prompt_index)
    fed = completion_ids[:, :-1] if packing is None else packing.pack(completion_ids[:, :-1])  # (M or U, T-1 or W)
    if embed_once:
        # one embedding lookup for the prompt and completion tokens: its backward zero-fills a vocabulary-sized
        # gradient (V x D, 113 MB for SmolLM2), which two lookups would do twice (benchmarks/NOTES.md)
        embeds = model.get_input_embeddings()(torch.cat([prompt_ids.reshape(-1), fed.reshape(-1)]))  # (U*P+..., D)
        prompt_embeds, fed_embeds = embeds.split([prompt_ids.numel(), fed.numel()])
        width = embeds.shape[-1]  # D, named: T = 1 leaves no completion token to infer it from
        prompt_embeds = prompt_embeds.view(*prompt_ids.shape, width)
        fed_inputs = {"inputs_embeds": fed_embeds.view(*fed.shape, width)}
    else:
        prompt_embeds, fed_inputs = None, {"input_ids": fed}
    first, cache = _prefill(model, prompt_ids, prompt_mask, prompt_index, prompt_embeds, copy=packing is None)
    logprobs, entropies = token_logprobs(first[:, None], completion_ids[:, :1], temperature)  # (M, 1) each
    if fed.shape[1] == 0:  # T = 1, or every completion one token long
        return F.pad(logprobs, (0, completion_ids.shape[1] - 1)), F.pad(entropies, (0, completion_ids.shape[1] - 1))
    if packing is None:  # one row per completion, on a copy of its prompt's cache
        attention = torch.cat([prompt_mask.index_select(0, prompt_index), completion_mask[:, :-1]], dim=1)
        where = {"attention_mask": attention, "position_ids": _positions(attention)[:, prompt_ids.shape[1] :]}
        targets = completion_ids[:, 1:]
    else:  # one row per prompt, its completions end to end: (U, W)
        where = {"attention_mask": packing.attention, "position_ids": packing.positions}
        targets = packing.pack(completion_ids[:, 1:])
    rest = model(**fed_inputs, **where, use_cache=True, **{_cache_argument(model): cache}).logits  # (rows, width, V)
    # the two parts' log-probs joined, not their logits: no (M, T, V) copy in the forward pass (100 MB at GRPO's
    # 16 x 32 x 49,152 in float32), and none of its gradient in the backward (benchmarks/NOTES.md, change 19)
    more_logprobs, more_entropies = token_logprobs(rest, targets, temperature)  # (M, T - 1) or (U, W) each
    if packing is not None:
        more_logprobs, more_entropies = packing.unpack(more_logprobs), packing.unpack(more_entropies)  # (M, T - 1)
    return torch.cat([logprobs, more_logprobs], 1), torch.cat([entropies, more_entropies], 1)


PACKABLE_ATTENTION = frozenset({"sdpa", "eager"})
"""Attention implementations that take :class:`Packing`'s 4-D mask as it is: a float mask added to the scores (0
attends, the lowest float32 does not). Float, not boolean: SDPA's CPU kernel turns a boolean mask into a float one
in every layer and keeps each copy for the backward pass; a float mask is kept once."""

PACKED_MASK_LIMIT = 1 << 24
"""The most entries :class:`Packing`'s mask may have (64 MB in float32); a batch whose mask would be larger gets one
row per completion instead. A packed row's attention grows with the square of its length, C*(T-1) for C completions
of T tokens, against C*T*(P+T) for C separate rows: it pays where completions are short (GRPO on this project's
tasks: U = 2, W <= 752, a 1.4 MB mask) and would not for thousands of tokens per completion, where attention is most
of the work and the mask alone would take gigabytes."""


@dataclass(frozen=True)
class Packing:
    """Where each completion token goes when a prompt's completions run end to end in one row after it.

    Completion row i (of prompt u = prompt_index[i], with L_i real tokens) feeds its tokens 0 .. L_i - 2 (the last
    one predicts nothing that counts), F_i = max(L_i - 1, 0) of them, at columns o_i .. o_i + F_i - 1 of row u, where
    o_i counts the fed tokens of prompt u's earlier rows; W is the longest row. For the token fed at column c of row
    u, from completion i at its offset t = c - o_i, and key k:

        mask[u, 0, c, k] = prompt_mask[u, k]                     k < P    (the prompt)
                         = [k - P holds completion i] [t' <= t]   k >= P   (its own tokens up to itself: t' its offset)
        position[u, c]   = (real prompt tokens of u) + t

    which are the mask and positions completion i has in its own row after a copy of its prompt, so every query sees
    the same keys at the same positions; columns past a row's last token see the prompt only.

    Fields: ``index`` (M, T-1) the column in the flattened (U, W) of completion token (i, t), ``valid`` (M, T-1)
    whether it is fed, ``attention`` (U, 1, W, P + W) float32, ``positions`` (U, W).
    """

    index: Tensor
    valid: Tensor
    attention: Tensor
    positions: Tensor

    @classmethod
    def of(
        cls, model: PreTrainedModel, prompt_mask: Tensor, completion_mask: Tensor, prompt_index: Tensor
    ) -> Packing | None:
        """The packing of these rows, or None where the model's attention implementation takes no 4-D mask or the
        mask would pass :data:`PACKED_MASK_LIMIT`."""
        if getattr(model.config, "_attn_implementation", None) not in PACKABLE_ATTENTION:
            return None
        (rows, width), prompts, device = completion_mask.shape, prompt_mask.shape[0], completion_mask.device
        fed = (completion_mask.sum(-1) - 1).clamp(0, width - 1)  # (M,) F_i
        order = torch.sort(prompt_index, stable=True).indices  # rows grouped by prompt, each prompt's in order
        ends = torch.empty_like(fed)
        ends[order] = fed[order].cumsum(0)  # running total over the grouped rows
        totals = torch.zeros(prompts, dtype=fed.dtype, device=device).index_add_(0, prompt_index, fed)  # (U,)
        offset = ends - fed - (totals.cumsum(0) - totals)[prompt_index]  # (M,) o_i
        columns = int(totals.max())  # W
        if prompts * columns * (prompt_mask.shape[1] + columns) > PACKED_MASK_LIMIT:
            return None
        t = torch.arange(width - 1, device=device)  # (T-1,)
        valid = t[None, :] < fed[:, None]  # (M, T-1)
        index = torch.where(valid, prompt_index[:, None] * columns + offset[:, None] + t, 0)  # (M, T-1)
        owner = torch.full((prompts * columns,), -1, dtype=torch.long, device=device)  # completion of each column
        place = torch.zeros(prompts * columns, dtype=torch.long, device=device)  # its offset t there
        owner[index[valid]] = torch.arange(rows, device=device)[:, None].expand(-1, width - 1)[valid]
        place[index[valid]] = t.expand(rows, -1)[valid]
        owner, place = owner.view(prompts, 1, columns), place.view(prompts, 1, columns)
        own = (owner.transpose(1, 2) == owner) & (owner >= 0) & (place <= place.transpose(1, 2))  # (U, W, W)
        attends = torch.cat([prompt_mask.bool()[:, None, :].expand(-1, columns, -1), own], dim=-1)[:, None]
        attention = torch.zeros(attends.shape, device=device).masked_fill_(~attends, torch.finfo(torch.float32).min)
        positions = prompt_mask.sum(-1, keepdim=True) + place.view(prompts, columns)  # (U, W)
        return cls(index, valid, attention, positions)

    def pack(self, values: Tensor) -> Tensor:
        """(M, T-1) per-completion-token values -> (U, W), each at its column (0 in columns no token fills)."""
        packed = values.new_zeros(self.positions.numel())
        packed[self.index[self.valid]] = values[self.valid]
        return packed.view(self.positions.shape)

    def unpack(self, packed: Tensor) -> Tensor:
        """(U, W) -> (M, T-1), 0 where a completion feeds no token; differentiable."""
        return torch.where(self.valid, packed.reshape(-1)[self.index], 0.0)


def unshared_logprobs(
    model: PreTrainedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    prompt_index: Tensor,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """:func:`completion_logprobs`'s values from whole sequences (:func:`sequence_logprobs`), each row's prompt run
    again: the path for gradient checkpointing, which recomputes a layer from its inputs alone and so cannot carry
    the key/value cache the shared-prompt path hands from the prompt pass to the completion pass."""
    input_ids = torch.cat([prompt_ids.index_select(0, prompt_index), completion_ids], dim=1)  # (M, P + T)
    attention_mask = torch.cat([prompt_mask.index_select(0, prompt_index), completion_mask], dim=1)
    return sequence_logprobs(model, input_ids, attention_mask, prompt_ids.shape[1], temperature)


def top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """Nucleus truncation (Holtzman et al. 2020): keep the most likely tokens whose total probability first reaches
    ``top_p``, zero the rest and renormalise. The most likely token is always kept.

    Args:
        probs: (M, V), rows summing to 1.
    Returns:
        (M, V) the truncated, renormalised distribution.
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (M, V)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs  # probability of the tokens ranked above each one
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)


def _next_token(
    logits: Tensor,
    temperature: float,
    top_p: float,
    greedy: bool,
    generators: Sequence[torch.Generator] | None = None,
    with_logprobs: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """(M, V) logits -> (M,) token ids: the argmax, or a draw from softmax(z / tau) cut to its top-p nucleus; and
    (M,) the log of each drawn token's probability under softmax(z / tau), before the nucleus cut (None for the
    argmax or without ``with_logprobs``): the same distribution the trainer's log-prob pass computes, so the two differ by arithmetic alone."""
    if greedy:
        return logits.argmax(-1), None
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    full = probs  # the policy's distribution at this temperature: what the trainer's log-prob pass computes too
    if top_p < 1.0:
        probs = top_p_filter(probs, top_p)
    chosen = draw(probs, generators)
    return chosen, full.gather(-1, chosen[:, None]).squeeze(1).log() if with_logprobs else None


def draw(probs: Tensor, generators: Sequence[torch.Generator] | None = None) -> Tensor:
    """One token from each row of ``probs`` by inverting its cumulative distribution:

        token = min { i : c_i > u * c_V },      c_i = p_1 + ... + p_i,   u ~ U[0, 1)

    Exactly the categorical distribution (a token of probability 0 never has c_i > c_{i-1}, so it is never
    chosen), from ONE uniform number per row. ``torch.multinomial`` draws an exponential variate for every entry,
    49,152 per row for SmolLM2's vocabulary, which took 11% of decoding time.

    Args:
        probs: (M, V) non-negative rows, summing to about 1.
        generators: (M,) the CPU generator each row's u comes from (rows may share one: they then draw in row
            order); None: all from the global torch generator.
    Returns:
        (M,) long token ids.
    """
    cumulative = probs.cumsum(-1)  # (M, V)
    if generators is None:
        u = torch.rand(probs.shape[0], 1, device=probs.device, dtype=cumulative.dtype)  # (M, 1)
    else:
        u = torch.cat([torch.rand(1, generator=g) for g in generators]).to(probs.device, cumulative.dtype)[:, None]
    u = u * cumulative[:, -1:]
    return torch.searchsorted(cumulative, u, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


def packed_decoder(
    model: PreTrainedModel, cache, prompt_index: Tensor, prompt_mask: Tensor, max_new_tokens: int, decoder: str = "auto"
):
    """The :class:`policygrad.lm.decoder.PackedDecoder` for this generation, or None for the model's own forward:
    when asked for ("transformers"), when the model or device does not qualify, or when building it fails (a
    warning, once: then the model's forward decodes, as it always could)."""
    if decoder == "transformers":
        return None
    if decoder != "auto":
        raise ValueError(f"decoder must be 'auto' or 'transformers', got {decoder!r}")
    from policygrad.lm.decoder import PackedDecoder, unsupported

    device = next(model.parameters()).device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    if unsupported(model, device, dtype) is not None or not hasattr(cache, "layers"):
        return None
    try:
        return PackedDecoder(model, cache, prompt_index, prompt_mask, max_new_tokens, dtype)
    except (RuntimeError, AttributeError, TypeError) as error:  # e.g. a torch build without oneDNN's kernels
        # shown once per run: Python's default warning filter prints a message once per place that issues it
        message = f"the packed decoder failed ({type(error).__name__}: {error}); decoding with the model's forward"
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return None


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    group_size: int,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    generators: Sequence[torch.Generator] | None = None,
    drawn_logprobs: Tensor | None = None,
    decoder: str = "auto",
) -> Tensor:
    """Decode ``group_size`` completions of each prompt with a key/value cache; -> (N, T) ids, T <= max_new_tokens.

    The loop ``generate`` runs, cut to what GRPO needs: each prompt is encoded once and its cache shared by its G
    rows (copied to each when the model's forward decodes); each step runs one token per unfinished row, and rows
    that emit an EOS leave the batch (their cache rows are dropped), so no compute is spent on finished sequences. Tokens after a row's EOS are ``pad_id``. Draws come
    from the global torch RNG, or with ``generators`` (one CPU generator per prompt) each group's from its own: then
    a group's completions do not depend on which other prompts share the batch (data-parallel sampling,
    :mod:`policygrad.distributed`).

    Args:
        prompt_ids, prompt_mask: (B, P) left-padded prompts.
        generators: (B,) or None.
        drawn_logprobs: (N, max_new_tokens) float32, or None: filled with each drawn token's log-probability under
            softmax(z / tau) (before a top-p cut), in this loop's arithmetic: the sampler's side of an importance
            ratio; not for greedy.
        decoder: "auto": the decoding passes after the prefill run in :class:`policygrad.lm.decoder.PackedDecoder`
            where it supports the model (Llama-family on a CPU: decoding steps ~1.5x faster, benchmarks/RESULTS.md), else
            in the model's forward;
            "transformers": always the model's forward.
    Returns:
        (N, T) completion ids, N = B * G, rows of a group consecutive; T is the step at which the last row ended.
    """
    device = prompt_ids.device
    n = prompt_ids.shape[0] * group_size
    prompt_index = torch.arange(n, device=device) // group_size  # (N,)
    logits, cache = _prefill(model, prompt_ids, prompt_mask, prompt_index, copy=False)  # (N, V); cache: B rows
    engine = (
        None
        if max_new_tokens == 1
        else packed_decoder(model, cache, prompt_index, prompt_mask, max_new_tokens, decoder)
    )
    if engine is None:
        cache.reorder_cache(prompt_index)  # the model's forward decodes: one cache row per completion
    cache_argument = _cache_argument(model)
    attention = prompt_mask.index_select(0, prompt_index)  # (A, P + t) for the A active rows
    next_position = attention.sum(-1)  # (A,) the position of each active row's next token
    eos = torch.as_tensor(list(eos_ids), device=device)
    tokens = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)  # (N, max_new_tokens)
    active = torch.arange(n, device=device)  # (A,) the rows still generating, in cache order
    steps = 0
    for t in range(max_new_tokens):
        row_generators = None if generators is None else [generators[r // group_size] for r in active.tolist()]
        chosen, chosen_logprobs = _next_token(
            logits, temperature, top_p, greedy, row_generators, drawn_logprobs is not None
        )  # (A,) each
        tokens[active, t] = chosen
        if chosen_logprobs is not None:  # asked for (drawn_logprobs), and not greedy
            drawn_logprobs[active, t] = chosen_logprobs
        steps = t + 1
        going = ~torch.isin(chosen, eos)  # (A,)
        if t + 1 == max_new_tokens or not going.any():
            break
        if not going.all():  # drop finished rows from the batch and the cache
            keep = going.nonzero().squeeze(1)
            active, chosen, attention, next_position = active[keep], chosen[keep], attention[keep], next_position[keep]
            if engine is None:
                cache.reorder_cache(keep)
            else:
                engine.keep(keep)
        attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=1)
        if engine is not None:
            logits = engine.step(chosen, next_position)  # (A, V)
        else:
            logits = model(
                input_ids=chosen[:, None],
                attention_mask=attention,
                position_ids=next_position[:, None],
                use_cache=True,
                **{cache_argument: cache},
            ).logits[:, -1]  # (A, V)
        next_position = next_position + 1
    return tokens[:, :steps]


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    micro_batch_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    score_tokens: bool = True,
    generators: Sequence[torch.Generator] | None = None,
    sampler_logprobs: bool = False,
    decoder: str = "auto",
    score_temperature: float | None = None,
) -> Rollout:
    """Sample ``group_size`` completions for each prompt and score their tokens under the sampling policy.

    Sampling uses the global torch RNG: seed it before calling for repeatable runs. ``greedy`` decodes the argmax
    instead (then all G completions of a prompt are equal; use G = 1). The log-probs come from a separate pass
    (:func:`completion_logprobs`, in micro-batches) rather than from the decoding loop, so they are computed by
    exactly the code, and under exactly the autocast, that the update uses: the importance ratio starts at 1 up to
    floating-point noise.

    Args:
        prompts: B raw prompt strings.
        micro_batch_size: rows per forward pass of the log-prob computation (default: all at once).
        autocast_dtype: run under ``torch.autocast`` with this dtype (bfloat16), or None for full precision.
        score_tokens: False skips the log-prob pass, leaving ``logprobs`` None: evaluation needs only the text, and
            a single on-policy update never reads them (its ratio is 1 by construction).
        generators: one CPU ``torch.Generator`` per prompt, each drawing its group's tokens (see :func:`generate`);
            None: the global torch RNG.
        sampler_logprobs: also keep, as ``sampler_logprobs``, the log-probabilities the decoding loop drew each
            token with (its one-token passes over the key/value cache round differently from the log-prob pass's
            whole-sequence forward): the sampler's side of :func:`policygrad.losses.truncated_importance_weights`.
        decoder: "auto" or "transformers", see :func:`generate`.
        score_temperature: the temperature of the log-prob pass, when it is not the one drawn at (a hotter redraw
            of dynamic sampling, scored as the training policy; ``sampler_logprobs`` keep the drawing temperature).
    Returns:
        a :class:`Rollout` with N = B * G rows.
    """
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)  # (B, P)
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = pad_token_id(model, tokenizer)
    n = prompt_ids.shape[0] * group_size
    drawn = torch.zeros(n, max_new_tokens, device=device) if sampler_logprobs and not greedy else None
    with autocast_context(device, autocast_dtype):
        completion_ids = generate(
            model,
            prompt_ids,
            prompt_mask,
            group_size,
            max_new_tokens,
            eos_ids,
            pad_id,
            temperature,
            top_p,
            greedy,
            generators,
            drawn,
            decoder,
        )  # (N, T)
    rollout = assemble(tokenizer, prompts, prompt_ids, prompt_mask, completion_ids, eos_ids, group_size, drawn)
    if score_tokens:
        scored_at = temperature if score_temperature is None else score_temperature
        rollout.logprobs = rollout_logprobs(
            model, rollout, 1.0 if greedy else scored_at, micro_batch_size, autocast_dtype
        )
    return rollout


def assemble(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    eos_ids: Sequence[int],
    group_size: int,
    drawn: Tensor | None = None,
) -> Rollout:
    """The :class:`Rollout` of sampled completion ids, whichever engine drew them (:func:`generate`, or vLLM in
    :mod:`policygrad.lm.vllm_engine`): masks, decoded text, the truncation flags; ``logprobs`` left None.

    Args:
        prompt_ids, prompt_mask: (B, P) left-padded prompts.
        completion_ids: (N, T) right-padded, rows of a group consecutive.
        drawn: (N, >= T) the log-probability each token was drawn with, or None.
    """
    device = completion_ids.device
    mask = completion_mask(completion_ids, eos_ids)  # (N, T)
    completions = tokenizer.batch_decode(
        [row[row_mask.bool()] for row, row_mask in zip(completion_ids, mask)], skip_special_tokens=True
    )
    return Rollout(
        prompts=[p for p in prompts for _ in range(group_size)],
        prompt_ids=prompt_ids.repeat_interleave(group_size, dim=0),  # (N, P): rows of a group are consecutive
        prompt_mask=prompt_mask.repeat_interleave(group_size, dim=0),
        completion_ids=completion_ids,
        completion_mask=mask,
        completions=completions,
        logprobs=None,
        group_size=group_size,
        # not "the last column counts": a row whose EOS is the batch's last token ended; one cut off did not
        truncated=~(torch.isin(completion_ids, torch.tensor(list(eos_ids), device=device)) & mask.bool()).any(-1),
        sampler_logprobs=None if drawn is None else drawn[:, : completion_ids.shape[1]] * mask,
    )


def pad_token_id(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that pads prompts and completions: the tokenizer's pad token, else the first EOS id."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_ids(model, tokenizer)[0]


def micro_batches(n: int, size: int | None) -> list[slice]:
    """Consecutive row slices of at most ``size`` rows (all rows when ``size`` is None)."""
    size = size or n
    return [slice(start, start + size) for start in range(0, n, size)]


@torch.no_grad()
def rollout_logprobs(
    model: PreTrainedModel,
    rollout: Rollout,
    temperature: float,
    micro_batch_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    embed_once: bool = True,
) -> Tensor:
    """(N, T) log-probs of a rollout's sampled tokens under ``model`` (the sampling policy, or the frozen reference
    for the KL term), zero where masked; no gradient, in micro-batches. ``embed_once``: see
    :func:`completion_logprobs` (False for a model sharded by FSDP2)."""
    device = rollout.completion_ids.device
    chunks = []
    with autocast_context(device, autocast_dtype):
        for rows in micro_batches(rollout.completion_ids.shape[0], micro_batch_size):
            logprobs, _ = completion_logprobs(
                model, temperature=temperature, embed_once=embed_once, **rollout.rows(rows)
            )
            chunks.append(logprobs)
    return torch.cat(chunks) * rollout.completion_mask
