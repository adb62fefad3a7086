"""Side-by-side timings of this session's two fast paths against the plain ones they replace (benchmarks/NOTES.md,
changes 13 and 14), on the benchmark's work (``grpo_vs_trl.WORK``: the embedded model, 2 prompts x 8 completions,
32 new tokens, bfloat16 autocast):

1. ``logprobs``: the vocabulary pass alone, forward and backward on (16, 32, 49,152) bfloat16 logits, plain
   (float32 copy, log-softmax, gather, entropy) against ``policygrad.lm.logprobs.token_logprobs``; then one whole
   update on one batch with each, alternating in one process;
2. ``decoder``: short training runs (8 steps, the first 2 not counted) with ``--decoder transformers`` and
   ``--decoder auto`` (the packed decoder), alternating.

    python benchmarks/fast_paths.py --json benchmarks/results/fast_paths.json

Name the CPU (``lscpu``) beside the numbers; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from grpo_vs_trl import WORK, _timed, work_config, write_prompts

from policygrad.regularizers import entropy_of_log_probs


def plain_token_logprobs(logits, tokens, temperature):
    """The path change 13 replaced: a float32 log-softmax, a gather and the entropy of it."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = F.log_softmax(logits, dim=-1)
    return torch.gather(logp, 2, tokens.unsqueeze(-1)).squeeze(-1), entropy_of_log_probs(logp)


def vocabulary_pass(repeats: int) -> dict:
    from policygrad.lm.logprobs import token_logprobs

    logits = torch.randn(16, 32, 49152).bfloat16()
    tokens = torch.randint(0, 49152, (16, 32))
    out = {}
    for name, fn in (("plain", plain_token_logprobs), ("fused", token_logprobs)):
        forward, backward = [], []
        for _ in range(repeats):
            z = logits.clone().requires_grad_()
            start = time.perf_counter()
            logprobs, entropies = fn(z, tokens, 1.0)
            middle = time.perf_counter()
            (logprobs.sum() + entropies.sum()).backward()
            forward.append(middle - start)
            backward.append(time.perf_counter() - middle)
        out[name] = {"forward_s": statistics.median(forward), "backward_s": statistics.median(backward)}
        print(
            f"vocabulary pass, {name}: forward {1000 * out[name]['forward_s']:.0f} ms, "
            f"backward {1000 * out[name]['backward_s']:.0f} ms (medians of {repeats})",
            flush=True,
        )
    return out


def update_alternating(repeats: int) -> dict:
    from policygrad.lm import rollout
    from policygrad.lm.config import GRPOConfig
    from policygrad.lm.data import load_prompts
    from policygrad.lm.models import load_model
    from policygrad.lm.update import update

    model, tokenizer = load_model("default")
    model.eval()
    prompts = load_prompts("pydoc", tokenizer, 100, WORK["max_passage_tokens"], WORK["target_length"], (5, 20), 0)
    torch.manual_seed(0)
    batch = rollout.sample(
        model,
        tokenizer,
        [r["prompt"] for r in prompts.train[:2]],
        WORK["group_size"],
        WORK["max_new_tokens"],
        autocast_dtype=torch.bfloat16,
        score_tokens=False,
    )
    config = GRPOConfig(group_size=WORK["group_size"], micro_batch_size=16, max_new_tokens=WORK["max_new_tokens"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, fused=True)
    advantages = torch.randn(16)
    fused = rollout.token_logprobs
    arms = {"plain": plain_token_logprobs, "fused": fused}
    times = {name: [] for name in arms}
    try:
        for _ in range(repeats + 1):  # the first round warms up and is not counted
            for name, fn in arms.items():
                rollout.token_logprobs = fn
                times[name].append(
                    _timed(lambda: update(model, optimizer, batch, advantages, None, 0.0, config, torch.bfloat16))
                )
    finally:
        rollout.token_logprobs = fused
    out = {name: {"median_s": statistics.median(t[1:]), "times_s": t[1:]} for name, t in times.items()}
    for name, value in out.items():
        print(f"update alone, {name}: median {value['median_s']:.2f} s of {repeats}", flush=True)
    return out


def decoder_training(rounds: int, steps: int = 8, warmup: int = 2) -> dict:
    from policygrad.lm.trainer import train

    folder = Path(tempfile.mkdtemp())
    prompts = folder / "prompts.jsonl"
    write_prompts(prompts)
    out = {"transformers": [], "auto": []}
    for _ in range(rounds):
        for decoder in out:
            config = work_config(
                prompts, folder / decoder, "bf16", threads=2, max_steps=steps, decoder=decoder, overwrite=True
            )
            run = train(config)
            records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            timed = [r for r in records if "step_time" in r][warmup:]
            out[decoder].append(
                {
                    "step_s": statistics.median(r["step_time"] for r in timed),
                    "sample_s": statistics.median(r["sample_time"] for r in timed),
                    "completion_tokens": statistics.mean(r["completion_tokens"] for r in timed),
                }
            )
            last = out[decoder][-1]
            print(
                f"training, --decoder {decoder}: median step {last['step_s']:.2f} s, sampling "
                f"{last['sample_s']:.2f} s, mean completion {last['completion_tokens']:.1f} tokens",
                flush=True,
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "vocabulary_pass": vocabulary_pass(args.repeats),
        "update_alone": update_alternating(args.repeats),
        "decoder_training": decoder_training(args.rounds),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
