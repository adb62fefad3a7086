"""How a shared CPU slows policygrad, and what the thread defaults do about it (issue 16, item 1).

Each condition runs in a fresh process (the OpenMP runtime reads its environment once, when torch loads): load the
embedded model, warm up, then time ``--repeats`` generations of the demo's shape (2 prompts x 8 completions, 32 new
tokens, float32) and report the median. Conditions: the torch thread count (torch's own choice, which is every core;
1; or policygrad's default, one per idle core) x OpenMP's wait policy (the runtime's default, or passive, which
policygrad's command line sets) x the machine idle or shared with one busy single-thread process (a pure-Python loop,
the "other seed" or "browser tab" of a user's laptop).

    python benchmarks/threads.py                 # a table on stdout; --json FILE to keep the numbers

Name the CPU (``lscpu``) beside the numbers: the cost of oversubscription depends on the core count and scheduler.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

WORK = r"""
import os, statistics, sys, time
import torch
from policygrad.lm.models import load_model
from policygrad.lm.rollout import sample
from policygrad.threads import set_threads

threads = sys.argv[1]
count = set_threads(None) if threads == "policygrad" else (int(threads) if threads != "torch" else None)
if threads not in ("policygrad", "torch"):
    torch.set_num_threads(count)
model, tokenizer = load_model("default", dtype="float32", device=torch.device("cpu"))
model.eval()
prompts = ["Write one sentence about the sea.", "Name three prime numbers and say why."]
def one():
    torch.manual_seed(0)
    started = time.perf_counter()
    sample(model, tokenizer, prompts, group_size=8, max_new_tokens=32, temperature=1.0)
    return time.perf_counter() - started
one()
times = [one() for _ in range(int(sys.argv[2]))]
print(torch.get_num_threads(), statistics.median(times))
"""

BUSY = "while True: pass"


def condition(threads: str, wait: str, busy: bool, repeats: int, timeout: float) -> dict:
    env = {**os.environ}
    env.pop("OMP_NUM_THREADS", None)
    env.pop("OMP_WAIT_POLICY", None)
    if wait != "default":
        env["OMP_WAIT_POLICY"] = wait
    competitor = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
    try:
        if competitor is not None:
            time.sleep(1.0)  # let the scheduler see it before the threads are chosen
        started = time.perf_counter()
        try:
            out = subprocess.run(
                [sys.executable, "-c", WORK, threads, str(repeats)],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=True,
            ).stdout.split()
            used, seconds = int(out[0]), float(out[1])
        except subprocess.TimeoutExpired:
            used, seconds = -1, float("inf")
        total = time.perf_counter() - started
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    return {
        "threads": threads,
        "threads_used": used,
        "wait_policy": wait,
        "busy": busy,
        "generation_s": seconds,
        "process_s": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=400.0, help="seconds per condition before it counts as inf")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for busy in (False, True):
        for threads, wait in [("torch", "default"), ("torch", "PASSIVE"), ("1", "default"), ("policygrad", "PASSIVE")]:
            row = condition(threads, wait, busy, args.repeats, args.timeout)
            rows.append(row)
            print(
                f"{'shared' if busy else 'idle':6}  threads {threads:10} ({row['threads_used']:2})  wait {wait:8}  "
                f"generation {row['generation_s']:7.2f} s  process {row['process_s']:7.1f} s",
                flush=True,
            )
    if args.json is not None:
        args.json.write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
