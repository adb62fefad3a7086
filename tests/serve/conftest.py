"""Tiny models and runs built on the spot, so the serving tests never touch the network or a real checkpoint.

The model is a random Llama with hidden size 32 and a character-level tokenizer with a minimal chat template (as in
tests/lm/conftest.py, which this folder cannot import); the run is a folder laid out as ``policygrad train`` leaves
one: config.yaml, metrics.jsonl with two held-out evaluations, and final/ saved through the checkpoint code.
"""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import pytest

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|user|>{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A random tiny Llama (2 layers, hidden size 32, 1024 positions) and a one-token-per-character tokenizer with
    a chat template, saved as a transformers model folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    characters = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {token: i for i, token in enumerate(SPECIAL + characters)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
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
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


RECIPE = {"model": "default", "task": "length_digits", "prompts": "pydoc", "heldout_prompts": 4, "eval_size": 4}
METRICS = [
    {"step": 0, "eval/greedy/pass_rate": 0.0, "eval/greedy/length_rate": 0.25, "eval/greedy/digits_rate": 0.0},
    {"step": 1, "loss": 0.5},
    {"step": 2, "eval/greedy/pass_rate": 0.5, "eval/greedy/length_rate": 0.75, "eval/greedy/digits_rate": 0.5},
]


def make_run(root: Path, model: Path, final: bool = True) -> Path:
    """A run folder as ``policygrad train`` leaves it after 2 steps: config.yaml, metrics.jsonl and final/ (or, with
    ``final=False``, checkpoints/step-000001 only)."""
    import yaml

    from policygrad import checkpointing

    run = root / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(RECIPE))
    (run / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in METRICS))

    def copy(tmp: Path) -> None:
        for item in model.iterdir():
            shutil.copyfile(item, tmp / item.name)

    if final:
        checkpointing.save_atomic(run / "final", copy, step=2)
    else:
        checkpointing.save_atomic(run / "checkpoints" / "step-000001", copy, step=1)
    return run


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A folder with the random tiny Llama and its chat tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model) -> Path:
    """A finished run of the tiny model (config.yaml, metrics.jsonl with evaluations at steps 0 and 2, final/)."""
    return make_run(tmp_path_factory.mktemp("tiny-run"), tiny_model)


@pytest.fixture
def policygrad_cli(monkeypatch):
    """``run(command, argv) -> exit status``: ``policygrad COMMAND ARGV...`` through the real command line (one-line
    errors, status 2), with export and serve registered for the test where cli.py does not list them yet."""
    from policygrad import cli
    from policygrad.serve import ENTRY_POINTS

    make = getattr(cli, "Command", None)
    for command, (config, run) in ENTRY_POINTS.items():
        if command not in cli.COMMANDS:
            monkeypatch.setitem(cli.COMMANDS, command, make(config, run) if make else (config, run, None))
    return lambda command, argv: cli.main([command, *argv])
