"""What the memory allocator costs a training step on a CPU (issue 17): ``--allocator keep`` against glibc's defaults.

A GRPO step allocates and frees the same large buffers every step (the vocabulary-sized logits, activations, their
gradients). glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and gives it
back with ``munmap`` on free, so the next step touches new pages and the kernel zero-fills each 4 KiB page at its
first touch: a minor page fault, system time. ``--allocator keep`` (policygrad.allocator, the default since
2026-12-03) switches that off from inside the process with ``mallopt``. Each arm runs ``policygrad train`` in a fresh
process on the same recipe and seed, so every arm does the same arithmetic on the same tokens:

- ``system``: ``--allocator system``, glibc as it comes (policygrad's default before 2026-12-03);
- ``keep``: ``--allocator keep``: every allocation from the heap, which is never trimmed;
- ``hugepages``: ``--allocator system`` with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``: malloc asks for transparent
  huge pages (``madvise``), 2 MiB a fault;
- ``keep-hugepages``: the two together.

Reported per arm: the median step time over the steps after the first, the process's user and system CPU seconds,
its minor page faults and its peak RSS (the whole run, model load included). Arms alternate, ``--repeats`` rounds.

    python benchmarks/allocator.py --arms system keep --repeats 2 --json benchmarks/results/allocator.json

Name the CPU (``lscpu``) beside the numbers: the cost of a page fault depends on the machine and its hypervisor.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

ARMS = {  # name: (--allocator, GLIBC_TUNABLES)
    "system": ("system", ""),
    "keep": ("keep", ""),
    "hugepages": ("system", "glibc.malloc.hugetlb=1"),
    "keep-hugepages": ("keep", "glibc.malloc.hugetlb=1"),
}


def run_arm(name: str, args: argparse.Namespace, folder: Path) -> dict:
    """One ``policygrad train`` in a child process under the arm's glibc tunables; its step times and rusage."""
    env = {**os.environ}
    env.pop("GLIBC_TUNABLES", None)
    allocator, tunables = ARMS[name]
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    out = folder / name
    command = [
        sys.executable, "-m", "policygrad", "train", "--recipe", str(args.recipe), "--seed", "0",
        "--max-steps", str(args.steps), "--eval-every", "0", "--save-every", "0", "--threads", str(args.threads),
        "--output-dir", str(out), "--overwrite", "--allocator", allocator,
    ]  # fmt: skip
    started = time.perf_counter()
    log = folder / f"{name}.log"
    with log.open("w") as stream:
        child = subprocess.Popen(command, env=env, stdout=stream, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, peak RSS included
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name}: policygrad train failed:\n{log.read_text()[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step_time"] for row in rows if "step_time" in row]
    return {
        "arm": name,
        "step_times": steps,
        "median_step_s": statistics.median(steps[1:]),
        "wall_s": wall,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "minor_faults": usage.ru_minflt,
        "peak_rss_mb": usage.ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "cpu-dynamic.yaml")
    parser.add_argument("--steps", type=int, default=5, help="training steps per run; the first is not timed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the arms, alternating")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in args.arms}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name in args.arms:
                results[name].append(run_arm(name, args, Path(tmp)))
                print(f"{name}: {results[name][-1]['median_step_s']:.2f} s/step", flush=True)
    print(f"policygrad train --recipe {args.recipe.name}, {args.steps} steps, {args.threads} threads, seed 0")
    print("| allocator | median s/step | user CPU s | system CPU s | minor faults | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, runs in results.items():
        med = statistics.median
        print(
            f"| {name} | {med(r['median_step_s'] for r in runs):.2f} | {med(r['user_s'] for r in runs):.1f} | "
            f"{med(r['sys_s'] for r in runs):.1f} | {med(r['minor_faults'] for r in runs):,.0f} | "
            f"{max(r['peak_rss_mb'] for r in runs):,.0f} |"
        )
    if args.json is not None:
        settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
        args.json.write_text(json.dumps({"settings": settings, "arms": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
