"""Peak memory of one GRPO update of the reference recipe's shape: full fine-tuning, LoRA, gradient checkpointing.

The model is Qwen2.5-0.5B-Instruct's architecture (its config written out here: 24 layers, hidden 896, vocabulary
151,936, tied embeddings) with random weights built locally, since the hub is unreachable; memory does not depend on
the values of the weights. The update is policygrad's own (:func:`policygrad.lm.update.update`): the shared-prompt
forward, the loss, backward in micro-batches, gradient clipping and the AdamW step, on a synthetic rollout of the
recipe's shape (recipes/qwen2.5-0.5b.yaml: 16 prompts x 8 completions, micro-batches of 16 rows, prompts of
``--prompt-tokens``, completions of 64 tokens, float32 weights).

Each configuration runs in a fresh process so that one's peak does not hide another's. On a CPU the peak is the
process's maximum resident set size (``ru_maxrss``, with glibc's malloc told to map every block of 64 KiB or more
on its own, so that freed tensors leave the resident set), which includes the Python interpreter and the libraries
(the ``baseline`` column: the same process before the model is built); on a GPU it is
``torch.cuda.max_memory_allocated``. The first micro-batch's activations come before any gradient exists; from the
second on they sit on top of the accumulated gradients, and every later micro-batch starts from that same state, so
the peak of 2 micro-batches is the peak of the recipe's 8: ``--micro-batches`` (default 2, to keep a CPU run short)
runs that many, and ``--check-accumulation`` runs full fine-tuning with 1 and with twice as many to show it.

Gradient checkpointing recomputes each layer from its input alone, so it cannot use the key/value cache that
policygrad's shared-prompt forward hands from a group's one prompt pass to its 8 completions: with it, every row runs
its prompt again (:func:`policygrad.lm.rollout.unshared_logprobs`), and the update does more work than the extra
forward pass alone.

    python benchmarks/memory.py --check-accumulation   # CPU: 16 minutes on 2 AMD EPYC cores
    python benchmarks/memory.py --device cuda        # the same on a GPU (benchmarks/gpu_check.sh runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

QWEN25_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
"""Qwen2.5-0.5B-Instruct's config.json, the fields that set its size."""

MODES = {
    "full fine-tuning": dict(lora_rank=0, gradient_checkpointing=False),
    "full + gradient checkpointing": dict(lora_rank=0, gradient_checkpointing=True),
    "LoRA r=16, all linear layers": dict(lora_rank=16, gradient_checkpointing=False),
    "LoRA r=16 + gradient checkpointing": dict(lora_rank=16, gradient_checkpointing=True),
}


def one(mode: str, device: str, prompt_tokens: int, micro_batches: int, threads: int) -> dict:
    """Build the model, run one update in ``mode``, return its peak memory and time (in this process)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from policygrad.lm.config import GRPOConfig
    from policygrad.lm.lora import attach, enable_gradient_checkpointing
    from policygrad.lm.rollout import Rollout
    from policygrad.lm.update import update

    torch.set_num_threads(threads)
    baseline = _peak_bytes(device)
    settings = MODES[mode]
    config = GRPOConfig(
        model="qwen2.5-0.5b-shape",
        prompts_per_step=16,
        group_size=8,
        max_new_tokens=64,
        micro_batch_size=16,
        lr=1e-5,
        device=device,
        precision="float32",
        **settings,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B)).to(device).eval()
    if settings["lora_rank"]:
        attach(model, config)
    if settings["gradient_checkpointing"]:
        enable_gradient_checkpointing(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    rows = 16 * micro_batches  # whole groups of 8: 2 prompts per micro-batch
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 50000, (rows // 8, prompt_tokens), generator=g).repeat_interleave(8, 0)
    rollout = Rollout(
        prompts=[f"p{i // 8}" for i in range(rows)],
        prompt_ids=prompts.to(device),
        prompt_mask=torch.ones_like(prompts).to(device),
        completion_ids=torch.randint(100, 50000, (rows, 64), generator=g).to(device),
        completion_mask=torch.ones(rows, 64, dtype=torch.long).to(device),
        completions=[""] * rows,
        logprobs=None,
        group_size=8,
        truncated=torch.zeros(rows, dtype=torch.bool).to(device),
    )
    advantages = torch.randn(rows, generator=g)
    start = time.perf_counter()
    update(model, optimizer, rollout, advantages, None, 0.0, config)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(
        mode=mode,
        peak_bytes=_peak_bytes(device),
        baseline_bytes=baseline,
        update_s=seconds,
        trainable_params=trainable,
        params=sum(p.numel() for p in model.parameters()),
        rows=rows,
    )


def _peak_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompt-tokens", type=int, default=160, help="prompt length in tokens (passage + chat)")
    parser.add_argument("--micro-batches", type=int, default=2, help="micro-batches of 16 rows in the update")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--check-accumulation", action="store_true", help="full fine-tuning with twice the micro-batches too"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/memory.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one mode in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.device, args.prompt_tokens, args.micro_batches, args.threads)))
        return
    runs = [(mode, args.micro_batches) for mode in MODES]
    if args.check_accumulation:  # full fine-tuning with 1 and with twice the micro-batches
        runs[1:1] = [("full fine-tuning", 1), ("full fine-tuning", 2 * args.micro_batches)]
    results = []
    for mode, micro in runs:
        command = [sys.executable, __file__, "--one", mode, "--device", args.device]
        command += ["--prompt-tokens", str(args.prompt_tokens), "--micro-batches", str(micro)]
        command += ["--threads", str(args.threads)]
        # glibc's malloc keeps freed blocks in its heap and raises its mmap threshold as large blocks come and go, so
        # a process's resident set drifts above its live tensors (measured here: LoRA's peak 16.4 GiB without this,
        # above full fine-tuning's); a fixed threshold of 64 KiB gives every tensor of note its own mapping, returned
        # to the system when freed, so the peak follows what is alive
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if args.device == "cpu" else None
        done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        print(
            f"{mode:<36} {micro} micro-batch(es)  peak {result['peak_bytes'] / 2**30:5.2f} GiB  (process before the "
            f"model {result['baseline_bytes'] / 2**30:4.2f} GiB)  update {result['update_s']:6.1f} s  trainable "
            f"{result['trainable_params'] / 1e6:7.2f} M of {result['params'] / 1e6:.1f} M",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=args.device, cpu=_cpu(), prompt_tokens=args.prompt_tokens, threads=args.threads)
    args.out.write_text(json.dumps(dict(meta=meta, results=results), indent=1) + "\n")
    print(f"written to {args.out}")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
