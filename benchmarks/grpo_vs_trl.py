"""policygrad's GRPO step against TRL's GRPOTrainer on the same work, side by side in one run.

Same model (the embedded SmolLM2-135M-Instruct, float32 master weights), same prompts (pydoc length_digits prompts,
passages cut to 128 tokens, chat-formatted by the model's template), same batch (2 prompts x 8 completions), same
sampling (temperature 1, no top-p/top-k cut, at most 32 new tokens, stop at EOS), same reward (policygrad's shaped
length_digits reward), same loss (GRPO advantages scaled by the group std, token-mean aggregation = TRL's "dapo", no
KL, no entropy term, one update per batch, AdamW lr 1e-5, gradient clipping at 1.0) and the same precision regime
(``--precision bf16``: bfloat16 autocast over float32 weights in both; ``fp32``: plain float32 in both).

Each trainer runs in its own child process (so peak memory is its own) with the same torch thread count, one after
the other; each takes ``--warmup`` steps that are not timed and then ``--steps`` timed steps. Printed per trainer:
median seconds per step, median generation seconds and generation tokens per second, the update's seconds and its
achieved FLOP/s (FLOPs counted by torch.utils.flop_counter on one update), peak resident memory; and the matrix-product
rates of this machine measured in the same run (float32 and bfloat16), from which the update's floor is
FLOPs / rate.

    pip install -e ".[bench]"                                     # trl (and stable-baselines3), benchmark-only
    python benchmarks/grpo_vs_trl.py                              # bf16, 2 warm-up + 6 timed steps each
    python benchmarks/grpo_vs_trl.py --precision fp32 --steps 4
    python benchmarks/grpo_vs_trl.py --only policygrad            # skip TRL
    python benchmarks/grpo_vs_trl.py --end-to-end                 # training time to a held-out pass rate (~2 h)

Writes the results as JSON to benchmarks/results/grpo_vs_trl-<precision>.json and a markdown table to stdout.

``--end-to-end`` answers the question users ask of a trainer: how long until the model passes? Both trainers train on
one recipe (default recipes/cpu-curve.yaml: its rewards, sampling, loss, optimiser, precision, thread count; seed 1
for both) at the same time, each in its own process on its own core(s), for at most ``--max-steps`` steps or
``--minutes`` of wall time, saving the weights every ``--save-every`` steps together with the training seconds spent
so far (the sum of the step times; checkpoint writes are not counted). A reply cut off at the token budget scores the
recipe's ``truncated_reward`` in both (TRL: from the completion's token ids). Then every checkpoint of both is scored
by the same function, ``policygrad.lm.evaluate.evaluate_heldout`` (the recipe's 100 held-out prompts, greedy), and the
script prints each curve and the training minutes at which each trainer first reached ``--target``. Results go to
benchmarks/results/grpo_vs_trl-end-to-end.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# the work both trainers do; every number here is passed to both
WORK = {
    "prompts_per_step": 2,
    "group_size": 8,
    "max_new_tokens": 32,
    "temperature": 1.0,
    "max_passage_tokens": 128,
    "target_length": 64,
    "lr": 1e-5,
    "max_grad_norm": 1.0,
    "seed": 0,
}


# ----------------------------------------------------------------------------------------------------------------
# Shared set-up
# ----------------------------------------------------------------------------------------------------------------


# the embedded model's own products (tokens x 576 against its 576 x 1536, 1536 x 576, 576 x 49152 weights) beside the
# square one: the floor is taken at the best rate this machine reaches on any of them
MATMUL_SHAPES = ((2048, 2048, 2048), (512, 576, 1536), (512, 1536, 576), (512, 576, 49152))


def matmul_rates(threads: int, shapes=MATMUL_SHAPES, repeats: int = 7, precisions=("fp32", "bf16")) -> dict[str, float]:
    """The best GFLOP/s this machine reaches for (m x k) @ (k x n) products in float32 and/or bfloat16: for each shape
    3 untimed warm-up products, then the best of ``repeats``; the rate of a dtype is its best shape's. Per-shape rates
    are returned too (``"<dtype> m x k x n"``)."""
    import torch

    torch.set_num_threads(threads)
    rates: dict[str, float] = {}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for name, dtype in ((name, dtypes[name]) for name in precisions):
        for m, k, n in shapes:
            a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
            for _ in range(3):
                a @ b
            best = min(_timed(lambda a=a, b=b: a @ b) for _ in range(repeats))
            rates[f"{name} {m}x{k}x{n}"] = 2 * m * k * n / best / 1e9
        rates[name] = max(rates[f"{name} {m}x{k}x{n}"] for m, k, n in shapes)
    return rates


def memory_bandwidth(threads: int, megabytes: int = 1024, repeats: int = 7) -> float:
    """Read bandwidth of this machine in GB/s: the best of ``repeats`` sums of a ``megabytes`` float32 tensor (far
    larger than any cache), which read every byte once: the rate at which a decoding step can stream the weights."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(megabytes * 2**20 // 4)
    a.sum()  # warm-up: pages touched
    return a.numel() * 4 / min(_timed(a.sum) for _ in range(repeats)) / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def write_prompts(path: Path, config=None) -> int:
    """The training prompts (with their targets) as JSONL, for TRL; returns how many. ``config``: a GRPOConfig whose
    prompt source and task settings to use (default: the step benchmark's WORK)."""
    from policygrad.lm.data import load_prompts
    from policygrad.lm.models import load_model

    _, tokenizer = load_model("default")
    if config is None:
        prompts = load_prompts("pydoc", tokenizer, 100, WORK["max_passage_tokens"], WORK["target_length"], (5, 20))
    else:
        prompts = load_prompts(
            config.prompts,
            tokenizer,
            config.heldout_prompts,
            config.max_passage_tokens,
            config.target_length,
            (config.digit_sum_min, config.digit_sum_max),
            config.length_tolerance,
        )
    with path.open("w") as f:
        for record in prompts.train:
            f.write(json.dumps(record) + "\n")
    return len(prompts.train)


