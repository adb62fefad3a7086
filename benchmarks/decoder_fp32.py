"""The packed decoder in float32 (issue 17, change 20): oneDNN-packed weights against ``F.linear``, side by side.

Until 2026-12-03 :class:`policygrad.lm.decoder.PackedDecoder` packed its weights in oneDNN's layout only under
bfloat16 autocast; in float32 (what ``precision: auto`` picks on a CPU without bfloat16 units) it ran its fused
products through ``F.linear``. This script times, in one process, with the embedded model and the benchmark's
prompts (``grpo_vs_trl.py``: 8 completions per prompt, 128-token pydoc passages), one decoding step of
``policygrad.lm.rollout.generate`` (no stop token, 32 new tokens against 1, best of 3; ``grpo_vs_trl.decoding_step``)
for R = 16 and 64 rows, float32, three arms, alternating over ``--rounds``:

- ``transformers``: the model's own forward (``decoder="transformers"``);
- ``F.linear``: the packed decoder with oneDNN's packing switched off (what float32 ran before);
- ``oneDNN``: the packed decoder as it is now.

It also checks that greedy decoding of 16 rows for 32 tokens gives the same tokens through the packed decoder as
through the model's forward.

    python benchmarks/decoder_fp32.py --json benchmarks/results/decoder_fp32.json

Name the CPU (``lscpu``) beside the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from unittest import mock

import torch
from grpo_vs_trl import WORK, decoding_step

from policygrad.lm.data import load_prompts
from policygrad.lm.models import load_model
from policygrad.lm.rollout import encode_prompts, generate, pad_token_id

ARMS = {"transformers": ("transformers", True), "F.linear": ("auto", False), "oneDNN": ("auto", True)}


def step_ms(model, ids, mask, pad: int, arm: str) -> float:
    decoder, onednn = ARMS[arm]
    with mock.patch("torch.backends.mkldnn.is_available", return_value=onednn):
        return 1000 * decoding_step(model, ids, mask, pad, None, decoder=decoder)["step_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("default")
    model.eval()
    prompts = load_prompts("pydoc", tokenizer, 100, WORK["max_passage_tokens"], WORK["target_length"], (5, 20), 0).train
    pad = pad_token_id(model, tokenizer)
    times = {rows: {arm: [] for arm in ARMS} for rows in (16, 64)}
    for rows in times:
        ids, mask = encode_prompts(tokenizer, [p["prompt"] for p in prompts[: rows // WORK["group_size"]]], "cpu")
        for _ in range(args.rounds):
            for arm in ARMS:
                times[rows][arm].append(step_ms(model, ids, mask, pad, arm))
                print(f"R = {rows}, {arm}: {times[rows][arm][-1]:.1f} ms", flush=True)
    ids, mask = encode_prompts(tokenizer, [p["prompt"] for p in prompts[:16]], "cpu")
    with torch.no_grad():
        greedy = {
            d: generate(model, ids, mask, 1, 32, [], pad, greedy=True, decoder=d) for d in ("transformers", "auto")
        }
    equal = torch.equal(greedy["transformers"], greedy["auto"])
    print(f"\n{args.threads} threads, float32, median of {args.rounds} rounds (each the best of 3)")
    print("| rows R | model's forward ms | packed, F.linear ms | packed, oneDNN ms | oneDNN against F.linear |")
    print("|---:|---:|---:|---:|---:|")
    medians = {rows: {arm: statistics.median(v) for arm, v in arms.items()} for rows, arms in times.items()}
    for rows, m in medians.items():
        print(
            f"| {rows} | {m['transformers']:.1f} | {m['F.linear']:.1f} | {m['oneDNN']:.1f} | "
            f"{m['oneDNN'] / m['F.linear']:.2f}x |"
        )
    print(f"greedy, 16 rows x 32 tokens, packed decoder against the model's forward: equal token for token: {equal}")
    if args.json is not None:
        result = {"settings": vars(args) | {"json": str(args.json)}, "step_ms": times, "median_ms": medians}
        result["greedy_equal"] = equal
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
