"""Configuration of ``policygrad train`` / ``policygrad eval`` (GRPO and friends for language models).

Imports nothing heavy (no torch, no transformers), so ``--help`` and argument errors are instant. A recipe is a YAML
file of field values (``recipes/*.yaml``); :func:`load_config` reads one and applies command-line overrides. Checks
that need torch or the model (is CUDA there, does the model load) happen in the trainer.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from policygrad import configs
from policygrad.allocator import Allocator
from policygrad.configs import choice as _choice
from policygrad.configs import default_hint
from policygrad.configs import flag as _flag
from policygrad.configs import positive as _positive
from policygrad.configs import short as _short
from policygrad.errors import UsageError
from policygrad.errors import require as _require
from policygrad.variants import (
    ADVANTAGES,
    AGGREGATIONS,
    ENTROPY_WEIGHTS,
    KL_ESTIMATORS,
    KL_WEIGHTS,
    REWARD_SCALES,
    TASKS,
)

PRECISIONS = ("auto", "float32", "bfloat16")
DECODINGS = ("greedy", "sampled")
REWARD_FAULTS = ("error", "skip")
"""Allowed values of the choice fields that are settings rather than variants; the variants' names come from their
registries in :mod:`policygrad.variants`."""


@dataclasses.dataclass
class TaskSettings:
    """What a run trains and is evaluated on: the model, the task, the prompt source and the targets, and the split
    of held-out prompts. The fields that ``policygrad train`` and ``policygrad eval`` share, defined once."""

    # --- model, task and data ---
    model: str = "default"
    """model folder (a run's final/ or checkpoints/step-N/ among them), Hugging Face id, or "default" (the
    embedded SmolLM2-135M-Instruct, converted offline once)"""
    task: Literal[TASKS.names] = "length_digits"
    """the task: what the logged and held-out rates measure and the summary rows show (policygrad.variants.TASKS)"""
    prompts: str = "pydoc"
    """prompt source: "pydoc" (embedded corpus as length_digits prompts), a .jsonl file, or hf:<dataset>[:split]"""
    target_length: int = 64
    """length_digits: characters the reply must have (after stripping surrounding white space)"""
    length_tolerance: int = 0
    """length_digits: a reply within this many characters of target_length passes the length rule"""
    digit_sum_min: int = 5
    """length_digits: smallest per-prompt digit-sum target"""
    digit_sum_max: int = 20
    """length_digits: largest per-prompt digit-sum target"""
    max_passage_tokens: int = 128
    """pydoc prompts: passages are cut to at most this many tokens of the model's tokenizer"""
    heldout_prompts: int = 100
    """prompts held out from training for evaluation (a fixed split of the source)"""


