"""Tiny language models built on the spot, so the LM tests never touch the network or a real checkpoint.

The tokenizer is character-level over printable ASCII plus a few special tokens (a BPE model with no merges: every
character is one token), wrapped in ``PreTrainedTokenizerFast``; one variant carries a minimal chat template. The
models are random Llama and Qwen2 configurations with hidden size 32, a few hundred kilobytes each.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import make_model, make_tokenizer, save_tiny  # noqa: F401  (tests/, on sys.path)


@pytest.fixture(scope="session")
def tiny_llama_chat(tmp_path_factory) -> Path:
    """A folder with a random tiny Llama and a char-level tokenizer WITH a chat template."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama-chat"), "llama", chat=True)


@pytest.fixture(scope="session")
def tiny_qwen_base(tmp_path_factory) -> Path:
    """A folder with a random tiny Qwen2 and a char-level tokenizer WITHOUT a chat template."""
    return save_tiny(tmp_path_factory.mktemp("tiny-qwen-base"), "qwen2", chat=False)


@pytest.fixture
def tiny_prompts(tmp_path) -> Path:
    """A JSONL file of short length_digits prompts (``lm_helpers.write_tiny_prompts``)."""
    from lm_helpers import write_tiny_prompts

    return write_tiny_prompts(tmp_path / "prompts.jsonl")


@pytest.fixture(scope="session")
def char_tokenizer():
    """The character-level tokenizer without a chat template (one token per character)."""
    return make_tokenizer(chat=False)


@pytest.fixture
def eager_eos_model(tiny_llama_chat):
    """The tiny Llama with +2 on the EOS logit, so sampled completions end early and at different lengths."""
    from lm_helpers import eos_boosted

    return eos_boosted(tiny_llama_chat, 2.0)
