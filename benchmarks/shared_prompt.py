"""The packed decoder with each prompt's cache shared by its rows against one copy per row (issue 17, change 22).

:class:`policygrad.lm.decoder.PackedDecoder` keeps a prompt's keys and values once for its G completions and stacks
their queries into one product against them. The ``copies`` arm gives it the cache copied out to every row, each row
its own "prompt" (what it read before this change: G copies of each prompt's cache a step), through the same code;
the ``shared`` arm is what ``generate`` does now. One process, the embedded model, float32 (the packed decoder's
bfloat16 path needs oneDNN's bfloat16 kernels), no stop token (every row decodes every token), arms alternating over
``--rounds``, each the best of 3 generations after a warm-up. Two batches:

- ``benchmark``: grpo_vs_trl.py's work, 2 prompts x 8 completions, 32 new tokens;
- ``flagship``: recipes/cpu-dynamic.yaml as issue 14 runs it, 1 prompt x 16 completions, 48 new tokens.

It also checks that greedy decoding of 16 prompts x 2 rows for 32 tokens is equal token for token in both arms and
through the model's forward.

    python benchmarks/shared_prompt.py --json benchmarks/results/shared_prompt.json

Name the CPU (``lscpu``) beside the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
from grpo_vs_trl import WORK

from policygrad.lm import rollout
from policygrad.lm.data import load_prompts
from policygrad.lm.decoder import PackedDecoder
from policygrad.lm.models import load_model
from policygrad.lm.rollout import encode_prompts, generate, pad_token_id

BATCHES = {"benchmark": (2, 8, 32), "flagship": (1, 16, 48)}  # prompts, completions each, new tokens
ARMS = ("copies", "shared")


def copies(model, cache, prompt_index, prompt_mask, max_new_tokens, decoder="auto"):
    """rollout.packed_decoder as it read the cache before change 22: one copy of its prompt's cache per row."""
    cache.reorder_cache(prompt_index)
    rows = torch.arange(prompt_index.shape[0])
    return PackedDecoder(model, cache, rows, prompt_mask.index_select(0, prompt_index), max_new_tokens, None)


def run(model, ids, mask, group: int, tokens: int, pad: int, arm: str, greedy: bool = False) -> torch.Tensor:
    patch = mock.patch.object(rollout, "packed_decoder", copies) if arm == "copies" else contextlib.nullcontext()
    with torch.no_grad(), patch:
        return generate(model, ids, mask, group, tokens, [], pad, greedy=greedy)


def seconds(model, ids, mask, group: int, tokens: int, pad: int, arm: str) -> float:
    run(model, ids, mask, group, tokens, pad, arm)  # warm-up
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        run(model, ids, mask, group, tokens, pad, arm)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model("default")
    model.eval()
    prompts = load_prompts("pydoc", tokenizer, 100, WORK["max_passage_tokens"], WORK["target_length"], (5, 20), 0).train
    pad = pad_token_id(model, tokenizer)
    times = {name: {arm: [] for arm in ARMS} for name in BATCHES}
    for name, (count, group, tokens) in BATCHES.items():
        ids, mask = encode_prompts(tokenizer, [p["prompt"] for p in prompts[:count]], "cpu")
        for _ in range(args.rounds):
            for arm in ARMS:
                times[name][arm].append(seconds(model, ids, mask, group, tokens, pad, arm))
                print(f"{name}, {arm}: {times[name][arm][-1]:.3f} s", flush=True)
    ids, mask = encode_prompts(tokenizer, [p["prompt"] for p in prompts[:16]], "cpu")
    greedy = {arm: run(model, ids, mask, 2, 32, pad, arm, greedy=True) for arm in ARMS}
    with torch.no_grad():
        greedy["transformers"] = generate(model, ids, mask, 2, 32, [], pad, greedy=True, decoder="transformers")
    equal = all(torch.equal(greedy["transformers"], g) for g in greedy.values())
    medians = {name: {arm: statistics.median(v) for arm, v in arms.items()} for name, arms in times.items()}
    print(f"\n{args.threads} threads, float32, one generation (prefill + decoding), median of {args.rounds} rounds")
    print("| batch | copies s | shared s | shared / copies |")
    print("|---|---:|---:|---:|")
    for name, m in medians.items():
        count, group, tokens = BATCHES[name]
        label = f"{name} ({count} x {group} rows, {tokens} tokens)"
        print(f"| {label} | {m['copies']:.3f} | {m['shared']:.3f} | {m['shared'] / m['copies']:.3f} |")
    print(f"greedy, 16 prompts x 2 rows x 32 tokens, both arms and the model's forward equal token for token: {equal}")
    if args.json is not None:
        result = {"settings": vars(args) | {"json": str(args.json)}, "seconds": times, "median_s": medians}
        result["greedy_equal"] = equal
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