@dataclasses.dataclass
class GRPOConfig(TaskSettings):
    """Train a language model with group-relative policy gradients (GRPO, RLOO or REINFORCE) on rule-based rewards."""

    rewards: tuple[str, ...] = ("shaped",)
    """reward functions, summed: binary, shaped, joint, sharp, module:function or file.py:function, each with optional =weight"""
    truncated_reward: float | None = None
    """reward of a completion cut off at max_new_tokens (no EOS), replacing what the reward functions say; None:
    score it like any other (a policy may then learn to fill the token budget, docs/results-2026-11-24.md)"""
    curriculum_tolerance: int = 0
    """length_digits curriculum: the training rewards start with this length tolerance, halved toward
    length_tolerance each time the training pass rate reaches curriculum_advance_at (0: no curriculum)"""
    curriculum_advance_at: float = 0.5
    """curriculum: the training pass rate (mean over curriculum_window steps) that tightens the tolerance"""
    curriculum_window: int = 20
    """curriculum: steps at the current tolerance averaged before it may tighten"""

    # --- sampling ---
    prompts_per_step: int = 4
    """B: prompts sampled per training step"""
    group_size: int = 4
    """G: completions sampled per prompt"""
    max_new_tokens: int = 48
    """longest completion in tokens; longer ones are cut off (and usually fail the length rule)"""
    temperature: float = 1.0
    """sampling temperature (> 0); the log-probs of the update use the same temperature"""
    top_p: float = 1.0
    """nucleus sampling: keep the smallest set of tokens with this much probability, in (0, 1]"""
    decoder: Literal["auto", "transformers", "vllm"] = "auto"
    """what decodes the training samples: auto = policygrad's packed decoder where it supports the model
    (Llama-family on a CPU), else the model's forward; transformers = always the model's forward; vllm = a vLLM
    engine colocated on the GPU, fed the policy's weights before each step's sampling (needs a CUDA GPU, the vllm
    extra and --tis-cap; policygrad.lm.vllm_engine); evaluation decodes with transformers whichever is chosen"""
    vllm_gpu_memory_utilization: float = 0.3
    """decoder vllm: the fraction of the GPU's memory the engine takes for its weights and key/value blocks (the
    rest is the trainer's)"""
    allocator: Allocator = "keep"
    """CPU runs: keep = the memory a step frees stays in the process for the next step (glibc's malloc without mmap
    or trimming; no page faults after the first steps, peak memory a little higher: policygrad.allocator);
    system = the C library's defaults"""
    max_extra_groups: int = 0
    """dynamic sampling (DAPO): groups whose rewards are all equal are replaced by fresh prompts' groups, at most
    this many extra groups sampled per step (0: off)"""
    retry_temperature: float = 0.0
    """dynamic sampling: > 0 redraws a group without reward spread from the SAME prompt at this (hotter)
    temperature instead of drawing a fresh prompt; with tis_cap > 0 the update reweights its tokens toward the
    training temperature (0: fresh prompts)"""

    # --- advantages and loss ---
    advantage: Literal[ADVANTAGES.names] = "grpo"
    """grpo: reward minus group mean, divided by a std (see scale_rewards); rloo: leave-one-out group mean;
    reinforce: reward minus a moving average of past batch means"""
    scale_rewards: Literal[REWARD_SCALES.names] = "group"
    """grpo: divide by the group's reward std, the whole batch's, or not at all (Dr. GRPO)"""
    advantage_eps: float = 1e-4
    """grpo: added to the std divisor"""
    baseline_decay: float = 0.9
    """reinforce: memory of the moving-average baseline, in [0, 1)"""
    aggregation: Literal[AGGREGATIONS.names] = "token_mean"
    """how per-token losses average: every token equal, every sequence equal, or sum / (N * max_new_tokens)"""
    updates_per_batch: int = 1
    """gradient steps on each sampled batch; above 1 the loss is the clipped importance-ratio surrogate"""
    clip_eps_low: float = 0.2
    """clipped surrogate: ratio clipped below at 1 - clip_eps_low"""
    clip_eps_high: Annotated[float | None, default_hint("clip_eps_low")] = None
    """clipped surrogate: ratio clipped above at 1 + clip_eps_high (DAPO uses 0.28)"""
    entropy_weight: Literal[ENTROPY_WEIGHTS.names] = "constant"
    """constant: the bonus weight is entropy_coef; dynamic: entropy_coef / (Var(rewards) + entropy_eps), bounded"""
    entropy_coef: float = 0.0
    """entropy bonus weight (constant) or its numerator (dynamic); 0 for no bonus"""
    entropy_min_weight: float = 0.0
    """dynamic entropy weight: lower bound"""
    entropy_max_weight: float = 0.01
    """dynamic entropy weight: upper bound"""
    entropy_eps: float = 0.01
    """dynamic entropy weight: added to the reward variance"""
    kl_coef: float = 0.0
    """beta: weight of the KL penalty to a frozen copy of the initial model (constant) or its numerator (dynamic); 0
    loads no reference model"""
    kl_weight: Literal[KL_WEIGHTS.names] = "constant"
    """constant: beta = kl_coef; dynamic (reward-aware): beta = kl_coef / (Var(rewards) + kl_eps), bounded, so the
    prior holds harder on batches whose rewards barely differ"""
    kl_min_weight: float = 0.0
    """dynamic KL coefficient: lower bound"""
    kl_max_weight: float = 1.0
    """dynamic KL coefficient: upper bound"""
    kl_eps: float = 0.01
    """dynamic KL coefficient: added to the reward variance"""
    kl_estimator: Literal[KL_ESTIMATORS.names] = "k3"
    """per-token KL estimator in the loss (Schulman 2020): k3 as in GRPO, k2 for the exact reverse-KL gradient"""

    # --- optimisation ---
    lr: float = 1e-5
    """AdamW learning rate"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """clip the gradient's global norm to this; 0 to not clip (the norm is logged either way)"""
    micro_batch_size: int = 8
    """sequences per forward/backward pass; gradients accumulate over a step's N = B * G sequences"""
    epochs: int = 1
    """passes over the training prompts"""
    max_steps: int | None = None
    """stop after this many steps even if the epochs are not done"""
    lora_rank: int = 0
    """LoRA (needs the lora extra, PEFT): train rank-r adapters on the frozen base weights, W + (alpha / r) B A;
    0 trains every weight"""
    lora_alpha: float = 16.0
    """LoRA: the adapters' scale is lora_alpha / lora_rank"""
    lora_target_modules: tuple[str, ...] = ("all-linear",)
    """LoRA: names of the linear layers that get adapters (q_proj v_proj ...), or all-linear: every linear layer but
    the output head"""
    lora_merged: bool = False
    """LoRA: each checkpoint also holds merged/, the base weights with the adapters added in, which plain
    transformers loads"""
    gradient_checkpointing: bool = False
    """recompute each decoder layer's activations in the backward pass instead of keeping them: less memory, about
    one more forward pass of time; the same gradients"""
    tis_cap: float = 0.0
    """truncated importance sampling: weight each sampled token's policy-gradient term by min(pi_trainer /
    pi_sampler, C) with C this cap (2 is TRL's and verl's usual), for the gap between the sampler's log-probs and the
    trainer's forward pass (other kernels, precision, the KV cache), logged as tis/logprob_gap; a top-p cut is not
    corrected for; 0: off"""
    fsdp: bool = False
    """under torchrun: shard the weights, gradients and AdamW's moments over the processes (FSDP2), for a model
    whose training state does not fit one device per process; the same updates as data parallelism"""
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """bfloat16: float32 weights with bfloat16 autocast; auto: bfloat16 where the GPU or CPU (AVX512-BF16, AMX) has
    fast bfloat16 matrix products, else float32"""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda or cuda:<index>"""
    seed: int = 0
    """seeds torch, prompt order and sampling"""
    threads: Annotated[int | None, default_hint("one per idle core")] = None
    """CPU threads for torch"""

    # --- evaluation, logging, checkpoints ---
    eval_every: int = 0
    """evaluate on the held-out prompts before the first step (logged as step 0) and every this many steps (0: only
    at the end)"""
    eval_size: int = 100
    """held-out prompts used per evaluation (at most heldout_prompts)"""
    eval_decoding: tuple[Literal["greedy", "sampled"], ...] = ("greedy",)
    """decodings evaluated: greedy (argmax) and/or sampled (the training temperature and top_p)"""
    save_every: int = 0
    """save a checkpoint every this many steps (0: only at the end)"""
    save_optimizer: bool = True
    """also save AdamW's state (twice the model's size) so --resume continues exactly; false saves only the model"""
    log_completions: int = 4
    """completions written to completions.jsonl per step"""
    output_dir: Path = Path("runs/grpo")
    """run directory: config, metrics.jsonl, TensorBoard events, completions, checkpoints"""
    overwrite: bool = False
    """delete a previous run in output_dir and start again"""
    resume: bool = False
    """continue the run in output_dir from its last checkpoint"""
    progress: bool = True
    """show a progress bar"""

    # --- reliability (docs/reliability.md) ---
    keep_checkpoints: int = 3
    """periodic checkpoints kept in checkpoints/, the newest (0 keeps all); final/ is always kept"""
    allow_config_change: bool = False
    """with --resume: continue even though the config differs from the one the checkpoint was trained with"""
    reward_fault: Literal["error", "skip"] = "error"
    """a reward function that raises, hangs, returns None, the wrong count, NaN or inf: error saves a checkpoint and
    stops, naming the function, prompt and completion; skip gives those samples advantage 0 and logs them"""
    reward_timeout: float = 600.0
    """seconds a reward function may take on one batch before it counts as hung (0: no limit)"""
    max_bad_steps: int = 3
    """a non-finite loss or gradient norm skips the update; this many such steps in a row stop the run, saving the
    state from before the first of them"""
    collective_timeout: float = 1800.0
    """under torchrun: seconds a process waits for the others (gradients, a checkpoint, rank 0's evaluation) before
    the run stops as hung; a process that dies is noticed at once on CPU (docs/distributed.md)"""

    def __post_init__(self) -> None:
        self.rewards = tuple(self.rewards)
        self.eval_decoding = tuple(self.eval_decoding)
        self.lora_target_modules = tuple(self.lora_target_modules)
        self.output_dir = Path(self.output_dir)
        TASKS.check("--task", self.task)
        ADVANTAGES.check("--advantage", self.advantage)
        REWARD_SCALES.check("--scale-rewards", self.scale_rewards)
        AGGREGATIONS.check("--aggregation", self.aggregation)
        ENTROPY_WEIGHTS.check("--entropy-weight", self.entropy_weight)
        KL_WEIGHTS.check("--kl-weight", self.kl_weight)
        KL_ESTIMATORS.check("--kl-estimator", self.kl_estimator)
        _choice("--precision", self.precision, PRECISIONS)
        for decoding in self.eval_decoding:
            _choice("--eval-decoding", decoding, DECODINGS)
        _require(bool(self.model), "--model", "give a model folder, a Hugging Face id or 'default'")
        for name in ("model", "prompts", "device", "output_dir", "rewards"):  # a recipe can spell "\0"; the OS cannot
            _require("\x00" not in str(getattr(self, name)), _flag(name), "must not contain a NUL character")
        self._check_task_and_data()
        self._check_sampling_and_loss()
        self._check_run()

    def _check_task_and_data(self) -> None:
        _require(bool(self.rewards), "--rewards", "give at least one reward function")
        _require(self.target_length >= 1, "--target-length", f"must be at least 1, got {self.target_length}")
        _require(self.length_tolerance >= 0, "--length-tolerance", f"must be >= 0, got {self.length_tolerance}")
        if self.truncated_reward is not None:
            finite = math.isfinite(self.truncated_reward)
            _require(finite, "--truncated-reward", f"must be finite, got {self.truncated_reward}")
        _require(
            self.curriculum_tolerance >= 0, "--curriculum-tolerance", f"must be >= 0, got {self.curriculum_tolerance}"
        )
        _require(
            0 < self.curriculum_advance_at <= 1,
            "--curriculum-advance-at",
            f"must be in (0, 1], got {self.curriculum_advance_at}",
        )
        window = self.curriculum_window
        _require(window >= 1, "--curriculum-window", f"must be at least 1, got {window}")
        _require(self.digit_sum_min >= 0, "--digit-sum-min", f"must be >= 0, got {self.digit_sum_min}")
        _require(
            self.digit_sum_max >= self.digit_sum_min,
            "--digit-sum-max",
            f"must be >= --digit-sum-min ({self.digit_sum_min}), got {self.digit_sum_max}",
        )
        _require(
            self.max_passage_tokens >= 1, "--max-passage-tokens", f"must be at least 1, got {self.max_passage_tokens}"
        )
        _require(self.heldout_prompts >= 0, "--heldout-prompts", f"must be >= 0, got {self.heldout_prompts}")

    def _check_sampling_and_loss(self) -> None:
        _require(self.prompts_per_step >= 1, "--prompts-per-step", f"must be at least 1, got {self.prompts_per_step}")
        _require(self.group_size >= 1, "--group-size", f"must be at least 1, got {self.group_size}")
        if self.advantage in ("grpo", "rloo") and self.group_size < 2:
            raise UsageError(
                "--group-size", f"advantage {self.advantage!r} compares completions, so it needs at least 2"
            )
        _require(self.max_new_tokens >= 1, "--max-new-tokens", f"must be at least 1, got {self.max_new_tokens}")
        _positive("--temperature", self.temperature)
        _require(0 < self.top_p <= 1, "--top-p", f"must be in (0, 1], got {self.top_p}")
        utilization = self.vllm_gpu_memory_utilization
        _require(0 < utilization < 1, "--vllm-gpu-memory-utilization", f"must be in (0, 1), got {utilization}")
        _require(self.max_extra_groups >= 0, "--max-extra-groups", f"must be >= 0, got {self.max_extra_groups}")
        _positive("--retry-temperature", self.retry_temperature, allow_zero=True)
        _require(
            not self.retry_temperature or self.max_extra_groups > 0,
            "--retry-temperature",
            "redraws groups of dynamic sampling: set --max-extra-groups too",
        )
        _positive("--advantage-eps", self.advantage_eps, allow_zero=True)
        _require(0 <= self.baseline_decay < 1, "--baseline-decay", f"must be in [0, 1), got {self.baseline_decay}")
        _require(
            self.updates_per_batch >= 1, "--updates-per-batch", f"must be at least 1, got {self.updates_per_batch}"
        )
        _require(0 < self.clip_eps_low < 1, "--clip-eps-low", f"must be in (0, 1), got {self.clip_eps_low}")
        if self.clip_eps_high is not None:
            _positive("--clip-eps-high", self.clip_eps_high)
        for name in (
            "entropy_coef",
            "entropy_min_weight",
            "entropy_max_weight",
            "kl_coef",
            "kl_min_weight",
            "kl_max_weight",
            "weight_decay",
        ):
            _positive(_flag(name), getattr(self, name), allow_zero=True)
        _positive("--max-grad-norm", self.max_grad_norm, allow_zero=True)
        _positive("--entropy-eps", self.entropy_eps)
        _require(
            self.entropy_max_weight >= self.entropy_min_weight,
            "--entropy-max-weight",
            f"must be >= --entropy-min-weight ({self.entropy_min_weight}), got {self.entropy_max_weight}",
        )
        _positive("--kl-eps", self.kl_eps)
        _require(
            self.kl_max_weight >= self.kl_min_weight,
            "--kl-max-weight",
            f"must be >= --kl-min-weight ({self.kl_min_weight}), got {self.kl_max_weight}",
        )

    def _check_run(self) -> None:
        """Optimisation, device, evaluation, logging and reliability settings."""
        _positive("--lr", self.lr)
        _require(self.micro_batch_size >= 1, "--micro-batch-size", f"must be at least 1, got {self.micro_batch_size}")
        _require(self.epochs >= 1, "--epochs", f"must be at least 1, got {self.epochs}")
        _require(self.lora_rank >= 0, "--lora-rank", f"must be >= 0 (0: no LoRA), got {self.lora_rank}")
        _positive("--lora-alpha", self.lora_alpha)
        _require(bool(self.lora_target_modules), "--lora-target-modules", "names no module")
        _require(
            self.lora_rank > 0 or not self.lora_merged, "--lora-merged", "merges LoRA adapters: set --lora-rank too"
        )
        _positive("--tis-cap", self.tis_cap, allow_zero=True)
        _require(
            not (self.fsdp and self.lora_merged),
            "--lora-merged",
            "under --fsdp not yet: drop it and merge afterwards with policygrad export RUN_DIR",
        )
        if self.max_steps is not None:
            _require(self.max_steps >= 1, "--max-steps", f"must be at least 1, got {self.max_steps}")
        _require(
            re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,  # torch.device() raises on the rest
            "--device",
            f"must be auto, cpu, cuda or cuda:<index>, got {_short(self.device)}",
        )
        # the trainer seeds torch with seed * 1_000_003 + step, which torch takes only below 2**64
        _require(0 <= self.seed < 2**32, "--seed", f"must be in [0, 2**32), got {self.seed}")
        if self.threads is not None:
            # torch overflows at 2**31 and would try to start every thread asked for
            _require(1 <= self.threads <= 1024, "--threads", f"must be in [1, 1024], got {self.threads}")
        for name in ("eval_every", "save_every", "log_completions"):
            _require(getattr(self, name) >= 0, _flag(name), f"must be >= 0, got {getattr(self, name)}")
        _require(self.eval_size >= 0, "--eval-size", f"must be >= 0, got {self.eval_size}")
        _require(not (self.overwrite and self.resume), "--overwrite", "cannot be combined with --resume")
        _require(self.keep_checkpoints >= 0, "--keep-checkpoints", f"must be >= 0, got {self.keep_checkpoints}")
        _choice("--reward-fault", self.reward_fault, REWARD_FAULTS)
        _positive("--reward-timeout", self.reward_timeout, allow_zero=True)
        _require(self.max_bad_steps >= 1, "--max-bad-steps", f"must be at least 1, got {self.max_bad_steps}")
        _positive("--collective-timeout", self.collective_timeout)


EVAL_FIELDS = (
    *(item.name for item in dataclasses.fields(TaskSettings)),
    *("rewards", "max_new_tokens", "temperature", "top_p", "micro_batch_size", "precision", "device", "seed"),
    *("threads", "eval_size", "eval_decoding"),
)
"""The fields of a training config that say what an evaluation measures and how it runs: :class:`EvalConfig` has
these (with the same defaults and checks) and nothing else of training's."""


@dataclasses.dataclass
class EvalConfig(TaskSettings):
    """Evaluate a model or a run's checkpoint on the held-out prompts: pass rates, mean reward, examples. Given a run's
    checkpoint (or the run folder) it evaluates that run's task: its config.yaml supplies every setting not given."""

    rewards: tuple[str, ...] = ("shaped",)
    """reward functions, summed, for the mean reward: binary, shaped, joint, sharp, module:function or file.py:function"""
    max_new_tokens: int = 48
    """longest completion in tokens"""
    temperature: float = 1.0
    """sampled decoding: temperature (> 0)"""
    top_p: float = 1.0
    """sampled decoding: nucleus, in (0, 1]"""
    micro_batch_size: int = 8
    """prompts generated at once"""
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """bfloat16: bfloat16 autocast; auto: bfloat16 where the GPU or CPU has fast bfloat16 matrix products"""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda or cuda:<index>"""
    seed: int = 0
    """seeds the sampled decoding"""
    threads: Annotated[int | None, default_hint("one per idle core")] = None
    """CPU threads for torch"""
    eval_size: int = 100
    """held-out prompts evaluated (at most heldout_prompts)"""
    eval_decoding: tuple[Literal["greedy", "sampled"], ...] = ("greedy",)
    """decodings evaluated: greedy (argmax) and/or sampled (temperature and top_p)"""
    json: bool = False
    """print the results as one JSON object on stdout instead of the table"""
    progress: bool = True
    """show a progress bar"""

    def __post_init__(self) -> None:
        self.rewards = tuple(self.rewards)
        self.eval_decoding = tuple(self.eval_decoding)
        self.training_config()  # the same checks as training's, naming the same flags

    def training_config(self) -> GRPOConfig:
        """A training config with these settings (the rest at their defaults), for the functions both commands use."""
        return GRPOConfig(**{name: getattr(self, name) for name in EVAL_FIELDS})

    @classmethod
    def of(cls, config: GRPOConfig, **changes: Any) -> EvalConfig:
        """The evaluation of a training config's task (a recipe's, or a run's config.yaml), with ``changes``."""
        return cls(**{**{name: getattr(config, name) for name in EVAL_FIELDS}, **changes})


def load_eval_config(path: str | Path) -> EvalConfig:
    """``policygrad eval --recipe FILE``: a training recipe's task and evaluation settings (its training-only fields
    are read and checked like ``train``'s, then left out)."""
    return EvalConfig.of(load_config(path))


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | Sequence[str] = ()) -> GRPOConfig:
    """A :class:`GRPOConfig` from a YAML recipe and overrides (:func:`policygrad.configs.load_config`)."""
    return configs.load_config(GRPOConfig, path, overrides)
