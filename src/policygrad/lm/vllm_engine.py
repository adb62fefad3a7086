"""vLLM as the sampling engine of training (``decoder: vllm``): colocated on the training GPU, fed the policy's weights
before every step's sampling, its draws corrected for by truncated importance sampling.

Generation is most of a GRPO step on a GPU, and vLLM (Kwon et al. 2023, paged attention and continuous batching) is
the engine the peers use for it (TRL's ``vllm_mode="colocate"``, verl's hybrid engine, OpenRLHF). Colocated means one
process holds both: the trainer's model and a vLLM engine over a copy of its weights, on the same GPU, the engine
given ``vllm_gpu_memory_utilization`` of the GPU's memory for its weights and key/value blocks. Under torchrun every
process holds its own engine on its own GPU (vLLM's ``external_launcher``: the processes are torchrun's, not vLLM's)
and samples its own shard of the prompts, as the transformers path does.

The loop around it is the one of :func:`policygrad.lm.rollout.sample`, with vLLM drawing the tokens:

    before sampling at step k:  if the policy changed since the last push, push its weights into the engine
                                (LoRA: the base weights plus (alpha / r) B A, computed, not merged in place)
    sample:                     G completions of each prompt, prompt b drawing from seed step_seed(seed, k, b),
                                with each drawn token's log-probability under softmax(z / tau)
    then as always:             the trainer's log-prob pass gives pi_old; the policy term of each token is weighted
                                by min(pi_old / pi_vllm, C)   (``tis_cap`` C, required: vLLM's kernels round
                                differently from the trainer's, so pi_vllm != pi_old even for the same weights)

Per-request seeds make the draws a function of (seed, step, prompt), so a resumed run samples what the uninterrupted
one sampled, given the same engine build. Evaluation stays on transformers' greedy decoding: held-out numbers do not
depend on the engine.

Requires a CUDA GPU and the ``vllm`` package (``pip install 'policygrad[vllm]'`` on a GPU machine; vLLM pins its own
torch). Without either, ``decoder: vllm`` is one line from :func:`check` before any model loads.

Not yet run on a GPU in this project's tests (no GPU was lent): the suite checks this module against a stand-in
engine with vLLM's interface (``tests/lm/fake_vllm.py``), and ``benchmarks/gpu_check.sh`` runs it for real.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from policygrad.errors import UsageError
from policygrad.lm.rollout import Rollout, assemble, encode_prompts, eos_token_ids, pad_token_id, rollout_logprobs

__all__ = ["VLLMEngine", "check", "policy_weights"]


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def check(config: Any) -> None:
    """Refuse, in one line, ``decoder: vllm`` where it cannot run: no vllm package, no CUDA GPU, a CPU device, or
    no importance correction for the engine's arithmetic (``tis_cap``)."""
    if importlib.util.find_spec("vllm") is None:
        raise UsageError(
            "--decoder", "vllm needs the vllm package, on a machine with a CUDA GPU: pip install 'policygrad[vllm]'"
        )
    if not _has_cuda():
        raise UsageError("--decoder", "vllm generates on a CUDA GPU and torch sees none here; use --decoder auto")
    if str(config.device).startswith("cpu"):
        raise UsageError("--decoder", "vllm generates on a CUDA GPU, and --device cpu keeps the run on the CPU")
    if config.tis_cap <= 0:
        raise UsageError(
            "--decoder",
            "vllm draws tokens with its own kernels, whose probabilities differ from the trainer's: "
            "set --tis-cap (e.g. 2) to correct for it",
        )


