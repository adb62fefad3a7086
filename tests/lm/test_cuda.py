"""The GPU paths, run where a CUDA device exists (benchmarks/gpu_check.sh runs them on a lent GPU; on a machine
without one they skip with the allowed reason "no CUDA device"): a tiny run trains on the GPU and its checkpoint loads
on the CPU with the same logits, LoRA trains there too, and torchrun's NCCL path runs one process (with and without FSDP2, with the TIS
correction)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from lm_helpers import tiny_config, weights  # tests/lm, on sys.path under pytest's default import mode

from policygrad.configs import config_to_dict
from policygrad.lm.trainer import train

pytestmark = [
    pytest.mark.smoke,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (benchmarks/gpu_check.sh runs these)"),
]


def test_a_tiny_run_trains_on_the_gpu_and_its_checkpoint_loads_on_the_cpu(tiny_llama_chat, tiny_prompts, tmp_path):
    from policygrad.lm.models import load_model

    train(tiny_config(tiny_llama_chat, tiny_prompts, tmp_path / "run", device="cuda", kl_coef=0.05))
    final, initial = weights(tmp_path / "run" / "final"), weights(tiny_llama_chat)
    assert all(torch.isfinite(t).all() for t in final.values())
    assert max((final[k] - initial[k]).abs().max() for k in final) > 1e-3
    ids = torch.tensor([[5, 20, 30, 40]])
    on_cpu, _ = load_model(str(tmp_path / "run" / "final"))
    on_gpu, _ = load_model(str(tmp_path / "run" / "final"), device="cuda")
    with torch.no_grad():
        assert torch.allclose(on_gpu.eval()(ids.cuda()).logits.cpu(), on_cpu.eval()(ids).logits, atol=1e-4)


def test_lora_and_gradient_checkpointing_on_the_gpu(tiny_llama_chat, tiny_prompts, tmp_path):
    pytest.importorskip("peft", reason="the lora extra (PEFT) is part of make install")
    config = tiny_config(
        tiny_llama_chat, tiny_prompts, tmp_path / "run", device="cuda", lora_rank=4, gradient_checkpointing=True
    )
    train(config)
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("fsdp", [False, True])  # FSDP2 on a one-GPU mesh: NCCL all-gathers and reduce-scatters
def test_torchrun_runs_one_nccl_process(fsdp, tiny_llama_chat, tiny_prompts, tmp_path):
    config = tiny_config(tiny_llama_chat, tiny_prompts, tmp_path / "run", device="cuda", fsdp=fsdp, tis_cap=2.0)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(config_to_dict(config)))
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    done = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "1", "-m", "policygrad", "train", "--recipe", str(recipe)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_vllm_samples_the_pushed_policy_on_the_gpu(tiny_llama_chat, tiny_prompts, tmp_path):
    # the real engine (decoder: vllm, colocated); the GPU check installs vllm in an environment of its own (it pins
    # its own torch) and runs `-k vllm` there
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (a GPU-only extra: benchmarks/gpu_check.sh installs it)")
    import json

    config = tiny_config(
        tiny_llama_chat, tiny_prompts, tmp_path / "run", device="cuda", decoder="vllm", tis_cap=2.0, max_steps=3
    )
    records = [json.loads(line) for line in (train(config) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "tis/logprob_gap" in r] == [1, 2, 3]
    for record in records:  # the engine's log-probs of the pushed weights against the trainer's: rounding apart
        assert record["tis/logprob_gap"] < 0.05 and record["tis/capped_fraction"] < 0.01, record
