"""Tests for policygrad.lm.models: loading local models, one-line load errors, and prompt formatting.

Everything here runs offline on tiny models built in the test: a fixture refuses every socket connection, so a test
that would quietly reach for the hub fails instead. The tiny tokenizer (SmolLM2's digit splitting and special-token
layout) and llama configuration are shared with test_embedded.py, which converts a GGUF built from them.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from policygrad.lm import embedded  # noqa: E402
from policygrad.lm import models as lm  # noqa: E402

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Policy gradients push up the log-probability of actions with positive advantage.",
    "It's 2024; 3 + 4 = 7 and 12 * 12 = 144.",
    "  indented text\twith tabs\nand new lines, über café naïve.",
] * 4


def refuse_connections(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every socket connection fail, unless the test is marked ``slow`` (the one that downloads for real)."""
    if request.node.get_closest_marker("slow"):
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(autouse=True)
def _no_network(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if a fast test opens any connection (the hub, PyPI): they must pass on a machine with none."""
    refuse_connections(request, monkeypatch)


# ------------------------------------------------------------------------------------------------------------------
# Tiny tokenizers and models, built locally
# ------------------------------------------------------------------------------------------------------------------


def tiny_backend() -> Tokenizer:
    """A byte-level BPE trained in milliseconds, with SmolLM2's digit splitting and special-token layout."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return tokenizer


@pytest.fixture(scope="module")
def backend() -> Tokenizer:
    return tiny_backend()


def _hf_tokenizer(backend: Tokenizer, chat_template: str | None, eos: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos, chat_template=chat_template, clean_up_tokenization_spaces=False
    )


def _save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def qwen2_chat_dir(tmp_path: Path, backend: Tokenizer) -> Path:
    """A tiny Qwen2 instruct-style model: chat template, eos ``<|im_end|>``, no pad token."""
    config = Qwen2Config(
        vocab_size=backend.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return _save(Qwen2ForCausalLM(config), _hf_tokenizer(backend, CHATML, "<|im_end|>"), tmp_path / "qwen2")


@pytest.fixture
def llama_plain_dir(tmp_path: Path, backend: Tokenizer) -> Path:
    """A tiny llama base-style model: no chat template (like gpt2), eos ``<|endoftext|>``, no pad token."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(backend.get_vocab_size(), tie=False))
    return _save(model, _hf_tokenizer(backend, None, "<|endoftext|>"), tmp_path / "llama")


def tiny_llama_config(vocab_size: int, tie: bool) -> LlamaConfig:
    """Query heads != key/value heads, so q and k are un-permuted with different head counts."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


# ------------------------------------------------------------------------------------------------------------------
# load_model, has_chat_template, format_prompt
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.exact
def test_load_qwen2_folder_with_chat_template(qwen2_chat_dir: Path) -> None:
    model, tokenizer = lm.load_model(str(qwen2_chat_dir))
    assert isinstance(model, Qwen2ForCausalLM)
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None  # Qwen2's tokenizer class brings its own (<|endoftext|>)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert lm.has_chat_template(tokenizer)
    prompt = lm.format_prompt(tokenizer, "What is 2+2?")
    assert prompt == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 2  # special tokens are not split


@pytest.mark.exact
def test_load_llama_folder_without_chat_template(llama_plain_dir: Path) -> None:
    model, tokenizer = lm.load_model(llama_plain_dir)  # a Path works as well as a str
    assert isinstance(model, LlamaForCausalLM)
    assert tokenizer.pad_token == "<|endoftext|>"
    assert not lm.has_chat_template(tokenizer)
    assert lm.format_prompt(tokenizer, "Once upon a time") == "Once upon a time"


@pytest.mark.property
def test_load_model_dtype(qwen2_chat_dir: Path) -> None:
    model, _ = lm.load_model(str(qwen2_chat_dir), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    model, _ = lm.load_model(str(qwen2_chat_dir), dtype=torch.float64)
    assert next(model.parameters()).dtype == torch.float64
    with pytest.raises(ValueError, match="dtype"):
        lm.load_model(str(qwen2_chat_dir), dtype="float33")


@pytest.mark.exact
def test_default_is_the_embedded_model(qwen2_chat_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``None`` and ``"default"`` load whatever folder policygrad.lm.embedded hands back, converted or not."""
    assert lm.default_model_path is embedded.default_model_path  # still importable from here
    assert lm.ModelDownloadError is embedded.ModelDownloadError
    asked: list[object] = []

    def default_model_path(cache_dir: object = None) -> Path:
        asked.append(cache_dir)
        return qwen2_chat_dir

    monkeypatch.setattr(lm, "default_model_path", default_model_path)
    for name in (None, "default"):
        model, tokenizer = lm.load_model(name)
        assert isinstance(model, Qwen2ForCausalLM) and tokenizer.eos_token == "<|im_end|>"
    assert asked == [None, None]


def _one_line_error(name: str) -> str:
    with pytest.raises(ValueError) as info:
        lm.load_model(name)
    message = str(info.value)
    assert "\n" not in message and name in message
    return message


@pytest.mark.exact
def test_missing_local_path_is_one_line_error(tmp_path: Path) -> None:
    assert "no such model folder" in _one_line_error(str(tmp_path / "no" / "such-model"))
    assert "no such model folder" in _one_line_error("./not-here")
    assert "no such model folder" in _one_line_error("~/definitely/not/a/model/folder")


@pytest.mark.exact
def test_file_or_folder_without_config_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    assert "is a file" in _one_line_error(str(tmp_path / "weights.bin"))
    assert "config.json" in _one_line_error(str(tmp_path))


@pytest.mark.exact
def test_hub_id_with_unreachable_hub_is_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lm, "_hub_reachable", lambda timeout_s=3.0: False)
    started = time.monotonic()
    message = _one_line_error("policygrad-tests/no-such-model")
    assert "cannot be reached" in message
    assert time.monotonic() - started < 10  # no minute of retries against an unreachable host


@pytest.mark.exact
def test_looks_like_hub_id() -> None:
    for name in ["gpt2", "Qwen/Qwen2.5-0.5B-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"]:
        assert lm._looks_like_hub_id(name)
    for name in ["./gpt2", "/abs/model", "~/model", "a/b/c", "org/../x", ""]:
        assert not lm._looks_like_hub_id(name)
