"""A GRPO step on a CUDA GPU: policygrad against TRL on the same work, with transformers generation and, where vLLM
is installed, with vLLM colocated on the GPU (policygrad ``decoder: vllm``; TRL ``use_vllm``, ``vllm_mode="colocate"``).

The work is grpo_vs_trl.py's (WORK: the embedded SmolLM2-135M-Instruct, 2 prompts x 8 completions of up to 32 tokens,
the shaped reward, one update per batch, no KL), under bfloat16, each trainer in a fresh process, one after the other
on an otherwise idle GPU. Step time, generation time and completion tokens per second after ``--warmup`` steps:

    python benchmarks/gpu_step.py                       # transformers generation, both trainers
    python benchmarks/gpu_step.py --vllm                # also both with vLLM (needs the vllm package)
    python benchmarks/gpu_step.py --device cpu --warmup 0 --steps 1     # checks the script itself (float32, 2 threads)

Writes benchmarks/results/gpu_step.json and prints a table. Prepared for issue 15's GPU check
(benchmarks/gpu_check.sh); not yet run on a GPU (none was lent to this work), so it holds no results yet.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from grpo_vs_trl import WORK, _summary, run_trl, work_config, write_prompts  # noqa: E402

VLLM_MEMORY = 0.3  # the GPU memory fraction the colocated engine takes, in both trainers


def run_policygrad(prompts: Path, out: Path, warmup: int, steps: int, vllm: bool, device: str) -> dict:
    from policygrad.lm.trainer import train

    engine = {"decoder": "vllm", "tis_cap": 2.0, "vllm_gpu_memory_utilization": VLLM_MEMORY} if vllm else {}
    precision = "bf16" if device != "cpu" else "fp32"  # on a CPU only a check of the script: no emulated bfloat16
    config = work_config(prompts, out, precision, 2, warmup + steps, device=device, **engine)
    records = [json.loads(line) for line in (train(config) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "step_time" in r][warmup:]
    n = WORK["prompts_per_step"] * WORK["group_size"]
    return _summary(
        step_times=[r["step_time"] for r in timed],
        generation_times=[r["sample_time"] for r in timed],
        completion_tokens=[r["completion_tokens"] * n for r in timed],
    )


def run_trl_on_gpu(prompts: Path, out: Path, warmup: int, steps: int, vllm: bool, device: str) -> dict:
    engine = {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": VLLM_MEMORY} if vllm else {}
    precision = "bf16" if device != "cpu" else "fp32"
    return run_trl(prompts, out, precision, 2, warmup, steps, device=device, **engine)


RUNNERS = {"policygrad": run_policygrad, "trl": run_trl_on_gpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--vllm", action="store_true", help="also time both trainers with vLLM generation")
    parser.add_argument("--device", default="cuda", help="cpu checks the script itself where there is no GPU")
    parser.add_argument("--child", choices=list(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--child-vllm", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prompts-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = RUNNERS[args.child](args.prompts_file, args.out, args.warmup, args.steps, args.child_vllm, args.device)
        print(json.dumps(result))
        return
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_step.py: no CUDA GPU here (torch.cuda.is_available() is False)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        write_prompts(prompts)
        for engine in ["transformers", "vllm"] if args.vllm else ["transformers"]:
            for name in RUNNERS:
                label = f"{name} ({engine})"
                print(f"running {label} ...", file=sys.stderr, flush=True)
                command = [sys.executable, __file__, "--child", name, "--prompts-file", str(prompts)]
                command += ["--out", str(Path(tmp) / f"{name}-{engine}"), "--warmup", str(args.warmup)]
                command += ["--steps", str(args.steps), "--device", args.device]
                command += ["--child-vllm"] if engine == "vllm" else []
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    results[label] = {"error": done.stderr.strip().splitlines()[-1:] or ["(no output)"]}
                    print(f"{label} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                    continue
                results[label] = json.loads(done.stdout.strip().splitlines()[-1])
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "none (--device cpu: a check of the script)"
    summary = {"gpu": gpu, "work": WORK, "warmup": args.warmup, "steps": args.steps}
    summary["results"] = results
    if args.device == "cuda":
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "gpu_step.json").write_text(json.dumps(summary, indent=2) + "\n")
    precision = "bfloat16" if args.device == "cuda" else "float32"
    print(f"GPU: {summary['gpu']}; {WORK['prompts_per_step']} prompts x {WORK['group_size']} completions, {precision}")
    print("| trainer | step (s) | generation (s) | update (s) | generation tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for label, r in results.items():
        if "error" in r:
            print(f"| {label} | failed: {r['error'][0][:80]} | | | |")
            continue
        line = f"{r['step_s']:.3f} | {r['generation_s']:.3f} | {r['update_s']:.3f} | {r['generation_tokens_per_s']:.0f}"
        print(f"| {label} | {line} |")


if __name__ == "__main__":
    main()
