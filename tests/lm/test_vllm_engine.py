"""vLLM as the training sampler (``decoder: vllm``, policygrad.lm.vllm_engine), against a stand-in engine with vLLM's
interface (fake_vllm.py) on the CPU: the policy's weights reach the engine before every step's sampling (LoRA: the
merged weights), its draws become the rollout with its log-probabilities as the sampler's side of truncated
importance sampling, a resumed run samples what the uninterrupted one did, and bad input is one line before any
model loads. The real engine on a GPU: benchmarks/gpu_check.sh."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from fake_vllm import install
from lm_helpers import tiny_config, weights  # tests/lm, on sys.path under pytest's default import mode

from policygrad.errors import UsageError
from policygrad.lm import vllm_engine
from policygrad.lm.trainer import train

pytestmark = pytest.mark.smoke


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """``import vllm`` finds the stand-in, and the GPU check passes (the device itself stays the CPU)."""
    import fake_vllm as module

    monkeypatch.syspath_prepend(str(install(tmp_path / "fake")))
    monkeypatch.setattr(vllm_engine, "_has_cuda", lambda: True)
    monkeypatch.setattr(module.LLM, "built", [])
    return module


def vllm_config(model, prompts, out, **overrides):
    values = dict(decoder="vllm", tis_cap=2.0, device="auto", save_every=1, keep_checkpoints=0)
    values.update(overrides)
    return tiny_config(model, prompts, out, **values)


def test_the_policy_reaches_the_engine_before_every_steps_sampling(fake_vllm, tiny_llama_chat, tiny_prompts, tmp_path):
    out = train(vllm_config(tiny_llama_chat, tiny_prompts, tmp_path / "run"))
    (engine,) = fake_vllm.LLM.built
    assert (
        engine.options["logprobs_mode"] == "processed_logprobs" and "distributed_executor_backend" not in engine.options
    )
    assert engine.engine_model.loads == 2 and engine.prefix_resets == 2  # one push a step, its old prefixes dropped
    assert len(engine.seen) == 2  # one generate call a step (no dynamic sampling)
    start, after_one = weights(tiny_llama_chat), weights(out / "checkpoints" / "step-000001")
    for name, tensor in engine.seen[1].items():  # step 2 sampled with the weights step 1's update left
        expected = after_one.get(name, after_one.get("model.embed_tokens.weight"))  # a tied head: saved once
        assert torch.equal(tensor, expected), name
    assert all(torch.equal(engine.seen[0][name], start[name]) for name in start)  # step 1: the initial weights
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for record in records:  # the engine's log-probs against the trainer's: a gap of rounding, weights of 1
        assert 0.0 <= record["tis/logprob_gap"] < 1e-4 and record["tis/capped_fraction"] == 0.0
    completions = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(completions) == 2 * 4 and all(isinstance(c["completion"], str) for c in completions)


def test_a_resumed_vllm_run_samples_what_the_uninterrupted_one_did(fake_vllm, tiny_llama_chat, tiny_prompts, tmp_path):
    whole = train(vllm_config(tiny_llama_chat, tiny_prompts, tmp_path / "whole", max_steps=3))
    part = vllm_config(tiny_llama_chat, tiny_prompts, tmp_path / "part", max_steps=2)
    train(part)
    resumed = train(vllm_config(tiny_llama_chat, tiny_prompts, tmp_path / "part", max_steps=3, resume=True))
    a, b = weights(whole / "final"), weights(resumed / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    lines = [(run / "completions.jsonl").read_text() for run in (whole, resumed)]
    assert lines[0] == lines[1]


def test_lora_pushes_the_merged_weights(fake_vllm, tiny_llama_chat, tiny_prompts, tmp_path):
    pytest.importorskip("peft", reason="the lora extra (PEFT) is part of make install")
    from policygrad.lm.models import load_model

    out = train(vllm_config(tiny_llama_chat, tiny_prompts, tmp_path / "run", lora_rank=4, lora_alpha=8.0, lr=5e-2))
    (engine,) = fake_vllm.LLM.built
    merged, _ = load_model(str(out / "checkpoints" / "step-000001"))  # base + (alpha / r) B A, by PEFT
    expected = merged.state_dict()
    assert engine.seen[1].keys() == expected.keys()
    for name, tensor in engine.seen[1].items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(engine.seen[1][name], engine.seen[0][name]) for name in expected)  # it trained


def test_a_stop_token_the_engine_leaves_out_is_put_back_without_a_logprob():
    step = {7: SimpleNamespace(logprob=-0.5)}
    ended = SimpleNamespace(token_ids=[7], logprobs=[step], finish_reason="stop")
    ids, logprobs = vllm_engine._row(ended, eos_ids=[2])
    assert ids == [7, 2] and logprobs[0] == -0.5 and math.isnan(logprobs[1])
    kept = SimpleNamespace(token_ids=[7, 2], logprobs=[step, {2: SimpleNamespace(logprob=-1.0)}], finish_reason="stop")
    assert vllm_engine._row(kept, eos_ids=[2]) == ([7, 2], [-0.5, -1.0])
    cut = SimpleNamespace(token_ids=[7, 7], logprobs=[step, step], finish_reason="length")
    assert vllm_engine._row(cut, eos_ids=[2]) == ([7, 7], [-0.5, -0.5])


def test_vllm_without_a_gpu_or_the_importance_correction_is_one_line(
    fake_vllm, tiny_llama_chat, tiny_prompts, tmp_path, monkeypatch
):
    assert vllm_engine._has_cuda()  # the fixture's stand-in GPU
    with pytest.raises(UsageError, match=r"--decoder: vllm draws tokens with its own kernels.*set --tis-cap"):
        train(vllm_config(tiny_llama_chat, tiny_prompts, tmp_path / "a", tis_cap=0.0))
    with pytest.raises(UsageError, match=r"--decoder: vllm generates on a CUDA GPU, and --device cpu keeps the run"):
        train(vllm_config(tiny_llama_chat, tiny_prompts, tmp_path / "b", device="cpu"))
    monkeypatch.setattr(vllm_engine, "_has_cuda", lambda: False)
    with pytest.raises(UsageError, match=r"--decoder: vllm generates on a CUDA GPU and torch sees none here"):
        train(vllm_config(tiny_llama_chat, tiny_prompts, tmp_path / "c"))
    assert not any((tmp_path / name).exists() for name in "abc") and not fake_vllm.LLM.built


def test_vllm_without_the_package_is_one_line_before_any_model_loads(tiny_prompts, tmp_path):
    command = [sys.executable, "-m", "policygrad", "train", "--model", str(tmp_path / "no-such-model")]
    command += ["--prompts", str(tiny_prompts), "--decoder", "vllm", "--tis-cap", "2", "--output-dir"]
    done = subprocess.run([*command, str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "policygrad train: error: --decoder: vllm needs the vllm package, on a machine with a CUDA GPU: "
        "pip install 'policygrad[vllm]'"
    ]
    assert not (tmp_path / "run").exists()


def test_a_vllm_build_without_the_in_process_path_loads_through_apply_model():
    loaded = []

    class EngineModel:
        def load_weights(self, pairs):
            loaded.extend(pairs)

    engine = vllm_engine.VLLMEngine.__new__(vllm_engine.VLLMEngine)  # no engine to build: only push is under test
    engine.llm = SimpleNamespace(apply_model=lambda fn: [fn(EngineModel())], reset_prefix_cache=lambda: True)
    engine.push(iter([("model.norm.weight", torch.ones(2))]))
    assert [name for name, _ in loaded] == ["model.norm.weight"]
    engine.llm = SimpleNamespace(reset_prefix_cache=lambda: True)
    with pytest.raises(RuntimeError, match="no way to load weights"):
        engine.push(iter([]))
