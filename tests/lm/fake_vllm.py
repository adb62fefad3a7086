"""A stand-in for the ``vllm`` package with the part of its interface :mod:`policygrad.lm.vllm_engine` uses, on the CPU:
``LLM(model=folder, ...)``, ``LLM.generate(requests, params)`` returning request outputs whose completions carry
``token_ids``, per-step ``logprobs`` ({token id: Logprob}) and ``finish_reason``, ``SamplingParams`` with a per-request
seed, ``reset_prefix_cache``, and the in-process engine's model at ``llm_engine.model_executor.driver_worker.worker
.model_runner.model`` with ``load_weights``. It decodes with transformers, one whole forward pass per token (no
cache), so its arithmetic differs from the trainer's as a real engine's does, only less.

Tests put it on the path as ``vllm`` (:func:`install`); every engine built is kept in ``LLM.built``.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

__all__ = ["LLM", "Logprob", "SamplingParams", "install"]


def install(folder: Path) -> Path:
    """Write a ``vllm`` package into ``folder`` that re-exports this module; put ``folder`` on sys.path (or
    PYTHONPATH) to have ``import vllm`` find it."""
    package = folder / "vllm"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\nfrom fake_vllm import *  # noqa\n"
        "from fake_vllm import LLM, Logprob, SamplingParams  # noqa\n"
    )
    return folder


class SamplingParams:
    def __init__(
        self,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 16,
        logprobs: int | None = None,
        seed: int | None = None,
        stop_token_ids: list[int] | None = None,
    ) -> None:
        self.n, self.temperature, self.top_p, self.max_tokens = n, temperature, top_p, max_tokens
        self.logprobs, self.seed, self.stop_token_ids = logprobs, seed, list(stop_token_ids or [])


class Logprob:
    def __init__(self, logprob: float) -> None:
        self.logprob = logprob


class _EngineModel:
    """The engine's copy of the model; ``load_weights`` copies (name, tensor) pairs in by name, as vLLM's does."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.loads = 0

    @torch.no_grad()
    def load_weights(self, weights) -> set[str]:
        own = self.model.state_dict()
        loaded = set()
        for name, tensor in weights:
            own[name].copy_(tensor.detach().to(own[name].dtype))
            loaded.add(name)
        self.loads += 1
        return loaded


class LLM:
    built: list[LLM] = []

    def __init__(self, model: str, **options: Any) -> None:
        from transformers import AutoModelForCausalLM

        self.options = options
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        engine_model = _EngineModel(self.model)
        worker = SimpleNamespace(model_runner=SimpleNamespace(model=engine_model))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(worker=worker)))
        self.engine_model = engine_model
        self.prefix_resets = 0
        self.seen: list[dict[str, torch.Tensor]] = []  # the weights each generate call decoded with
        LLM.built.append(self)

    def reset_prefix_cache(self) -> bool:
        self.prefix_resets += 1
        return True

    @torch.no_grad()
    def generate(self, requests, params, use_tqdm: bool = True):
        self.seen.append({k: v.clone() for k, v in self.model.state_dict().items()})
        params = params if isinstance(params, list) else [params] * len(requests)
        return [
            SimpleNamespace(outputs=[self._complete(request["prompt_token_ids"], p, k) for k in range(p.n)])
            for request, p in zip(requests, params)
        ]

    def _complete(self, prompt: list[int], params: SamplingParams, index: int) -> SimpleNamespace:
        generator = torch.Generator().manual_seed(((params.seed or 0) + 7919 * index) % 2**63)
        ids: list[int] = []
        logprobs: list[dict[int, Logprob]] = []
        finish = "length"
        for _ in range(params.max_tokens):
            logits = self.model(torch.tensor([prompt + ids])).logits[0, -1].float()
            log_probs = torch.log_softmax(logits / params.temperature, dim=-1)
            token = int(torch.multinomial(log_probs.exp(), 1, generator=generator))
            ids.append(token)
            logprobs.append({token: Logprob(float(log_probs[token]))})
            if token in params.stop_token_ids:
                finish = "stop"
                break
        assert all(math.isfinite(next(iter(step.values())).logprob) for step in logprobs)
        return SimpleNamespace(index=index, token_ids=ids, logprobs=logprobs, finish_reason=finish)
