"""Batched sampling: G completions for each of B prompts, with the log-probabilities the update needs.

Letters used throughout the LM code:
    B  prompts in a batch           G  completions per prompt (the group)     N = B * G  sequences
    P  prompt tokens (left-padded)  T  completion tokens (right-padded)       V  vocabulary size

Layout: sequence ``i`` answers prompt ``i // G``; a group is G consecutive rows, the layout
:func:`policygrad.advantages.group_advantages` expects. Prompts are LEFT-padded so that every prompt ends at column
P and generation starts at the same column for all rows; completions are right-padded after their first EOS.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from policygrad.regularizers import entropy

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "Rollout",
    "autocast_context",
    "completion_mask",
    "encode_prompts",
    "eos_token_ids",
    "sample",
    "sequence_logprobs",
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

    @property
    def truncated(self) -> Tensor:
        """(N,) bool: rows that hit max_new_tokens without an EOS (their last token is not an EOS)."""
        return self.completion_mask[:, -1].bool() if self.completion_mask.shape[1] else self.completion_lengths < 0

    def rows(self, index: Tensor | slice) -> dict[str, Tensor]:
        """The tensors of a micro-batch of rows, for the update."""
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "mask": self.completion_mask[index],
            "old_logprobs": self.logprobs[index] if self.logprobs is not None else None,
        }


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
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    if _accepts_logits_to_keep(model):
        # only the last T + 1 positions' logits: skips the (N, P, V) prompt logits, the largest tensor by far
        kwargs["logits_to_keep"] = completion_len + 1
    logits = model(**kwargs).logits  # (N, T + 1, V) or (N, P + T, V)
    logits = logits[:, -(completion_len + 1) : -1].float() / temperature  # (N, T, V)
    targets = input_ids[:, completion_start:]  # (N, T)
    logprobs = torch.gather(F.log_softmax(logits, dim=-1), 2, targets.unsqueeze(-1)).squeeze(-1)  # (N, T)
    return logprobs, entropy(logits)


def autocast_context(device: torch.device | str, dtype: torch.dtype | None) -> torch.autocast:
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a disabled one (a no-op) when ``dtype`` is None.

    Weights stay float32 (the master copy the optimiser updates); only matmuls run in the lower precision.
    """
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _accepts_logits_to_keep(model: PreTrainedModel) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


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
) -> Rollout:
    """Sample ``group_size`` completions for each prompt and score their tokens under the sampling policy.

    Sampling uses the global torch RNG (what ``generate`` draws from): seed it before calling for repeatable runs.
    ``greedy`` decodes the argmax instead (then all G completions of a prompt are equal; use G = 1). The log-probs
    come from a separate forward pass (:func:`sequence_logprobs`, in micro-batches) rather than from ``generate``'s
    scores, so they are computed by exactly the code, and under exactly the autocast, that the update uses: the
    importance ratio starts at 1 up to floating-point noise.

    Args:
        prompts: B raw prompt strings.
        micro_batch_size: rows per forward pass of the log-prob computation (default: all at once).
        autocast_dtype: run under ``torch.autocast`` with this dtype (bfloat16), or None for full precision.
        score_tokens: False skips the log-prob pass, leaving ``logprobs`` None: evaluation needs only the text, and
            a single on-policy update never reads them (its ratio is 1 by construction).
    Returns:
        a :class:`Rollout` with N = B * G rows.
    """
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)  # (B, P)
    prompt_ids = prompt_ids.repeat_interleave(group_size, dim=0)  # (N, P): rows of a group are consecutive
    prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0)
    eos_ids = eos_token_ids(model, tokenizer)
    # a fresh generation config, not the model's: shipped defaults (top_k, repetition_penalty, a lower temperature)
    # would sample from a distribution other than the one whose log-probs we compute
    sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}  # top_k 0: no top-k cut
    settings = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    with autocast_context(device, autocast_dtype):
        output = model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=settings
        )  # (N, P + T)
    completion_ids = output[:, prompt_ids.shape[1] :]  # (N, T), T <= max_new_tokens
    mask = completion_mask(completion_ids, eos_ids)  # (N, T)
    completions = [
        tokenizer.decode(row[row_mask.bool()], skip_special_tokens=True) for row, row_mask in zip(completion_ids, mask)
    ]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (N, P + T)
    attention_mask = torch.cat([prompt_mask, mask], dim=1)
    step = micro_batch_size or input_ids.shape[0]
    logprobs_all = None
    if score_tokens:
        logprobs = []
        with autocast_context(device, autocast_dtype):
            for start in range(0, input_ids.shape[0], step):
                chunk = slice(start, start + step)
                lp, _ = sequence_logprobs(
                    model, input_ids[chunk], attention_mask[chunk], prompt_ids.shape[1], 1.0 if greedy else temperature
                )
                logprobs.append(lp)
        logprobs_all = torch.cat(logprobs) * mask  # (N, T)
    return Rollout(
        prompts=[p for p in prompts for _ in range(group_size)],
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=mask,
        completions=completions,
        logprobs=logprobs_all,
        group_size=group_size,
    )
