"""Tiny language models built on the spot, shared by the test folders that need one (tests/lm, tests/serve): a
character-level tokenizer over printable ASCII plus a few special tokens (a BPE model with no merges: every character
is one token), wrapped in ``PreTrainedTokenizerFast``, one variant with a minimal chat template; random Llama and
Qwen2 configurations with hidden size 32, a few hundred kilobytes each. A module of its own name (not a conftest), so
that ``from tiny_models import ...`` finds it whichever folder's conftest pytest loaded last."""

from __future__ import annotations

import string
from pathlib import Path

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


GPT2_CORPUS = [
    "Return the number of items in a container. The argument may be a sequence or a collection.",
    "A reply of exactly 32 characters whose digits add up to 9, and nothing else.",
    "It's 2024; 3 + 4 = 7 and 12 * 12 = 144. Open the file, read each line, close it.",
] * 4
"""Text the tiny GPT-2 tokenizer's merges are learned from."""


def save_tiny_gpt2(folder: Path) -> Path:
    """A tiny model of GPT-2's architecture (``GPT2LMHeadModel``: learned positions, fused attention, tied head) and a
    tokenizer built like GPT-2's: byte-level BPE learned here from :data:`GPT2_CORPUS`, ``<|endoftext|>`` as its
    only special token (BOS and EOS), no pad token and no chat template. A stand-in for the hub's ``gpt2``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(GPT2_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=512, n_embd=32, n_layer=2, n_head=4, bos_token_id=eos, eos_token_id=eos
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = eos
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
