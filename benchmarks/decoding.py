"""Where a decoding step's time goes on a CPU, against the memory-bandwidth bound (issue 17).

A decoding step of R rows runs every weight once against R new tokens: it must read the weights (the bandwidth
bound, ``R x bandwidth / weight bytes`` tokens a second) and do 2 x parameters x R FLOPs (the compute floor at the
machine's matrix-product rate). This script measures, in one process, with the embedded model and the benchmark's
prompts (``grpo_vs_trl.py``: 8 completions per prompt, 128-token pydoc passages):

1. the step time of ``policygrad.lm.rollout.generate`` (no stop token, 32 new tokens against 1, best of 3) for R = 16
   and 64 under three precisions: bfloat16 autocast over float32 weights (what training runs), a bfloat16 copy of
   the model without autocast, and float32;
2. one linear layer of the model's shape with 16 rows, (16, 576) x (576, 1536), in float32 and bfloat16 through
   ``F.linear``, and through oneDNN with the weight packed once in its own layout (``mkldnn._linear_pointwise``, the
   kernel torch's inductor uses on CPUs), against the time to read the weight at the measured bandwidth;
3. a ``torch.profiler`` table of one decoding step (R = 16, bfloat16 autocast): the operators' self time per step,
   the 32-token profile minus the 1-token one, over 31 steps.

    python benchmarks/decoding.py --json benchmarks/results/decoding.json

Name the CPU (``lscpu``) beside the numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from grpo_vs_trl import WORK, decoding_step, memory_bandwidth

from policygrad.lm.data import load_prompts
from policygrad.lm.models import load_model
from policygrad.lm.rollout import autocast_context, encode_prompts, generate, pad_token_id


def per_call_us(fn, calls: int = 300) -> float:
    for _ in range(10):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def decoding_steps(model, bf16_model, tokenizer, prompts, pad: int, rows: int, new_tokens: int) -> dict:
    ids, mask = encode_prompts(tokenizer, [p["prompt"] for p in prompts[: rows // WORK["group_size"]]], "cpu")
    arms = {
        "bf16 autocast": (model, torch.bfloat16),
        "bf16 copy": (bf16_model, None),
        "fp32": (model, None),
    }
    out = {}
    for name, (net, dtype) in arms.items():
        out[name] = decoding_step(net, ids, mask, pad, dtype, new_tokens)
        print(f"R = {rows}, {name}: decoding step {1000 * out[name]['step_s']:.1f} ms", flush=True)
    return out


def linear_16_rows(bandwidth_gbs: float) -> dict:
    m, k, n = 16, 576, 1536
    weight, x = torch.randn(n, k), torch.randn(m, k)
    weight16, x16 = weight.bfloat16(), x.bfloat16()
    out = {
        "fp32 F.linear": per_call_us(lambda: F.linear(x, weight)),
        "bf16 F.linear": per_call_us(lambda: F.linear(x16, weight16)),
    }
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight16, m)
        out["bf16 oneDNN, packed weight"] = per_call_us(
            lambda: torch.ops.mkldnn._linear_pointwise(x16, packed, None, "none", [], "")
        )
    except (AttributeError, RuntimeError) as error:  # a torch build without oneDNN
        print(f"oneDNN packed linear unavailable: {error}")
    out["bf16 weight read at the bandwidth"] = n * k * 2 / (bandwidth_gbs * 1e9) * 1e6
    return out


def profile_step(model, tokenizer, prompts, pad: int, new_tokens: int, top: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    ids, mask = encode_prompts(tokenizer, [p["prompt"] for p in prompts[:2]], "cpu")

    @torch.no_grad()
    def decode(tokens: int) -> None:
        with autocast_context("cpu", torch.bfloat16):
            generate(model, ids, mask, WORK["group_size"], tokens, [], pad)

    decode(new_tokens)
    tables = {}
    for tokens in (new_tokens, 1):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            decode(tokens)
        tables[tokens] = {e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()}
    steps = new_tokens - 1
    rows = [
        {
            "op": key,
            "ms_per_step": (us - tables[1].get(key, (0, 0))[0]) / steps / 1000,
            "calls_per_step": (count - tables[1].get(key, (0, 0))[1]) / steps,
        }
        for key, (us, count) in tables[new_tokens].items()
    ]
    rows.sort(key=lambda row: -row["ms_per_step"])
    return rows[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--top", type=int, default=8, help="operators in the profile table")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bandwidth = memory_bandwidth(args.threads)
    model, tokenizer = load_model("default")
    model.eval()
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    prompts = load_prompts("pydoc", tokenizer, 100, WORK["max_passage_tokens"], WORK["target_length"], (5, 20), 0).train
    pad = pad_token_id(model, tokenizer)
    weight_bytes = sum(p.numel() for p in model.parameters()) * 2
    steps = {r: decoding_steps(model, bf16_model, tokenizer, prompts, pad, r, args.new_tokens) for r in (16, 64)}
    linear = linear_16_rows(bandwidth)
    ops = profile_step(model, tokenizer, prompts, pad, args.new_tokens, args.top)

    print(
        f"\nread bandwidth {bandwidth:.1f} GB/s; weights {weight_bytes / 1e6:.0f} MB in bfloat16; {args.threads} threads"
    )
    print("\n| rows R | precision | decoding step ms | tokens/s | fraction of the bandwidth bound |")
    print("|---:|---|---:|---:|---:|")
    for rows, arms in steps.items():
        bound = weight_bytes / (bandwidth * 1e9)
        for name, value in arms.items():
            print(
                f"| {rows} | {name} | {1000 * value['step_s']:.1f} | {rows / value['step_s']:.0f} | "
                f"{bound / value['step_s']:.2f} |"
            )
    print("\n| one (16, 576) x (576, 1536) product | us per call |")
    print("|---|---:|")
    for name, us in linear.items():
        print(f"| {name} | {us:.0f} |")
    print("\n| operator (one decoding step, R = 16, bf16 autocast) | ms per step | calls per step |")
    print("|---|---:|---:|")
    for row in ops:
        print(f"| {row['op']} | {row['ms_per_step']:.1f} | {row['calls_per_step']:.0f} |")
    if args.json is not None:
        result = {
            "settings": {"threads": args.threads, "new_tokens": args.new_tokens},
            "memory_bandwidth_gbs": bandwidth,
            "weight_bytes": weight_bytes,
            "decoding": {str(r): arms for r, arms in steps.items()},
            "linear_16_rows_us": linear,
            "profile": ops,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
