"""Packed completions (issue 17, change 21): a prompt's completions end to end in one row, against one row each.

:func:`policygrad.lm.rollout.completion_logprobs` runs the distinct prompts once, then the completion tokens on top.
Before change 21 each completion had its own row on a copy of its prompt's key/value cache, padded to the longest
completion (``copies``); now a prompt's completions run end to end in one row after it, without their padding, under
a mask that keeps them apart (``packed``, :class:`policygrad.lm.rollout.Packing`). This script measures both on the
same batches, in one process, alternating over ``--rounds``:

- the update alone (``policygrad.lm.update.update``: forward, backward, AdamW with learning rate 0), median seconds;
- the gradient-free pass the KL reference and the old log-probs take (``completion_logprobs`` under no_grad);
- the peak resident memory of each arm, each in a fresh process (``--memory``: 3 updates after loading; the
  trainer's ``--allocator keep``);

on two batches of 2 prompts x 8 completions of the embedded model, float32: ``benchmark`` (``grpo_vs_trl.py``'s
work: temperature 1, at most 32 new tokens) and ``flagship`` (recipes/cpu-dynamic.yaml's sampling: temperature 0.7,
at most 48 new tokens, replies ended by the model), drawn from ``--model`` (the embedded model by default; a trained
checkpoint ends its replies sooner, which is where the padding goes). It also prints each batch's fill: real
completion tokens over M x T.

    python benchmarks/packing.py --json benchmarks/results/packing.json

Name the CPU (``lscpu``) beside the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from grpo_vs_trl import WORK, peak_rss_mb

import policygrad.lm.rollout as rollout_module
from policygrad.allocator import use_allocator
from policygrad.lm.config import GRPOConfig
from policygrad.lm.data import load_prompts
from policygrad.lm.models import load_model
from policygrad.lm.rollout import completion_logprobs, sample
from policygrad.lm.update import update

ARMS = {"copies": frozenset(), "packed": rollout_module.PACKABLE_ATTENTION}
BATCHES = {"benchmark": (1.0, 32), "flagship": (0.7, 48)}  # temperature, max_new_tokens


def batch(model, tokenizer, name: str, seed: int = 0):
    temperature, max_new_tokens = BATCHES[name]
    prompts = load_prompts("pydoc", tokenizer, 100, WORK["max_passage_tokens"], WORK["target_length"], (5, 20), 0)
    torch.manual_seed(seed)
    chosen = [p["prompt"] for p in prompts.train[:2]]
    rollout = sample(model, tokenizer, chosen, WORK["group_size"], max_new_tokens, temperature, score_tokens=False)
    return rollout, temperature


def setup(model_name: str, threads: int):
    torch.set_num_threads(threads)
    model, tokenizer = load_model(model_name)
    model.eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, fused=True)
    return model, tokenizer, optimizer


def one_update(model, optimizer, rollout, temperature: float) -> float:
    config = GRPOConfig(group_size=WORK["group_size"], micro_batch_size=16, temperature=temperature)
    started = time.perf_counter()
    update(model, optimizer, rollout, torch.linspace(-1, 1, 16), None, 0.0, config, None)
    return time.perf_counter() - started


def one_scoring(model, rollout, temperature: float) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        completion_logprobs(model, temperature=temperature, **rollout.rows(slice(0, rollout.completion_ids.shape[0])))
    return time.perf_counter() - started


def memory(arm: str, model_name: str, name: str, threads: int) -> float:
    """Peak RSS in MB of a fresh process that loads the model, draws the batch and runs 3 updates with ``arm``."""
    use_allocator("keep")
    model, tokenizer, optimizer = setup(model_name, threads)
    rollout, temperature = batch(model, tokenizer, name)
    with mock.patch.object(rollout_module, "PACKABLE_ATTENTION", ARMS[arm]):
        for _ in range(3):
            one_update(model, optimizer, rollout, temperature)
    return peak_rss_mb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--memory", nargs=2, metavar=("ARM", "BATCH"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.memory:
        arm, name = args.memory
        print(json.dumps(memory(arm, args.model, name, args.threads)))
        return
    model, tokenizer, optimizer = setup(args.model, args.threads)
    use_allocator("keep")
    result = {"model": args.model, "threads": args.threads, "rounds": args.rounds, "batches": {}}
    for name in BATCHES:
        rollout, temperature = batch(model, tokenizer, name)
        mask = rollout.completion_mask
        times = {arm: {"update": [], "scoring": []} for arm in ARMS}
        for round_ in range(args.rounds + 1):  # the first round warms up and is not counted
            for arm, kernels in ARMS.items():
                with mock.patch.object(rollout_module, "PACKABLE_ATTENTION", kernels):
                    update_s, scoring_s = (
                        one_update(model, optimizer, rollout, temperature),
                        one_scoring(model, rollout, temperature),
                    )
                if round_:
                    times[arm]["update"].append(update_s)
                    times[arm]["scoring"].append(scoring_s)
        entry = {
            "completion_shape": list(mask.shape),
            "fill": mask.sum().item() / mask.numel(),
            **{arm: {k: statistics.median(v) for k, v in t.items()} | {"times": t} for arm, t in times.items()},
        }
        for arm in ARMS:
            child = [sys.executable, __file__, "--model", args.model, "--threads", str(args.threads)]
            out = subprocess.run([*child, "--memory", arm, name], capture_output=True, text=True, check=True)
            entry[arm]["peak_rss_mb"] = json.loads(out.stdout.strip().splitlines()[-1])
        result["batches"][name] = entry
        copies, packed = entry["copies"], entry["packed"]
        print(
            f"{name}: completions {tuple(mask.shape)}, fill {entry['fill']:.2f}; update {copies['update']:.2f} -> "
            f"{packed['update']:.2f} s; no-grad pass {copies['scoring']:.2f} -> {packed['scoring']:.2f} s; peak RSS "
            f"{copies['peak_rss_mb']:,.0f} -> {packed['peak_rss_mb']:,.0f} MB"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