def peak_rss_mb() -> float:
    """This process's peak resident memory, MB: Linux's VmHWM, the high-water mark of this program's own memory.
    Not ``getrusage``'s ru_maxrss, which a process started by ``subprocess`` inherits from the parent it was forked
    from (the kernel keeps the larger across ``exec``): a child of a large parent reports the parent's size."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024  # KiB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------------------------------
# policygrad (child process)
# ----------------------------------------------------------------------------------------------------------------


def work_config(
    prompts: Path, out: Path, precision: str, threads: int, max_steps: int, device: str = "cpu", **overrides
):
    """policygrad's GRPOConfig for the benchmark's work (WORK), no evaluation and no checkpoints."""
    from policygrad.lm.config import GRPOConfig

    return GRPOConfig(
        model="default",
        prompts=str(prompts),
        heldout_prompts=0,
        rewards=("shaped",),
        prompts_per_step=WORK["prompts_per_step"],
        group_size=WORK["group_size"],
        max_new_tokens=WORK["max_new_tokens"],
        temperature=WORK["temperature"],
        top_p=1.0,
        target_length=WORK["target_length"],
        max_passage_tokens=WORK["max_passage_tokens"],
        advantage="grpo",
        scale_rewards="group",
        aggregation="token_mean",
        updates_per_batch=1,
        entropy_weight="constant",
        entropy_coef=0.0,
        kl_coef=0.0,
        lr=WORK["lr"],
        weight_decay=0.0,
        max_grad_norm=WORK["max_grad_norm"],
        micro_batch_size=WORK["prompts_per_step"] * WORK["group_size"],
        max_steps=max_steps,
        precision="bfloat16" if precision == "bf16" else "float32",
        device=device,
        threads=threads,
        seed=WORK["seed"],
        eval_decoding=(),
        eval_every=0,
        save_every=0,
        save_optimizer=False,
        output_dir=out,
        progress=False,
        **overrides,
    )


def run_policygrad(prompts: Path, out: Path, precision: str, threads: int, warmup: int, steps: int) -> dict:
    from policygrad.lm.trainer import train

    config = work_config(prompts, out, precision, threads, warmup + steps)
    run_dir = train(config)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "step_time" in r][warmup:]
    result = _summary(
        step_times=[r["step_time"] for r in timed],
        generation_times=[r["sample_time"] for r in timed],
        completion_tokens=[r["completion_tokens"] * WORK["prompts_per_step"] * WORK["group_size"] for r in timed],
    )
    result["peak_rss_mb"] = peak_rss_mb()  # of the training run, before the FLOP count below loads a second model
    result.update(_policygrad_update_profile(precision, threads))
    result["decoding"], result["decoding_transformers"] = _policygrad_decoding_profile(precision, threads)
    result["reward_mean"] = statistics.mean(r["reward_mean"] for r in timed)
    return result


def _transposed(a) -> bool:
    """A 2-D operand laid out column-major (e.g. ``weight.t()``), which BLAS reads without a copy."""
    return a.dim() == 2 and a.stride(0) == 1 and a.stride(1) != 1


def _like(shape: tuple, dtype, transposed: bool):
    """A random tensor of ``shape`` and ``dtype``, column-major if ``transposed``, to replay a matrix product."""
    import torch

    if transposed:
        return torch.randn(shape[::-1]).to(dtype).t()
    return torch.randn(shape).to(dtype)


def _policygrad_update_profile(precision: str, threads: int) -> dict:
    """One policygrad update on a fresh batch of the benchmark's shape, taken apart:

    - ``update_flop``: its FLOPs, counted by FlopCounterMode;
    - ``update_alone_s``: its time alone (best of 3 on the same batch; no sampling, scoring or logging);
    - ``update_matmul_s``: the time of exactly its matrix products (every mm/addmm/bmm it ran, recorded with their
      shapes and dtypes, then replayed alone, best of 3): the floor of this update at the sizes it really multiplies,
      as opposed to the 2048 x 2048 rate of :func:`matmul_rates`, which the small products of a 135M model never reach.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    from policygrad.lm.config import GRPOConfig
    from policygrad.lm.data import load_prompts
    from policygrad.lm.models import load_model
    from policygrad.lm.rollout import sample
    from policygrad.lm.update import update

    class RecordMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
                operands = args[1:] if func is torch.ops.aten.addmm.default else args
                self.calls.append((func, [(tuple(a.shape), a.dtype, _transposed(a)) for a in operands[:2]]))
            return func(*args, **(kwargs or {}))

    torch.set_num_threads(threads)
    model, tokenizer = load_model("default")
    model.eval()
    prompts = load_prompts("pydoc", tokenizer, 100, WORK["max_passage_tokens"], WORK["target_length"], (5, 20), 0)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else None
    rollout = sample(
        model,
        tokenizer,
        [r["prompt"] for r in prompts.train[:2]],
        WORK["group_size"],
        WORK["max_new_tokens"],
        autocast_dtype=dtype,
        score_tokens=False,
    )
    config = GRPOConfig(group_size=WORK["group_size"], micro_batch_size=16, max_new_tokens=WORK["max_new_tokens"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, fused=True)
    advantages = torch.randn(16)

    def one_update():
        update(model, optimizer, rollout, advantages, None, 0.0, config, dtype)

    counter, recorder = FlopCounterMode(display=False), RecordMatmuls()
    with counter:
        one_update()
    with recorder:
        one_update()
    alone = min(_timed(one_update) for _ in range(3))
    operands = [(func, [_like(shape, dt, t) for shape, dt, t in pairs]) for func, pairs in recorder.calls]

    def matmuls():
        for func, (a, b) in operands:
            torch.mm(a, b) if func is not torch.ops.aten.bmm.default else torch.bmm(a, b)

    matmuls()  # warm-up
    return {
        "update_flop": float(counter.get_total_flops()),
        "update_alone_s": alone,
        "update_matmul_s": min(_timed(matmuls) for _ in range(3)),
        "update_matmuls": len(operands),
    }


def _policygrad_decoding_profile(
    precision: str, threads: int, rows=(16, 64), new_tokens: int = 32
) -> tuple[dict, dict]:
    """The decoder's step time against the memory-bandwidth bound, for each number of rows R (G = 8 completions of
    R / 8 prompts of the benchmark): ``rollout.generate`` with no stop token, so every row decodes ``new_tokens``
    tokens, timed whole and with one token (prefill, the autocast weight casts and one draw), best of 3 each; the
    difference over ``new_tokens - 1`` is one decoding step, a forward pass of R tokens against the cached prompt.
    ``weight_bytes``: what one step must read at least, every weight once in the dtype the products use (bfloat16
    under autocast; the tied embedding once, as the output layer)."""
    import torch

    from policygrad.lm.data import load_prompts
    from policygrad.lm.models import load_model
    from policygrad.lm.rollout import encode_prompts, pad_token_id

    torch.set_num_threads(threads)
    model, tokenizer = load_model("default")
    model.eval()
    prompts = load_prompts("pydoc", tokenizer, 100, WORK["max_passage_tokens"], WORK["target_length"], (5, 20), 0)
    dtype = torch.bfloat16 if precision == "bf16" else None
    weight_bytes = sum(p.numel() for p in model.parameters()) * (2 if dtype else 4)
    group, pad = WORK["group_size"], pad_token_id(model, tokenizer)
    profile = {"weight_bytes": weight_bytes, "new_tokens": new_tokens}
    transformers = {}  # the same steps through the model's own forward (--decoder transformers), for the ratio
    for r in rows:
        ids, mask = encode_prompts(tokenizer, [p["prompt"] for p in prompts.train[: r // group]], "cpu")
        profile[str(r)] = decoding_step(model, ids, mask, pad, dtype, new_tokens)
        transformers[str(r)] = decoding_step(model, ids, mask, pad, dtype, new_tokens, decoder="transformers")
    return profile, transformers


def decoding_step(model, ids, mask, pad: int, dtype, new_tokens: int = 32, decoder: str = "auto") -> dict:
    """Time ``rollout.generate`` (G = 8 completions of each prompt of ``ids``, no stop token) for ``new_tokens``
    tokens and for 1 (prefill and one draw), after a warm-up, best of 3 each, under autocast to ``dtype`` (None: the
    model's own dtype): -> whole, prefill and one decoding step's seconds."""
    import torch

    from policygrad.lm.rollout import autocast_context, generate

    @torch.no_grad()
    def decode(tokens: int) -> None:
        with autocast_context("cpu", dtype):
            generate(model, ids, mask, WORK["group_size"], tokens, [], pad, decoder=decoder)

    decode(new_tokens)  # warm-up
    whole = min(_timed(lambda: decode(new_tokens)) for _ in range(3))
    first = min(_timed(lambda: decode(1)) for _ in range(3))
    return {"whole_s": whole, "prefill_s": first, "step_s": (whole - first) / (new_tokens - 1)}


def decoding_bounds(profile: dict, bandwidth_gbs: float) -> dict:
    """Per R: tokens per second of decoding (R / step time), the bound R x bandwidth / weight bytes, and the fraction
    of the bound reached."""
    bound_step = profile["weight_bytes"] / (bandwidth_gbs * 1e9)
    out = {}
    for key, value in profile.items():
        if isinstance(value, dict):
            rows = int(key)
            out[key] = {
                "tokens_per_s": rows / value["step_s"],
                "bound_tokens_per_s": rows / bound_step,
                "fraction": bound_step / value["step_s"],
            }
    return out


# ----------------------------------------------------------------------------------------------------------------
# TRL (child process)
# ----------------------------------------------------------------------------------------------------------------


def run_trl(
    prompts: Path, out: Path, precision: str, threads: int, warmup: int, steps: int, device: str = "cpu", **trl_options
) -> dict:
    """TRL's GRPOTrainer on the benchmark's work; ``trl_options`` are more GRPOConfig fields (vLLM's, on a GPU)."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from policygrad.lm.models import default_model_path
    from policygrad.lm.tasks import shaped_reward

    torch.set_num_threads(threads)
    torch.manual_seed(WORK["seed"])
    records = [json.loads(line) for line in prompts.read_text().splitlines()]
    # conversational prompts, so TRL applies the same chat template policygrad applies
    dataset = Dataset.from_list([{**r, "prompt": [{"role": "user", "content": r["prompt"]}]} for r in records])

    def shaped(prompts, completions, target_length, target_digit_sum, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return shaped_reward(prompts, texts, target_length=target_length, target_digit_sum=target_digit_sum)

    n = WORK["prompts_per_step"] * WORK["group_size"]
    args = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        num_generations=WORK["group_size"],
        max_completion_length=WORK["max_new_tokens"],
        temperature=WORK["temperature"],
        top_p=1.0,
        top_k=0,
        repetition_penalty=1.0,
        beta=0.0,
        num_iterations=1,
        scale_rewards="group",
        loss_type="dapo",
        epsilon=0.2,
        learning_rate=WORK["lr"],
        weight_decay=0.0,
        max_grad_norm=WORK["max_grad_norm"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_steps=warmup + steps,
        bf16=precision == "bf16",
        use_cpu=device == "cpu",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=WORK["seed"],
        disable_dropout=True,
        dataloader_num_workers=0,
        log_completions=False,
        **trl_options,
    )
    trainer = GRPOTrainer(model=str(default_model_path()), reward_funcs=shaped, args=args, train_dataset=dataset)

    generation_times: list[float] = []
    tokens: list[int] = []
    original = trainer._generate_single_turn

    def timed_generate(*a, **k):
        start = time.perf_counter()
        result = original(*a, **k)
        generation_times.append(time.perf_counter() - start)
        completion_ids = result[0] if isinstance(result, tuple) else None  # (completion_ids, logprobs)
        if completion_ids is not None:
            tokens.append(sum(len(ids) for ids in completion_ids))
        return result

    trainer._generate_single_turn = timed_generate
    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.start)

    trainer.add_callback(StepTimer())
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    result = _summary(step_times[warmup:], generation_times[warmup:], tokens[warmup:] if tokens else [])
    result["peak_rss_mb"] = peak_rss_mb()
    result["reward_mean"] = statistics.mean(rewards[warmup:]) if rewards[warmup:] else float("nan")
    return result


def _summary(step_times, generation_times, completion_tokens) -> dict:
    generated = sum(completion_tokens)
    return {
        "step_s": statistics.median(step_times),
        "step_times": step_times,
        "generation_s": statistics.median(generation_times),
        "update_s": statistics.median(s - g for s, g in zip(step_times, generation_times)),
        "generation_tokens_per_s": generated / sum(generation_times) if generated else float("nan"),
    }


# ----------------------------------------------------------------------------------------------------------------
# End to end: training time to a held-out pass rate (--end-to-end)
# ----------------------------------------------------------------------------------------------------------------
# Both trainers train with the same recipe (its rewards, sampling, loss, optimiser, precision, threads and seed), at the
# same time, each on its own cores, saving the weights every --save-every steps with the training seconds spent so far
# (the sum of step times: generation, scoring and update; checkpoint writes excluded), until --max-steps or until
# --minutes of wall time. Afterwards every checkpoint of both is scored by the same function, policygrad's
# evaluate_heldout (the recipe's held-out prompts, greedy, the recipe's max_new_tokens), so neither trainer's own
# evaluation code enters the comparison.


def e2e_policygrad(config, out: Path, minutes: float) -> list[dict]:
    import signal
    import threading

    from policygrad.lm.state import TRAINER_STATE, load_trainer_state
    from policygrad.lm.trainer import train
    from policygrad.runs import checkpoint_candidates

    config = dataclasses.replace(config, output_dir=out, eval_decoding=(), keep_checkpoints=0, progress=False)
    # at the wall-time budget, stop as a user would: SIGINT finishes the step, saves a checkpoint and returns
    timer = threading.Timer(minutes * 60, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    run_dir = train(config)
    timer.cancel()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds, spent = {0: 0.0}, 0.0
    for record in records:
        if "step_time" in record:
            spent += record["step_time"]
            seconds[record["step"]] = spent
    checkpoints = {  # final/ and the periodic checkpoint of the last step are one point
        load_trainer_state(folder).step: str(folder)
        for folder in checkpoint_candidates(run_dir)
        if (folder / TRAINER_STATE).exists()
    }
    return [{"step": step, "train_s": seconds[step], "model": folder} for step, folder in sorted(checkpoints.items())]


def e2e_trl(config, prompts: Path, out: Path, minutes: float) -> list[dict]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from policygrad.lm.models import default_model_path
    from policygrad.lm.rewards import load_rewards
    from policygrad.lm.rollout import eos_token_ids

    torch.set_num_threads(config.threads)
    records = [json.loads(line) for line in prompts.read_text().splitlines()]
    dataset = Dataset.from_list([{**r, "prompt": [{"role": "user", "content": r["prompt"]}]} for r in records])
    reward_set = load_rewards(config.rewards)
    ended_by: set[int] = set()  # the EOS ids of TRL's model and tokenizer, as policygrad's Rollout.truncated uses

    def recipe_reward(prompts, completions, completion_ids, **fields):
        """The recipe's summed rewards; a reply cut off at max_new_tokens (no EOS) gets truncated_reward."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        names = ("target_length", "target_digit_sum", "tolerance")
        scores = reward_set.score(prompts, texts, {k: fields[k] for k in names if k in fields}, "error", None)
        rewards = list(scores.rewards)
        if config.truncated_reward is not None:
            rewards = [r if ended_by & set(ids) else config.truncated_reward for r, ids in zip(rewards, completion_ids)]
        return rewards

    n = config.prompts_per_step * config.group_size
    args = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        num_generations=config.group_size,
        max_completion_length=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=0,
        repetition_penalty=1.0,
        beta=config.kl_coef,
        num_iterations=config.updates_per_batch,
        scale_rewards=config.scale_rewards,
        loss_type="dapo",
        epsilon=config.clip_eps_low,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        lr_scheduler_type="constant",
        warmup_steps=0,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        bf16=config.precision == "bfloat16",
        use_cpu=True,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=config.seed,
        disable_dropout=True,
        dataloader_num_workers=0,
        log_completions=False,
    )
    trainer = GRPOTrainer(model=str(default_model_path()), reward_funcs=recipe_reward, args=args, train_dataset=dataset)
    tokenizer = trainer.processing_class
    ended_by.update(eos_token_ids(trainer.model, tokenizer))
    saved: list[dict] = []
    began = time.perf_counter()

    class SaveTimed(TrainerCallback):
        spent = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.spent += time.perf_counter() - self.start
            over = time.perf_counter() - began > minutes * 60
            if over or state.global_step % config.save_every == 0 or state.global_step == state.max_steps:
                folder = out / f"step-{state.global_step}"
                model.save_pretrained(folder, safe_serialization=True)
                tokenizer.save_pretrained(folder)
                saved.append({"step": state.global_step, "train_s": self.spent, "model": str(folder)})
            control.should_training_stop = control.should_training_stop or over

    trainer.add_callback(SaveTimed())
    trainer.train()
    return saved


def end_to_end(
    recipe: Path, minutes: float, max_steps: int, save_every: int, seed: int, target: float, only, work
) -> dict:
    """Train both on the recipe at once (each its own child process), then score every checkpoint. ``work``: the
    folder for the runs (checkpoints ~0.5 GB each), kept; None: a temporary one."""
    import contextlib

    from policygrad.configs import config_to_dict
    from policygrad.lm.config import load_config
    from policygrad.lm.evaluate import evaluate_heldout

    config = load_config(recipe, _e2e_overrides(max_steps, save_every, seed))
    with tempfile.TemporaryDirectory() if work is None else contextlib.nullcontext(work) as tmp:
        Path(tmp).mkdir(parents=True, exist_ok=True)
        prompts = Path(tmp) / "prompts.jsonl"
        write_prompts(prompts, config)
        runs = {}
        for name in only or list(RUNNERS):
            print(f"training {name} for at most {max_steps} steps or {minutes} minutes ...", file=sys.stderr)
            command = [
                "--child-e2e",
                name,
                "--recipe",
                str(recipe),
                "--prompts-file",
                str(prompts),
                "--out",
                str(Path(tmp) / name),
                "--minutes",
                str(minutes),
                "--max-steps",
                str(max_steps),
                "--save-every",
                str(save_every),
                "--seed",
                str(seed),
            ]
            runs[name] = _spawn(command, config.threads)
        checkpoints = {name: _result(name, process) for name, process in runs.items()}
        (Path(tmp) / "checkpoints.json").write_text(json.dumps(checkpoints, indent=2))
        start = {"step": 0, "train_s": 0.0, "model": "default"}
        curves: dict[str, list[dict]] = {}
        scored: dict[str, dict] = {}  # the untrained model is the same for both: score it once
        for name, saved in checkpoints.items():
            curves[name] = []
            for point in [start, *saved]:
                print(f"evaluating {name} step {point['step']} ...", file=sys.stderr)
                if point["model"] not in scored:
                    evaluation = evaluate_heldout(dataclasses.replace(config, model=point["model"], threads=None))
                    rates = evaluation["greedy"]
                    scored[point["model"]] = {k: v for k, v in rates.items() if k != "examples"}
                    scored[point["model"]]["example"] = rates["examples"][0]["completion"]
                curves[name].append(
                    {"step": point["step"], "train_min": point["train_s"] / 60, **scored[point["model"]]}
                )
    return {
        "recipe": str(recipe),
        "config": config_to_dict(config),
        "minutes": minutes,
        "target": target,
        "curves": curves,
    }


def e2e_plot(result: dict, path: Path) -> None:
    """Held-out pass rate (and mean reward) against training minutes, one line per trainer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, curve in result["curves"].items():
        minutes = [p["train_min"] for p in curve]
        axes[0].plot(minutes, [p["pass_rate"] for p in curve], marker="o", label=name)
        axes[1].plot(minutes, [p["mean_reward"] for p in curve], marker="o", label=name)
    axes[0].axhline(result["target"], color="grey", linestyle=":", label=f"target {result['target']:.0%}")
    for ax, title in zip(axes, ("held-out pass rate (greedy)", "held-out mean reward")):
        ax.set_xlabel("training minutes (sum of step times)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    config = result["config"]
    fig.suptitle(
        f"{Path(result['recipe']).name}, seed {config['seed']}, {config['threads']} thread(s) each, side by side"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _e2e_overrides(max_steps: int, save_every: int, seed: int) -> dict:
    return {"max_steps": max_steps, "save_every": save_every, "seed": seed, "save_optimizer": False}


def time_to_target(curve: list[dict], target: float) -> dict | None:
    """The first point of a curve whose held-out pass rate reaches ``target``."""
    return next((point for point in curve if point["pass_rate"] >= target), None)


def e2e_table(result: dict) -> str:
    target = result["target"]
    header = (
        "trainer",
        "step",
        "training min",
        "held-out pass rate",
        "digits rule",
        "length rule",
        "mean reward",
        "cut off",
    )
    rows = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name, curve in result["curves"].items():
        for p in curve:
            cells = (
                name,
                p["step"],
                f"{p['train_min']:.1f}",
                f"{p['pass_rate']:.2f}",
                f"{p['digits_rate']:.2f}",
                f"{p['length_rate']:.2f}",
                f"{p['mean_reward']:.3f}",
                f"{p['truncated_rate']:.2f}",
            )
            rows.append("| " + " | ".join(map(str, cells)) + " |")
    rows.append("")
    for name, curve in result["curves"].items():
        hit, last = time_to_target(curve, target), curve[-1]
        rows.append(
            f"{name}: held-out pass rate {target:.0%} "
            + (
                f"reached at step {hit['step']} after {hit['train_min']:.1f} training minutes"
                if hit
                else f"not reached in {last['step']} steps ({last['train_min']:.1f} training minutes)"
            )
        )
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------------------
# Parent: set up, run both children, print the table
# ----------------------------------------------------------------------------------------------------------------

RUNNERS = {"policygrad": run_policygrad, "trl": run_trl}


def _spawn(arguments: list[str], threads: int | None) -> subprocess.Popen:
    """This script in a fresh interpreter (its own peak memory, its own thread count)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.Popen(
        [sys.executable, __file__, *arguments], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _result(name: str, process: subprocess.Popen):
    """A child's JSON result (its last line of stdout); its stderr's tail if it failed."""
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"{name} failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def child(name: str, prompts: Path, out: Path, precision: str, threads: int, warmup: int, steps: int) -> dict:
    """Run one trainer in a fresh interpreter and return its JSON result."""
    arguments = [
        "--child",
        name,
        "--prompts-file",
        str(prompts),
        "--out",
        str(out),
        "--precision",
        precision,
        "--threads",
        str(threads),
        "--warmup",
        str(warmup),
        "--steps",
        str(steps),
    ]
    return _result(name, _spawn(arguments, threads))


def table(results: dict, rates: dict, precision: str) -> str:
    rate = rates["bf16" if precision == "bf16" else "fp32"]
    rows = [
        "| trainer | median s/step | generation s | generation tok/s | update s | update GFLOP | update GFLOP/s (floor s) | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        flop = r.get("update_flop")
        flops = (
            (f"{flop / 1e9:.0f}", f"{flop / 1e9 / r['update_s']:.0f} ({flop / 1e9 / rate:.2f})") if flop else ("-", "-")
        )
        rows.append(
            f"| {name} | {r['step_s']:.2f} | {r['generation_s']:.2f} | {r['generation_tokens_per_s']:.0f} | "
            f"{r['update_s']:.2f} | {flops[0]} | {flops[1]} | {r['peak_rss_mb']:.0f} |"
        )
    if {"policygrad", "trl"} <= results.keys():
        ratio = results["trl"]["step_s"] / results["policygrad"]["step_s"]
        rows.append(f"\nTRL / policygrad median step time: **{ratio:.2f}x**")
    measured = ", ".join(f"{name} {rates[name]:.0f} GFLOP/s" for name in ("fp32", "bf16") if name in rates)
    rows.append(f"matrix products in this run: {measured}")
    ours = results.get("policygrad", {})
    if "update_alone_s" in ours:
        floor = ours["update_flop"] / 1e9 / rate
        rows.append(
            f"policygrad update taken apart: alone {ours['update_alone_s']:.2f} s; its {ours['update_matmuls']} matrix "
            f"products replayed alone {ours['update_matmul_s']:.2f} s; floor at the {rate:.0f} GFLOP/s rate "
            f"{floor:.2f} s; update / own products {ours['update_alone_s'] / ours['update_matmul_s']:.2f}x, "
            f"update / floor {ours['update_alone_s'] / floor:.2f}x"
        )
    return "\n".join(rows)


def decoding_table(ours: dict, bandwidth: float) -> str:
    weights = ours["decoding"]["weight_bytes"] / 1e6
    rows = [
        f"memory bandwidth (read) in this run: {bandwidth:.1f} GB/s; one decoding step reads at least {weights:.0f} MB "
        "of weights",
        "",
        "| rows R | decoding step s | tokens/s | bound R x bandwidth / weights, tokens/s | fraction of the bound | "
        "step s through the model's forward (--decoder transformers) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for key, bound in ours["decoding_bounds"].items():
        step = ours["decoding"][key]["step_s"]
        plain = ours.get("decoding_transformers", {}).get(key, {}).get("step_s", float("nan"))
        rows.append(
            f"| {key} | {step:.4f} | {bound['tokens_per_s']:.0f} | {bound['bound_tokens_per_s']:.0f} | "
            f"{bound['fraction']:.2f} | {plain:.4f} |"
        )
    rows.append(
        f"\ngeneration_bandwidth_fraction (R = 16): {ours['generation_bandwidth_fraction']:.2f}; update_floor_ratio "
        f"(update alone / floor): {ours['update_floor_ratio']:.2f} ({ours['update_alone_s']:.2f} s / "
        f"{ours['update_floor_s']:.2f} s)"
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--only", choices=list(RUNNERS), action="append")
    end = parser.add_argument_group("end to end: training time to a held-out pass rate")
    end.add_argument("--end-to-end", action="store_true", help="train both on --recipe and time them to --target")
    end.add_argument("--recipe", type=Path, default=HERE.parent / "recipes" / "cpu-curve.yaml")
    end.add_argument("--target", type=float, default=0.5, help="held-out greedy pass rate to reach")
    end.add_argument("--minutes", type=float, default=100.0, help="wall-time budget of each trainer")
    end.add_argument("--seed", type=int, default=1, help="for both (the recipe's documented run is seed 1)")
    end.add_argument("--max-steps", type=int, default=400)
    end.add_argument("--save-every", type=int, default=50)
    end.add_argument("--work-dir", type=Path, help="keep the runs and checkpoints here (default: a temporary folder)")
    parser.add_argument("--child", choices=list(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--child-e2e", choices=list(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--prompts-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = RUNNERS[args.child](args.prompts_file, args.out, args.precision, args.threads, args.warmup, args.steps)
        print(json.dumps(result))
        return
    if args.child_e2e:
        from policygrad.lm.config import load_config

        config = load_config(args.recipe, _e2e_overrides(args.max_steps, args.save_every, args.seed))
        if args.child_e2e == "trl":
            saved = e2e_trl(config, args.prompts_file, args.out, args.minutes)
        else:
            saved = e2e_policygrad(config, args.out, args.minutes)
        print(json.dumps(saved))
        return
    if args.end_to_end:
        result = end_to_end(
            args.recipe, args.minutes, args.max_steps, args.save_every, args.seed, args.target, args.only, args.work_dir
        )
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "grpo_vs_trl-end-to-end.json").write_text(json.dumps(result, indent=2) + "\n")
        e2e_plot(result, HERE / "results" / "grpo_vs_trl-end-to-end.png")
        print(e2e_table(result))
        return
    # the precision benchmarked, and float32 beside bfloat16 (on a CPU without bfloat16 units, where bfloat16 products
    # are emulated, their rate takes tens of minutes to measure and is not the floor of a float32 run)
    precisions = ("fp32", "bf16") if args.precision == "bf16" else ("fp32",)
    rates, bandwidth = matmul_rates(args.threads, precisions=precisions), memory_bandwidth(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        count = write_prompts(prompts)
        results = {}
        for name in args.only or list(RUNNERS):
            print(f"running {name} ...", file=sys.stderr)
            results[name] = child(
                name, prompts, Path(tmp) / name, args.precision, args.threads, args.warmup, args.steps
            )
    summary = {
        "work": WORK,
        "precision": args.precision,
        "threads": args.threads,
        "warmup": args.warmup,
        "steps": args.steps,
        "training_prompts": count,
        "matmul_gflops": rates,
        "memory_bandwidth_gbs": bandwidth,
        "results": results,
    }
    ours = results.get("policygrad")
    if ours is not None:
        ours["decoding_bounds"] = decoding_bounds(ours["decoding"], bandwidth)
        ours["generation_bandwidth_fraction"] = ours["decoding_bounds"]["16"]["fraction"]
        ours["update_floor_s"] = ours["update_flop"] / 1e9 / rates["bf16" if args.precision == "bf16" else "fp32"]
        ours["update_floor_ratio"] = ours["update_alone_s"] / ours["update_floor_s"]
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"grpo_vs_trl-{args.precision}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table(results, rates, args.precision))
    if ours is not None:
        print(decoding_table(ours, bandwidth))


if __name__ == "__main__":
    main()
