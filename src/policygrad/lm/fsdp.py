"""FSDP2 (``fsdp: true`` under torchrun): the policy's weights, gradients and AdamW's moments sharded over the ranks.

Data parallelism (:mod:`policygrad.distributed`) keeps a whole copy of the model, its gradients and AdamW's two
moments on every process: 16 bytes per parameter in float32, 8 GB for a 0.5B model before any activation. FSDP2
(PyTorch's ``torch.distributed.fsdp.fully_shard``, Zhao et al. 2023) keeps 1 / W of each on every rank, as DTensors,
and gathers a layer's weights only while that layer runs:

    at rest                     weights, gradients, AdamW's moments: 1 / W each on every rank     16 B / W per param
    sampling, evaluation        every weight gathered once, for the whole generation (:func:`gathered`)
    update (each micro-batch)   each decoder layer gathered for its forward, freed, gathered again for its
                                backward, its gradient reduce-scattered as soon as that backward ends; the root's
                                weights (embeddings, final norm, tied head) gathered from the first forward to the
                                end of the backward

Only the trainer's plumbing changes; the math is the same function of the same batch. The ranks' micro-batch losses
carry the shares of :func:`policygrad.lm.update.micro_batch_share` taken against the WHOLE batch, so the one-process
gradient is the SUM of the ranks' gradients, where FSDP's reduce-scatter AVERAGES them (a sum with a pre-multiplied
1 / W, which gloo cannot do): the loss is multiplied by W (:func:`loss_scale`), exact for W a power of two. Every rank
runs every micro-batch, even one without tokens that count (its loss times 0): a layer's all-gather is a collective.

The decoder layers are found by the model's own ``_no_split_modules`` (the classes transformers never splits across
devices: ``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ``GPT2Block``...), each its own FSDP unit; the root unit holds
the rest, the tied embedding and output head together. Checkpoints hold full weights, the same files a one-process
run writes (:func:`full_state`); AdamW's state is saved gathered too and scattered back on resume.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from policygrad.distributed import World

__all__ = [
    "full_state",
    "gathered",
    "grad_norm",
    "is_sharded",
    "layers",
    "load_optimizer_state",
    "loss_scale",
    "same_width",
    "shard",
]


def layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers: its modules whose class is one of ``model._no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def shard(model: torch.nn.Module, world: World, keep_root: bool = True) -> torch.nn.Module:
    """``fully_shard`` each decoder layer, then the root; in place (the model's class becomes an ``FSDPModule``).
    The root keeps its weights gathered between the prompt pass and the completion pass of a micro-batch
    (``reshard_after_forward=False``), which share the key/value cache. Its embedding must be looked up inside the
    forward passes (``completion_logprobs(..., embed_once=False)``): a lookup outside them would leave the gradient
    in the gathered weight, never reduced. ``keep_root=False`` (the frozen KL reference, which has no backward pass
    to reshard its root after) reshards the root after every forward pass like the layers."""
    from torch.distributed.fsdp import fully_shard

    units = layers(model)
    if not units:
        raise ValueError(f"{type(model).__name__} names no decoder layer class in _no_split_modules to shard by")
    mesh = _mesh(world)
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=not keep_root)
    return model


def _mesh(world: World) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(world.device.type, (world.size,))


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def loss_scale(model: torch.nn.Module, world: World) -> float:
    """What a micro-batch's loss is multiplied by so that FSDP's averaging reduce-scatter gives the ranks' SUM."""
    return float(world.size) if is_sharded(model) else 1.0


@contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """Every weight gathered on every rank for the block (sampling, evaluation: hundreds of forward passes of one
    token each, which would otherwise all-gather every layer every time), sharded again after it. For an unsharded
    model, nothing."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model, recurse=False)


def same_width(rollout: Any, ref_logprobs: torch.Tensor | None, is_weights: torch.Tensor | None, world: World) -> tuple:
    """The update's (N, T) inputs right-padded to the longest T of any rank (tokens that do not count): a rank whose
    completions are all one token long would skip the completion pass, and with it its layers' all-gathers, while
    the others wait for them (:func:`policygrad.lm.rollout.completion_logprobs`). A collective."""
    width = world.maximum(rollout.completion_ids.shape[1])
    pad = (0, width - rollout.completion_ids.shape[1])
    ref_logprobs = None if ref_logprobs is None else torch.nn.functional.pad(ref_logprobs, pad)
    is_weights = None if is_weights is None else torch.nn.functional.pad(is_weights, pad, value=1.0)
    return rollout.widened(width), ref_logprobs, is_weights


def grad_norm(norm: torch.Tensor) -> float:
    """``clip_grad_norm_``'s total norm as a float: over DTensor gradients it is a DTensor of the local shard's
    contribution, made whole by ``full_tensor``."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    """The full (unsharded) weights and optimiser state on the CPU, on rank 0 (empty elsewhere). A collective:
    every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    # a tied weight (the output head that is the input embedding) gathers as a second, separate tensor; a
    # one-process checkpoint holds it once, under the name named_parameters() gives it
    names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    weights = {name: tensor for name, tensor in weights.items() if name in names}
    state = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    return weights, state


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """AdamW's full state (as :func:`full_state` saved it) scattered into the sharded optimiser. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