def policy_weights(model: torch.nn.Module, adapter: Any = None) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of every weight of the policy as a plain transformers model names it: the model's own state
    without LoRA; with LoRA (``adapter``, a PeftModel) each adapted layer's W + (alpha / r) B A, computed from
    PEFT's ``get_delta_weight`` without touching the training weights (merging in place and back again would not
    restore them bit for bit), and the ``lora_`` tensors left out."""
    if adapter is None:
        for name, tensor in model.state_dict().items():
            yield name, _whole(tensor)
        return
    base = adapter.get_base_model()
    deltas = {}
    for name, module in base.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            delta = sum(module.get_delta_weight(active) for active in module.active_adapters)
            deltas[f"{name}.base_layer.weight"] = delta
    for name, tensor in base.state_dict().items():
        if "lora_" in name:
            continue
        if name in deltas:
            tensor = tensor + deltas[name].to(tensor.dtype)
        yield name.replace(".base_layer.", "."), _whole(tensor)


def _whole(tensor: Tensor) -> Tensor:
    """A weight in full: an FSDP2 shard (a DTensor) gathered from every rank (a collective: every rank pushes the
    same weights in the same order), any other tensor as it is."""
    full = getattr(tensor, "full_tensor", None)
    return full() if full is not None else tensor


def _engine_model(llm: Any) -> Any:
    """The engine's own torch module (its ``load_weights`` takes (name, tensor) pairs), where vLLM keeps it in
    one process: V1's in-process engine, then V0's; None where neither path leads to it."""
    paths = (
        ("llm_engine", "model_executor", "driver_worker", "worker", "model_runner", "model"),
        ("llm_engine", "model_executor", "driver_worker", "model_runner", "model"),
    )
    for path in paths:
        found = llm
        for attribute in path:
            found = getattr(found, attribute, None)
        if found is not None and hasattr(found, "load_weights"):
            return found
    return None


class VLLMEngine:
    """A colocated vLLM engine over a copy of the policy (see the module docstring)."""

    def __init__(self, model_folder: str, config: Any, device: torch.device, launched: bool) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process, to push weights
        import vllm

        self._vllm = vllm
        self.pushed_step: int | None = None  # the step whose sampling last saw the pushed weights
        options: dict[str, Any] = {
            "model": model_folder,
            "dtype": "bfloat16" if config.precision in ("auto", "bfloat16") else "float32",
            "gpu_memory_utilization": config.vllm_gpu_memory_utilization,
            "enable_prefix_caching": True,  # a group's G requests share one prompt
            "logprobs_mode": "processed_logprobs",  # log softmax(z / tau), the distribution the trainer scores
            "seed": config.seed,
        }
        if device.index is not None:
            torch.cuda.set_device(device)
        if launched:  # torchrun's processes, one engine on each process's GPU
            options["distributed_executor_backend"] = "external_launcher"
        self.llm = vllm.LLM(**options)

    def push(self, weights: Iterator[tuple[str, Tensor]]) -> None:
        """Load the policy's current weights into the engine (it converts dtypes and fuses projections itself) and
        drop its prefix cache, which holds key/value blocks of the old weights."""
        model = _engine_model(self.llm)
        if model is not None:
            model.load_weights(weights)
        elif hasattr(self.llm, "apply_model"):  # vLLM's documented way to run a function on its model
            pairs = list(weights)
            self.llm.apply_model(lambda engine_model: engine_model.load_weights(pairs))
        else:
            raise RuntimeError("this vLLM build offers no way to load weights into its engine (see vllm_engine.py)")
        reset = getattr(self.llm, "reset_prefix_cache", None)
        if reset is not None:
            reset()

    @torch.no_grad()
    def sample(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        prompts: Sequence[str],
        seeds: Sequence[int],
        group_size: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        micro_batch_size: int | None = None,
        autocast_dtype: torch.dtype | None = None,
        score_tokens: bool = True,
        score_temperature: float | None = None,
        **_: Any,
    ) -> Rollout:
        """:func:`policygrad.lm.rollout.sample`'s rollout, the tokens drawn by vLLM: prompt ``b`` with seed
        ``seeds[b]``; ``sampler_logprobs`` are the engine's, and ``logprobs`` the trainer's pass over them."""
        device = next(model.parameters()).device
        prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)  # (B, P)
        eos_ids = eos_token_ids(model, tokenizer)
        requests = [{"prompt_token_ids": ids[mask.bool()].tolist()} for ids, mask in zip(prompt_ids, prompt_mask)]
        params = [
            self._vllm.SamplingParams(
                n=group_size,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                logprobs=0,  # the drawn token's own log-probability
                seed=seed,
                stop_token_ids=list(eos_ids),
            )
            for seed in seeds
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        rows = [_row(completion, eos_ids) for output in outputs for completion in output.outputs]  # N of them
        width = max(1, max(len(ids) for ids, _ in rows))
        completion_ids = torch.full((len(rows), width), pad_token_id(model, tokenizer), dtype=torch.long)
        drawn = torch.zeros(len(rows), width)
        for i, (ids, logprobs) in enumerate(rows):
            completion_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            drawn[i, : len(ids)] = torch.tensor(logprobs)
        completion_ids, drawn = completion_ids.to(device), drawn.to(device)
        rollout = assemble(tokenizer, prompts, prompt_ids, prompt_mask, completion_ids, eos_ids, group_size, drawn)
        if score_tokens:
            scored_at = temperature if score_temperature is None else score_temperature
            rollout.logprobs = rollout_logprobs(model, rollout, scored_at, micro_batch_size, autocast_dtype)
        missing = rollout.sampler_logprobs.isnan()  # tokens the engine gave no log-probability for: weight 1
        if missing.any() and rollout.logprobs is not None:
            rollout.sampler_logprobs = torch.where(missing, rollout.logprobs, rollout.sampler_logprobs)
        return rollout


def _row(completion: Any, eos_ids: Sequence[int]) -> tuple[list[int], list[float]]:
    """One completion's token ids and each one's log-probability. vLLM ends a request at a stop token and keeps it
    in ``token_ids``; where a build leaves it out (``finish_reason`` "stop" without one at the end) it is put back,
    with no log-probability (NaN: the trainer's own is used, so its importance weight is 1)."""
    ids = list(completion.token_ids)
    logprobs = [_drawn(step, token) for step, token in zip(completion.logprobs or [], ids)]
    logprobs += [math.nan] * (len(ids) - len(logprobs))
    if completion.finish_reason == "stop" and (not ids or ids[-1] not in eos_ids):
        ids.append(eos_ids[0])
        logprobs.append(math.nan)
    return ids, logprobs


def _drawn(step: dict[int, Any], token: int) -> float:
    """The log-probability vLLM reports for the drawn ``token`` at one step ({token id: Logprob})."""
    entry = step.get(token)
    return math.nan if entry is None else float(entry.logprob)
