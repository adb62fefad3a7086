"""Helpers shared by the LM tests: a tiny run's config, its weights, its prompts file."""

from __future__ import annotations

from pathlib import Path

import torch

from policygrad.lm.config import GRPOConfig


def tiny_config(model: Path, prompts: Path, out: Path, **overrides) -> GRPOConfig:
    """A run of the tiny local model (conftest.py) that takes seconds: 2 prompts x 3 completions of at most 8 tokens,
    2 steps, one thread on CPU, no evaluation or progress bar; ``overrides`` replace any field.

    Float32, so the suite runs the same arithmetic on every CPU (``precision: auto`` would pick bfloat16 on a CPU
    with bf16 matrix products and float32 elsewhere); the bfloat16 path has tests of its own that ask for it."""
    values = dict(
        model=str(model),
        prompts=str(prompts),
        heldout_prompts=2,
        prompts_per_step=2,
        group_size=3,
        max_new_tokens=8,
        lr=1e-2,
        max_steps=2,
        micro_batch_size=4,
        output_dir=out,
        eval_size=2,
        eval_decoding=(),
        progress=False,
        device="cpu",
        threads=1,
        precision="float32",
    )
    values.update(overrides)
    return GRPOConfig(**values)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """A saved model's tensors by name."""
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def whole_sequence_logprobs(model, rollout, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference the fast paths are checked against: log pi(y_t) and the entropy H_t of every completion
    position from ONE plain forward pass of each whole left-padded sequence (prompt + completion), (N, T) each.

        logits_j = f(x)_j / temperature,  position j predicts token j + 1
        log pi(y_t) = log_softmax(logits)[y_t],   H_t = - sum_v pi_v log pi_v
    """
    logits = model(
        input_ids=rollout.input_ids,
        attention_mask=rollout.attention_mask,
        position_ids=(rollout.attention_mask.cumsum(-1) - 1).clamp(min=0),
    ).logits
    logits = logits[:, rollout.completion_start - 1 : -1] / temperature  # (N, T, V)
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(2, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)  # (N, T)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def eos_boosted(folder, value: float):
    """(model, tokenizer) of the tiny model in ``folder`` with ``value`` added to the EOS logit (a forward hook), so
    sampled completions end early and at different lengths; in eval mode."""
    from policygrad.lm.models import load_model

    model, tokenizer = load_model(str(folder))
    boost = torch.zeros(len(tokenizer))
    boost[tokenizer.eos_token_id] = value
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + boost)
    return model.eval(), tokenizer


def add_noise(model, std: float, seed: int):
    """``model`` with Gaussian noise of standard deviation ``std`` added to every weight, in place (a policy that
    has moved off its reference by a known, seeded amount)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=generator))
    return model


def write_tiny_prompts(path: Path) -> Path:
    """Write 12 short length_digits prompts ("Note i: cats nap.", 8 characters, the passage's digit-sum target) as
    JSONL to ``path``: short prompts keep the tiny runs fast."""
    import json

    from policygrad.lm import tasks

    lines = []
    for i in range(12):
        passage = f"Note {i}: cats nap."
        target = tasks.draw_digit_sum(passage)
        record = {"prompt": tasks.make_prompt(passage, 8, target), "target_length": 8, "target_digit_sum": target}
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path
