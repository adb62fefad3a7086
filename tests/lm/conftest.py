"""Tiny language models built on the spot, so the LM tests never touch the network or a real checkpoint.

The tokenizer is character-level over printable ASCII plus a few special tokens (a BPE model with no merges: every
character is one token), wrapped in ``PreTrainedTokenizerFast``; one variant carries a minimal chat template. The
models are random Llama and Qwen2 configurations with hidden size 32, a few hundred kilobytes each.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|user|>{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(chat: bool):
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    characters = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {token: i for i, token in enumerate(SPECIAL + characters)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()  # characters concatenate back without separators
    backend.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE if chat else None,
        clean_up_tokenization_spaces=False,
    )


def make_model(kind: str, tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    return Qwen2ForCausalLM(Qwen2Config(**common))


def save_tiny(folder: Path, kind: str, chat: bool) -> Path:
    tokenizer = make_tokenizer(chat)
    model = make_model(kind, tokenizer)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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
