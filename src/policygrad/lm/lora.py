"""LoRA adapters (through PEFT) and gradient checkpointing: training a model that does not fit with all its weights.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes every base weight W (d_out, d_in)
of the chosen linear layers and trains a low-rank change beside it:

    h = W x + (alpha / r) * B A x          A: (r, d_in) random,  B: (d_out, r) zero at the start,  r << d_in

so the policy starts exactly where the base model is, the optimiser holds moments for r (d_in + d_out) numbers per
layer instead of d_in d_out, and the initial policy is the same weights with the adapters switched off: the KL term's
reference costs no second model (:class:`AdapterOff`).

PEFT does the layers; this module only fits them into the trainer. The loop keeps calling the transformers model it
always called (PEFT injects its LoRA layers into that very model, in place), so rollout, scoring and the update do not
know LoRA is there; the ``PeftModel`` wrapper is kept for what only it does: saving the adapter alone
(``adapter_config.json`` + ``adapter_model.safetensors``) and switching the adapters off.

A run's checkpoints then hold the adapter, the tokenizer and the trainer state; :func:`policygrad.lm.models.load_model`
reads such a folder as its base model with the adapter merged in, so ``eval``, ``sample`` and ``export`` take a LoRA
run's checkpoints as they take any other, and ``lora_merged`` also writes that merged model into each checkpoint's
``merged/`` for tools that know nothing of PEFT.

Gradient checkpointing (Chen et al. 2016) keeps only each decoder layer's input in the forward pass and recomputes
the layer in the backward pass: memory for activations falls from O(layers) to O(1) layers' worth, for about one more
forward pass; the gradients are the same numbers.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from policygrad.errors import UsageError

__all__ = [
    "ADAPTER_CONFIG",
    "MERGED",
    "AdapterOff",
    "attach",
    "check_lora",
    "enable_gradient_checkpointing",
    "linear_names",
    "adapter_base",
    "merge_adapter",
    "recomputing",
    "save_merged",
]

ADAPTER_CONFIG = "adapter_config.json"
"""The file that marks a folder as a PEFT adapter rather than a whole model."""

MERGED = "merged"
"""The sub-folder of a checkpoint holding the merged model (``lora_merged``)."""

ALL_LINEAR = "all-linear"
"""PEFT's name for every linear layer but the output head."""


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise UsageError(
            "--lora-rank", "LoRA needs PEFT, which is not installed: pip install 'policygrad[lora]'"
        ) from None
    return peft


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """PEFT asks transformers a question that transformers 5.24 calls deprecated, once per model: not the user's
    concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def linear_names(source: str) -> list[str]:
    """The distinct last names of the linear layers of the model in folder ``source`` (q_proj, up_proj, ...), read
    from its config alone: the model is built on the meta device, so no weight is loaded or allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return sorted({name.rsplit(".", 1)[-1] for name, module in skeleton.named_modules() if _is_linear(module)})


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's linear layers


def check_lora(config: Any, source: str) -> None:
    """Refuse, in one line and before any weight loads, a LoRA config that cannot work: PEFT missing, or target
    modules the model (at folder ``source``) does not have."""
    if config.lora_rank <= 0:
        return
    _peft()
    targets = config.lora_target_modules
    if targets == (ALL_LINEAR,):
        return
    have = linear_names(source)
    missing = [name for name in targets if name not in have]
    if missing:
        raise UsageError(
            "--lora-target-modules",
            f"the model has no linear layer named {', '.join(missing)} (its linear layers: {', '.join(have)}; or "
            f"{ALL_LINEAR})",
        )


def attach(model: torch.nn.Module, config: Any, adapter_folder: Path | None = None) -> Any:
    """Freeze ``model``'s weights and inject LoRA layers into it (in place); return the ``PeftModel`` around it.

    ``adapter_folder``: a checkpoint whose adapter to continue from (a resumed run); else fresh adapters, B = 0.
    """
    peft = _peft()
    with _quiet_peft():
        adapter = _attach(peft, model, config, adapter_folder)
    # where the base weights come from, as the user named it ("default", a folder, a hub id), not a cache path
    base = Path(str(config.model))
    adapter.peft_config["default"].base_model_name_or_path = str(base.resolve()) if base.is_dir() else str(base)
    adapter.eval()
    return adapter


def _attach(peft: Any, model: torch.nn.Module, config: Any, adapter_folder: Path | None) -> Any:
    if adapter_folder is not None:
        return peft.PeftModel.from_pretrained(model, str(adapter_folder), is_trainable=True)
    targets = config.lora_target_modules
    lora = peft.LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,  # the ratio pi/pi_old and the KL compare one deterministic function
        target_modules=ALL_LINEAR if targets == (ALL_LINEAR,) else list(targets),
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, lora)


class AdapterOff:
    """The model with its adapters switched off, i.e. the initial policy: the reference of the KL term.

    Calls the same injected model as the policy inside PEFT's ``disable_adapter()``, so it needs no memory of its
    own; its ``forward`` has the model's signature (the scoring code asks it which arguments it takes), and every
    other attribute (``config``, ``get_input_embeddings``: the embeddings carry no adapter) is the model's.
    """

    def __init__(self, adapter: Any, model: torch.nn.Module) -> None:
        @functools.wraps(model.forward)
        def forward(*args: Any, **kwargs: Any) -> Any:
            with adapter.disable_adapter():
                return model(*args, **kwargs)

        self.forward = forward
        self._model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def enable_gradient_checkpointing(model: torch.nn.Module) -> int:
    """Make every decoder layer recompute its activations in the backward pass of the update (inside
    :func:`recomputing`); returns how many layers that is (0: the model has none transformers can checkpoint)."""
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.24
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return len(_checkpointed_layers(model))


def _checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


@contextlib.contextmanager
def recomputing(model: torch.nn.Module) -> Iterator[bool]:
    """Within this block, the layers of :func:`enable_gradient_checkpointing` recompute (a no-op for a model
    without); yields whether any does, since a recomputed layer takes no key/value cache
    (:func:`policygrad.lm.rollout.unshared_logprobs`).

    transformers checkpoints a layer only while the layer is in training mode, and it then also turns the key/value
    cache off, which generation needs, while training mode on the whole model would switch dropout on, which the
    trainer keeps off (the importance ratio and the KL compare one deterministic function). So only the layers
    themselves, not their children, are marked as training, and only for the forward passes that carry gradients.
    """
    layers = _checkpointed_layers(model)
    for layer in layers:
        layer.training = True  # this module only, not .train(): its dropout children keep eval mode
    try:
        yield bool(layers)
    finally:
        for layer in layers:
            layer.training = False


def adapter_base(folder: Path) -> str:
    """The base model a LoRA checkpoint's adapter belongs to, as the run named it ("default", a folder, a hub id)."""
    base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base:
        raise UsageError("--model", f"{folder / ADAPTER_CONFIG} does not say which base model the adapter belongs to")
    return str(base)


def merge_adapter(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """``model`` (the base) with the adapter of LoRA checkpoint ``folder`` added into its weights: a plain
    transformers model again."""
    peft = _peft()
    with _quiet_peft():
        return peft.PeftModel.from_pretrained(model, str(folder)).merge_and_unload()


def save_merged(adapter: Any, tokenizer: Any, folder: Path) -> None:
    """Write the base weights with the adapters added in to ``folder``, as a model plain transformers loads; the
    training model is left as it was (a copy is merged)."""
    merged = copy.deepcopy(adapter).merge_and_unload()
    merged.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
