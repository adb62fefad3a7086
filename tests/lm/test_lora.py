"""LoRA through PEFT and gradient checkpointing (policygrad.lm.lora), on the tiny random models of conftest.py: the base
weights stay frozen, the adapters train, a checkpoint holds the adapter (and on request a merged model that plain
transformers loads), resume is exact, the KL reference is the adapter switched off, gradient checkpointing gives the
same gradients, and bad input is one line before any weight loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from lm_helpers import tiny_config, weights  # tests/lm, on sys.path under pytest's default import mode

from policygrad.errors import UsageError
from policygrad.lm.lora import (
    ADAPTER_CONFIG,
    MERGED,
    AdapterOff,
    attach,
    enable_gradient_checkpointing,
    linear_names,
    recomputing,
)
from policygrad.lm.models import load_model
from policygrad.lm.trainer import train

pytestmark = pytest.mark.smoke

peft = pytest.importorskip("peft", reason="the lora extra (PEFT) is part of make install")


def _adapter_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def lora_config(model, prompts, out, **overrides):
    values = dict(lora_rank=4, lora_alpha=8.0, max_steps=2, lr=5e-2)
    values.update(overrides)
    return tiny_config(model, prompts, out, **values)


def test_lora_trains_the_adapters_and_leaves_the_base_weights_alone(tiny_llama_chat, tiny_prompts, tmp_path):
    out = tmp_path / "run"
    train(lora_config(tiny_llama_chat, tiny_prompts, out))
    final = out / "final"
    assert (final / ADAPTER_CONFIG).is_file() and not (final / "model.safetensors").exists()
    adapter = _adapter_weights(final)
    assert adapter and all("lora_" in name for name in adapter)
    # B starts at zero: a trained adapter has moved it
    assert any(name.endswith("lora_B.weight") and tensor.abs().max() > 0 for name, tensor in adapter.items())
    assert json.loads((final / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == str(tiny_llama_chat)
    # the base weights of the trained model are exactly the initial ones: merged = base + (alpha/r) B A
    merged, _ = load_model(str(final))
    base, _ = load_model(str(tiny_llama_chat))
    start = weights(tiny_llama_chat)
    changed = []
    for name, parameter in merged.state_dict().items():
        if name in start and not torch.equal(parameter, start[name]):
            changed.append(name)
    assert changed and all(any(p in name for p in ("q_proj", "k_proj", "v_proj", "o_proj", "mlp")) for name in changed)
    assert "model.embed_tokens.weight" not in changed and "model.norm.weight" not in changed


def test_lora_resume_is_exact(tiny_llama_chat, tiny_prompts, tmp_path):
    straight = tmp_path / "straight"
    train(lora_config(tiny_llama_chat, tiny_prompts, straight, max_steps=3, kl_coef=0.1))
    split = tmp_path / "split"
    train(lora_config(tiny_llama_chat, tiny_prompts, split, max_steps=1, kl_coef=0.1))
    train(lora_config(tiny_llama_chat, tiny_prompts, split, max_steps=3, kl_coef=0.1, resume=True))
    expected, resumed = _adapter_weights(straight / "final"), _adapter_weights(split / "final")
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
    metrics = [
        [json.loads(line)["kl"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"kl"' in line]
        for run in (straight, split)
    ]
    assert metrics[0] == metrics[1] and metrics[0][0] == 0.0  # the adapters start as the base: no KL at step 1


def test_the_merged_model_loads_in_plain_transformers_and_computes_the_same_logits(
    tiny_llama_chat, tiny_prompts, tmp_path
):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    train(lora_config(tiny_llama_chat, tiny_prompts, out, lora_merged=True))
    plain = AutoModelForCausalLM.from_pretrained(str(out / "final" / MERGED)).eval()
    ours, _ = load_model(str(out / "final"))
    ids = torch.tensor([[5, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, ours.eval()(ids).logits, atol=1e-6)


def test_the_reference_with_adapters_off_is_the_base_model(tiny_llama_chat):
    model, _ = load_model(str(tiny_llama_chat))
    base, _ = load_model(str(tiny_llama_chat))
    config = tiny_config(tiny_llama_chat, tiny_llama_chat, tiny_llama_chat, lora_rank=2)
    adapter = attach(model, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.fill_(0.5)  # adapters that change the output
    ids = torch.tensor([[5, 6, 7, 8]])
    reference = AdapterOff(adapter, model)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits)
        assert torch.equal(reference(input_ids=ids).logits, base(input_ids=ids).logits)
        assert torch.equal(reference.forward(input_ids=ids).logits, base(input_ids=ids).logits)
        assert not torch.allclose(model(ids).logits, base(ids).logits)  # switched back on afterwards
    assert "logits_to_keep" in __import__("inspect").signature(reference.forward).parameters


def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama_chat):
    ids = torch.tensor([[5, 20, 30, 40, 50, 60, 70, 80]])

    def gradients(checkpointing: bool):
        model, _ = load_model(str(tiny_llama_chat))
        model.eval()
        if checkpointing:
            assert enable_gradient_checkpointing(model) == 2  # both decoder layers
        with recomputing(model):
            model(ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain, recomputed = gradients(False), gradients(True)
    for name, grad in plain.items():
        assert torch.allclose(recomputed[name], grad, atol=1e-7, rtol=1e-6), name


def test_a_run_with_gradient_checkpointing_ends_with_the_same_weights(tiny_llama_chat, tiny_prompts, tmp_path):
    train(tiny_config(tiny_llama_chat, tiny_prompts, tmp_path / "plain"))
    train(tiny_config(tiny_llama_chat, tiny_prompts, tmp_path / "gc", gradient_checkpointing=True))
    expected, got = weights(tmp_path / "plain" / "final"), weights(tmp_path / "gc" / "final")
    # not bit for bit: with checkpointing each row's prompt is run again (no shared-prompt cache), which sums in
    # another order; AdamW at lr 1e-2 turns those last bits into ~4e-6 after 2 steps
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, atol=2e-5), name


def test_target_modules_the_model_lacks_are_one_line_before_any_weight_loads(tiny_llama_chat, tiny_prompts, tmp_path):
    assert linear_names(str(tiny_llama_chat)) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    )
    config = lora_config(tiny_llama_chat, tiny_prompts, tmp_path / "run", lora_target_modules=("q_proj", "c_attn"))
    with pytest.raises(UsageError, match=r"no linear layer named c_attn \(its linear layers: down_proj, gate_proj"):
        train(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(lora_rank=-1), "--lora-rank: must be >= 0 (0: no LoRA), got -1"),
        (dict(lora_merged=True), "--lora-merged: merges LoRA adapters: set --lora-rank too"),
        (dict(lora_rank=4, lora_alpha=0.0), "--lora-alpha"),
        (dict(lora_rank=4, lora_target_modules=()), "--lora-target-modules: names no module"),
        (dict(lora_rank=4, fsdp=True, lora_merged=True), "--lora-merged: under --fsdp not yet: drop it and merge"),
    ],
)
def test_bad_lora_flags_are_one_line(fields, message):
    from policygrad.lm.config import GRPOConfig

    with pytest.raises(UsageError) as caught:
        GRPOConfig(**fields)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_without_peft_lora_is_one_line(tiny_llama_chat, tiny_prompts, tmp_path):
    # a fresh interpreter in which `import peft` fails, running the CLI
    script = (
        "import sys; sys.modules['peft'] = None\n"
        "from policygrad.cli import main\n"
        f"sys.argv = ['policygrad', 'train', '--model', {str(tiny_llama_chat)!r}, '--prompts', {str(tiny_prompts)!r},"
        f" '--lora-rank', '4', '--output-dir', {str(tmp_path / 'run')!r}, '--threads', '1']\n"
        "sys.exit(main())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "policygrad train: error: --lora-rank: LoRA needs PEFT, which is not installed: pip install 'policygrad[lora]'"
    ]
    assert not (tmp_path / "run").exists()


def test_export_merges_a_lora_checkpoint_and_serve_asks_for_the_export(tiny_llama_chat, tiny_prompts, tmp_path):
    out = tmp_path / "run"
    train(lora_config(tiny_llama_chat, tiny_prompts, out))
    refused = subprocess.run(
        [sys.executable, "-m", "policygrad", "serve", str(out), "--threads", "1"], capture_output=True, text=True
    )
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"policygrad serve: error: DIR: {out / 'final'} holds a LoRA adapter; serve its export, which merges it into "
        f"the base weights: policygrad export {out} --output EXPORT_DIR, then policygrad serve EXPORT_DIR"
    ]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "policygrad",
            "export",
            str(out),
            "--output",
            str(tmp_path / "exported"),
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported")).eval()
    ours, _ = load_model(str(out / "final"))
    ids = torch.tensor([[5, 20, 30, 40]])
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, ours.eval()(ids).logits, atol=1e-6)
