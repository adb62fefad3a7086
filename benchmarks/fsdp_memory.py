"""Peak memory per process of a short `policygrad train` run of the reference recipe's model shape: one process
against two with `--fsdp` (issue 15: what FSDP2 saves each process).

The model is Qwen2.5-0.5B-Instruct's architecture (``benchmarks/memory.py``'s config: 24 layers, hidden 896,
vocabulary 151,936, tied embeddings) with random weights, written to a folder with the embedded model's tokenizer,
since the hub is unreachable; memory does not depend on the values of the weights. Each run is the real command
(sampling, the update, AdamW, the final save), 2 steps of 2 prompts x 8 completions of at most 32 tokens on 128-token
passages, float32 weights and arithmetic, one torch thread per process, no evaluation. Each process reports its own
peak resident set (``ru_maxrss``: the interpreter and libraries included, and with them whatever the final save
gathers) from an exit handler.

    python benchmarks/fsdp_memory.py --json benchmarks/results/fsdp_memory.json   # ~15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPE = """\
model: {model}
prompts: pydoc
max_passage_tokens: 128
rewards: [shaped]
prompts_per_step: 2
group_size: 8
max_new_tokens: 32
micro_batch_size: 8
max_steps: 2
precision: float32
device: cpu
threads: 1
heldout_prompts: 0
eval_every: 0
eval_decoding: []
save_every: 0
save_optimizer: true
progress: false
"""
TORCHRUN = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2"]
# no data-parallel pair: each of its processes holds what the one process holds (12.4 GB measured), and two of them
# do not fit this 24 GiB machine; that is the case FSDP is for
# with the KL term the run also holds the frozen reference model: a whole copy in one process, a sharded one (1 / W
# on each process) under --fsdp
KL = ["--kl-coef", "0.05"]
CONFIGS = {
    "1 process": ([], []),
    "2 processes, --fsdp": (TORCHRUN, ["--fsdp"]),
    "1 process, KL reference": ([], KL),
    "2 processes, --fsdp, KL reference": (TORCHRUN, ["--fsdp", *KL]),
}


def build_model(folder: Path) -> None:
    import torch
    from memory import QWEN25_05B
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from policygrad.lm.models import load_model

    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B)).save_pretrained(folder)
    _, tokenizer = load_model("default")
    tokenizer.save_pretrained(folder)


def child(report: Path, argv: list[str]) -> None:
    """Run ``policygrad`` with ``argv`` in this process; on exit write this process's peak RSS to ``report``."""
    from policygrad.cli import main

    rank = int(os.environ.get("RANK", "0"))
    code = 1
    try:
        code = main(argv)
    finally:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        (report / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "peak_rss_mb": peak, "exit": code}))
    sys.exit(code)


def run(name: str, launcher: list[str], flags: list[str], recipe: Path, work: Path) -> dict:
    report = work / name.replace(" ", "_").replace(",", "").replace("-", "")
    report.mkdir()
    python = [sys.executable] if not launcher else []
    command = [*launcher, *python, str(Path(__file__)), "--child", str(report), "--", "train", "--recipe", str(recipe)]
    command += ["--output-dir", str(report / "run"), "--overwrite", *flags]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}")
    ranks = sorted((json.loads(p.read_text()) for p in report.glob("rank*.json")), key=lambda r: r["rank"])
    records = [json.loads(line) for line in (report / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step_time"] for r in records if "step_time" in r]
    out = {"peak_rss_mb": [r["peak_rss_mb"] for r in ranks], "wall_s": seconds, "step_s": steps}
    print(
        f"{name}: peak RSS per process {', '.join(f'{m:,.0f}' for m in out['peak_rss_mb'])} MB; "
        f"steps {', '.join(f'{s:.1f}' for s in steps)} s; {seconds:.0f} s in all",
        flush=True,
    )
    shutil.rmtree(report / "run")
    return out


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", action="append", choices=list(CONFIGS), help="these configurations (default: all)")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    work = Path(tempfile.mkdtemp(prefix="fsdp-memory-"))
    try:
        build_model(work / "model")
        recipe = work / "recipe.yaml"
        recipe.write_text(RECIPE.format(model=work / "model"))
        chosen = {name: CONFIGS[name] for name in args.only or CONFIGS}
        result = {name: run(name, launcher, flags, recipe, work) for name, (launcher, flags) in chosen.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
