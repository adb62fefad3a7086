"""Helpers shared by the trainer tests (test_trainer.py, test_reliability_lm.py): a tiny run's config, its weights."""

from __future__ import annotations

from pathlib import Path

import torch

from policygrad.lm.config import GRPOConfig


def tiny_config(model: Path, prompts: Path, out: Path, **overrides) -> GRPOConfig:
    """A run of the tiny local model (conftest.py) that takes seconds: 2 prompts x 3 completions of at most 8 tokens,
    2 steps, one thread on CPU, no evaluation or progress bar; ``overrides`` replace any field."""
    values = dict(
        model=str(model), prompts=str(prompts), heldout_prompts=2, prompts_per_step=2, group_size=3,
        max_new_tokens=8, lr=1e-2, max_steps=2, micro_batch_size=4, output_dir=out, eval_size=2,
        eval_decoding=(), progress=False, device="cpu", threads=1,
    )  # fmt: skip
    values.update(overrides)
    return GRPOConfig(**values)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """A saved model's tensors by name."""
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))
