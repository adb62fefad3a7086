"""How much the held-out evaluation moves with the way the prompts are batched (and the thread count).

Greedy decoding is a function of the weights and the prompt, but the arithmetic is not: a batch left-pads its prompts
to the longest, and a different padded width, batch size or thread count changes how matrix products and attention
split their sums, so logits move in their last bits and, where two tokens are nearly tied, the argmax flips and the
reply goes another way. This script evaluates one model on the recipe's held-out prompts once per (batch size,
threads) setting, in one process, and prints each setting's rates and how many replies differ from the first
setting's. docs/results.md quotes its output as the bound on a held-out figure's move.

    python benchmarks/eval_batching.py                                   # the embedded model, batch 16/4/100/1
    python benchmarks/eval_batching.py --model runs/dyn-seed0/checkpoints/step-160 --batch-sizes 16 4 100
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from policygrad.lm.config import load_config
from policygrad.lm.data import prompts_for
from policygrad.lm.device import resolve_device
from policygrad.lm.evaluate import EvalSettings, evaluate
from policygrad.lm.models import load_model
from policygrad.lm.rewards import load_rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/cpu-dynamic.yaml")
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 4, 100, 1])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    args = parser.parse_args()

    config = load_config(args.recipe, {"model": args.model, "output_dir": "/tmp/eval-batching"})
    device, autocast_dtype = resolve_device(config)
    model, tokenizer = load_model(config.model, dtype="float32", device=device)
    records = prompts_for(config, tokenizer).heldout[: config.eval_size]
    rewards = load_rewards(config.rewards)
    cpu = next(
        line.split(":", 1)[1].strip()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("model name")
    )
    print(f"model {config.model}, {len(records)} held-out prompts, greedy, autocast {autocast_dtype}, CPU {cpu}")
    print(
        "| batch size | threads | pass rate | length rule | digit-sum rule | mean length | replies unlike the first | seconds |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    first = None
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch_size in args.batch_sizes:
            settings = dataclasses.replace(
                EvalSettings.of(config, autocast_dtype), decodings=("greedy",), batch_size=batch_size
            )
            started = time.perf_counter()
            result = evaluate(model, tokenizer, records, rewards, settings)["greedy"]
            seconds = time.perf_counter() - started
            replies = [e["completion"] for e in result["examples"]]  # every reply: see EXAMPLES below
            first = first or replies
            differ = sum(a != b for a, b in zip(first, replies))
            rows.append(
                {"batch_size": batch_size, "threads": threads, **{k: result[k] for k in _KEYS}, "differ": differ}
            )
            print(
                f"| {batch_size} | {threads} | {result['pass_rate']:.2f} | {result['length_rate']:.2f} | "
                f"{result['digits_rate']:.2f} | {result['mean_length']:.2f} | {differ} of {len(records)} | {seconds:.0f} |",
                flush=True,
            )
    print(json.dumps(rows))


_KEYS = ("pass_rate", "length_rate", "digits_rate", "mean_length")


if __name__ == "__main__":
    import policygrad.lm.evaluate as _evaluate

    _evaluate.EXAMPLES = (
        10_000  # evaluate() keeps this many replies as examples: all of them, to count those that differ
    )
    main()
