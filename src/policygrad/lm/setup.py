"""Everything a ``policygrad train`` run sets up once, in torchtune's ``_setup_*`` order, and the :class:`Run` that the
loop of :mod:`policygrad.lm.trainer` reads from: model, tokenizer, reference, optimiser, prompts, rewards, estimators,
where in the run we are; restored from the newest checkpoint with ``--resume``.

The order is chosen so that a mistake costs as little as possible: the output folder is checked first (a taken
folder is refused before anything loads), the rewards and the prompt source before the model, the rewards against
the first prompt before the run folder is written, and the run folder is the last thing created, so a run that
fails to start leaves nothing behind.

Under torchrun (:mod:`policygrad.distributed`) the same setup runs on every rank, with four additions: the launch is
checked against the config before anything else (B must split evenly over the processes), the process group is
joined once the device is known, rank 0's weights are broadcast to the others, and only rank 0 tidies a resumed
run's checkpoints and writes the run folder. The :class:`Run` then shards each step's prompts (:meth:`Run.batch`),
seeds each prompt's sampling (:meth:`Run.generators`), gathers the whole batch for the batch-wide numbers
(:meth:`Run.whole_batch`), evaluates on rank 0 while the others wait, and saves every rank's generators.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from policygrad import checkpointing, runs
from policygrad.allocator import use_allocator
from policygrad.configs import config_to_dict
from policygrad.distributed import Launch, World, init_world, launch_from_env
from policygrad.errors import UsageError, first_line
from policygrad.lm import fsdp, vllm_engine
from policygrad.lm.config import GRPOConfig
from policygrad.lm.curriculum import ToleranceCurriculum
from policygrad.lm.device import fused_adamw_supported, resolve_device, use_threads
from policygrad.lm.evaluate import EvalSettings, evaluate, group_fields
from policygrad.lm.lora import MERGED, AdapterOff, attach, check_lora, enable_gradient_checkpointing, save_merged
from policygrad.lm.rewards import RewardError
from policygrad.lm.rollout import Rollout, join_groups, pad_token_id, sample
from policygrad.lm.state import TRAINER_STATE, Snapshot, TrainerState, load_trainer_state, save_checkpoint
from policygrad.lm.task import Task
from policygrad.rng import rng_state, seed_everything, set_rng_state, step_seed
from policygrad.variants import ADVANTAGES, ENTROPY_WEIGHTS, KL_WEIGHTS, TASKS, build

__all__ = ["RESUME_MAY_CHANGE", "Run", "prompt_order", "setup"]

RESUME_MAY_CHANGE = frozenset(
    {
        *("resume", "overwrite", "allow_config_change", "output_dir", "max_steps", "epochs", "progress", "threads"),
        *("device", "eval_every", "eval_size", "eval_decoding", "save_every", "save_optimizer", "keep_checkpoints"),
        *("log_completions", "reward_fault", "reward_timeout", "max_bad_steps", "collective_timeout"),
        *("gradient_checkpointing", "lora_merged", "allocator"),
    }
)
"""Fields a resumed run may change without ``--allow-config-change``: how long to train, where and how to log, save
and evaluate, and what to do about faults; none of them changes the update a step makes."""


def comparable(config: GRPOConfig) -> dict[str, Any]:
    """The config's fields that a resume must keep, as plain values (saved in every checkpoint)."""
    return {k: v for k, v in config_to_dict(config).items() if k not in RESUME_MAY_CHANGE}


def prompt_order(num_prompts: int, batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """The prompt indices of each step of one epoch: a seeded shuffle cut into batches, the incomplete last one
    dropped. A function of (seed, epoch) alone, so a resumed run sees the same prompts it would have seen."""
    generator = torch.Generator().manual_seed(seed * 1009 + epoch)
    order = torch.randperm(num_prompts, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, num_prompts - batch_size + 1, batch_size)]


@dataclass
class Run:
    """What the loop reads: built by :func:`setup`, advanced by the loop, saved by :meth:`checkpoint`."""

    config: GRPOConfig
    output_dir: Path
    model: Any
    tokenizer: Any
    reference: Any  # frozen copy of the initial policy, or None without a KL term
    optimizer: torch.optim.Optimizer
    prompts: Any  # policygrad.lm.data.Prompts
    reward_set: Any  # policygrad.lm.rewards.RewardSet
    autocast_dtype: torch.dtype | None
    steps_per_epoch: int
    total_steps: int
    estimator: Any = None  # the advantage estimator (policygrad.variants.ADVANTAGES), with state()/restore()
    entropy_weight: Any = None  # rewards (N,) -> w_H (policygrad.variants.ENTROPY_WEIGHTS)
    kl_weight: Any = None  # rewards (N,) -> beta (policygrad.variants.KL_WEIGHTS)
    curriculum: ToleranceCurriculum | None = None  # the training rewards' length tolerance, when it is scheduled
    start_step: int = 0
    resumed: bool = False
    last_saved: int = -1  # the step of the newest checkpoint on disk, so a stop does not write the same one twice
    eval_settings: EvalSettings = field(default_factory=EvalSettings)
    world: World = field(default_factory=World)  # this process's place in a torchrun launch (or the plain one)
    adapter: Any = None  # the PeftModel around ``model`` with LoRA (what a checkpoint saves), else None
    engine: Any = None  # the colocated vLLM engine with ``decoder: vllm`` (policygrad.lm.vllm_engine), else None

    @property
    def task(self) -> Task:
        """The task (:data:`policygrad.variants.TASKS`) whose rates the loop logs."""
        return TASKS[self.config.task]

    @property
    def sampling(self) -> dict[str, Any]:
        """The keyword arguments of :func:`policygrad.lm.rollout.sample` for a training step."""
        config = self.config
        return {
            "group_size": config.group_size,
            "max_new_tokens": config.max_new_tokens,
            "temperature": config.temperature,
            "top_p": config.top_p,
            "decoder": config.decoder,
            "micro_batch_size": config.micro_batch_size,
            "autocast_dtype": self.autocast_dtype,
            # the clipped surrogate and the importance correction need the sampling log-probs
            "score_tokens": config.updates_per_batch > 1 or config.tis_cap > 0,
            "sampler_logprobs": config.tis_cap > 0,
        }

    @property
    def resume_hint(self) -> str:
        """The command that continues this run (under torchrun: the same launch)."""
        return runs.resume_command("train", self.output_dir, self.world.program())

    def batch(self, step: int) -> list[dict[str, Any]]:
        """This rank's prompt records of a step: all B in one process, the rank's B / W consecutive ones under
        torchrun (whole groups per rank)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = prompt_order(len(self.prompts.train), self.config.prompts_per_step, epoch, self.config.seed)
        return [self.prompts.train[i] for i in order[index][self.world.shard(self.config.prompts_per_step)]]

    def generators_at(self, step: int, prompts: Sequence[int]) -> list[torch.Generator] | None:
        """Under torchrun, one generator per prompt: the step's prompt numbered b (counted over every rank's draws:
        0..B-1 the batch, B on the fresh prompts of dynamic sampling) draws from ``step_seed(seed, step, b)``, so
        its completions do not depend on how the batch is split. None for a plain run: the global generator, seeded
        per step by the loop, as before data parallelism."""
        if not self.world.launched:
            return None
        return [torch.Generator().manual_seed(step_seed(self.config.seed, step, b)) for b in prompts]

    def sample(
        self, prompts: Sequence[str], step: int, numbers: Sequence[int], temperature: float | None = None
    ) -> Rollout:
        """G completions of each of ``prompts`` with the current policy, the prompts numbered ``numbers`` among the
        step's draws (over every rank: 0..B-1 the batch, B on dynamic sampling's extra draws), at ``temperature``
        (None: the training temperature). With vLLM the policy's weights are pushed into the engine first, once a
        step, and prompt b draws from seed step_seed(seed, step, b); else :func:`policygrad.lm.rollout.sample` draws
        from :meth:`generators_at`."""
        sampling = self.sampling
        if temperature is not None:  # drawn hotter, scored (logprobs) as the training policy
            sampling = sampling | {"temperature": temperature, "score_temperature": self.config.temperature}
        if self.engine is None:
            return sample(self.model, self.tokenizer, prompts, **sampling, generators=self.generators_at(step, numbers))
        if self.engine.pushed_step != step:
            self.engine.push(vllm_engine.policy_weights(self.model, self.adapter))
            self.engine.pushed_step = step
        seeds = [step_seed(self.config.seed, step, b) % 2**63 for b in numbers]  # a signed 64-bit int for vLLM
        return self.engine.sample(self.model, self.tokenizer, prompts, seeds, **sampling)

    def whole_batch(self, rollout: Rollout, scored: Any) -> tuple[Rollout, Any]:
        """The step's whole batch, every rank's groups in prompt order, as one process would have sampled it (on
        the CPU, re-padded): what the batch-wide numbers and the logs are computed from. In one process, the
        arguments themselves."""
        if self.world.size == 1:
            return rollout, scored
        from policygrad.lm.dynamic import join_scored

        parts = self.world.gather((rollout.to("cpu"), scored))  # in rank order, so in prompt order
        picks = [
            (part, part_scored, g)
            for part, part_scored in parts
            for g in range(len(part.completions) // part.group_size)
        ]
        whole = join_groups([(part, g) for part, _, g in picks], pad_token_id(self.model, self.tokenizer))
        return whole, join_scored([(part_scored, g) for _, part_scored, g in picks], self.config.group_size)

    def evaluate(self) -> dict[str, dict[str, Any]]:
        """:func:`policygrad.lm.evaluate.evaluate` on the first ``eval_size`` held-out prompts (``{}`` if none).

        Under torchrun the prompts' generation batches are shared among the ranks and every rank gets the whole
        result: the held-out numbers are the ones a one-process run reports for the same weights (the same batches,
        so the same arithmetic), in about 1 / W of its time."""
        records = self.prompts.heldout[: self.config.eval_size]
        if not records or not self.config.eval_decoding:
            return {}
        with fsdp.gathered(self.model):
            return evaluate(self.model, self.tokenizer, records, self.reward_set, self.eval_settings, world=self.world)

    def snapshot(self, step: int) -> Snapshot:
        """The state after ``step`` steps except weights and optimiser, taken now (see :class:`Snapshot`)."""
        curriculum = self.curriculum.state() if self.curriculum is not None else None
        return Snapshot(step, self.estimator.state(), rng_state(), curriculum)

    def save(self, folder: Path, snapshot: Snapshot) -> Path:
        """Weights, optimiser and ``snapshot`` as the checkpoint in ``folder``. Under torchrun every rank calls it:
        rank 0 writes, with every rank's generators, while the others wait."""
        world = self.world
        rank_rng = world.gather(snapshot.rng) if world.launched else None
        optimizer = self.optimizer if self.config.save_optimizer else None
        weights, optimizer_state = None, optimizer.state_dict() if optimizer is not None else None
        if fsdp.is_sharded(self.model):  # gathered from every rank's shards, onto rank 0
            weights, optimizer_state = fsdp.full_state(self.model, optimizer)
            if self.adapter is not None:  # PEFT picks its adapters out of its wrapper's names
                weights = {f"base_model.model.{name}": tensor for name, tensor in weights.items()}
        if world.is_main:
            state = TrainerState(
                snapshot.step,
                snapshot.advantage,
                snapshot.rng,
                snapshot.curriculum,
                config=comparable(self.config),
                optimizer=optimizer_state,
                world_size=world.size if world.launched else None,
                rank_rng=rank_rng,
            )
            merged = self.config.lora_merged and self.adapter is not None
            also = (lambda tmp: save_merged(self.adapter, self.tokenizer, tmp / MERGED)) if merged else None
            save_checkpoint(folder, self.adapter or self.model, self.tokenizer, state, also, weights)
        world.barrier()
        self.last_saved = snapshot.step
        return folder

    def checkpoint(self, snapshot: Snapshot) -> Path:
        """``checkpoints/step-N`` (unless the newest checkpoint already is step N), then prune old ones."""
        folder = runs.checkpoint_dir(self.output_dir, snapshot.step)
        saved = self.last_saved == snapshot.step
        damaged = saved and self.world.is_main and checkpointing.verify(folder) is not None  # rank 0 reads it
        if not self.world.agree(not saved or damaged):  # every rank saves, or none
            return folder
        self.save(folder, snapshot)
        if self.world.is_main:
            checkpointing.prune(folder.parent, self.config.keep_checkpoints)
        return folder


def setup(config: GRPOConfig) -> Run:
    """Build the run ``config`` describes, or restore it from its newest checkpoint with ``resume``."""
    launch = _check_launch(config, launch_from_env())  # torchrun's processes against the config, before anything
    runs.check_output_dir(config.output_dir, config.resume, config.overwrite)  # before anything heavy
    if config.decoder == "vllm":
        vllm_engine.check(config)  # the package, a GPU, the importance correction: before any model loads
    device, autocast_dtype = resolve_device(config)
    device = _rank_device(device, launch)
    world = init_world(device, config.collective_timeout, launch)
    _setup_threads(config, launch)
    if device.type == "cpu":
        use_allocator(config.allocator)  # freed memory stays for the next step (policygrad.allocator)
    seed_everything(world.seed(config.seed))  # a resumed run then restores the generators' saved states
    reward_set = _setup_rewards(config)
    _check_prompt_source(config)
    folder, state = _setup_resume(config, world) if config.resume else (None, None)
    if config.lora_rank:
        check_lora(config, _model_source(config.model))  # before any weight loads
    model, tokenizer, adapter = _setup_policy(config, folder, device, world)
    world.broadcast_parameters(model.parameters())  # every rank starts from rank 0's weights (and adapters)
    prompts = _setup_prompts(config, tokenizer)
    if config.eval_size > len(prompts.heldout) and config.eval_decoding and world.is_main:
        print(
            f"policygrad train: evaluating on the {len(prompts.heldout)} held-out prompts (--eval-size "
            f"{config.eval_size} asks for more than {config.prompts} holds out)",
            file=sys.stderr,
        )
    steps_per_epoch, total_steps = _setup_steps(config, prompts, state, folder)
    _check_rewards_fit_prompts(reward_set, prompts.train[0], config)
    reference = _setup_reference(config, model, device, from_checkpoint=folder is not None, adapter=adapter)
    if config.fsdp:
        fsdp.shard(model, world)  # after the reference copies the whole model, before AdamW sees the shards
        if reference is not None and adapter is None:  # the frozen copy sharded too: 1 / W of it on each rank
            fsdp.shard(reference, world, keep_root=False)
    run = Run(
        config,
        config.output_dir,
        model,
        tokenizer,
        reference,
        _setup_optimizer(config, model, device),
        prompts,
        reward_set,
        autocast_dtype,
        steps_per_epoch,
        total_steps,
        estimator=build(ADVANTAGES, config.advantage, config),
        entropy_weight=build(ENTROPY_WEIGHTS, config.entropy_weight, config),
        kl_weight=build(KL_WEIGHTS, config.kl_weight, config),
        curriculum=_setup_curriculum(config, prompts),
        resumed=folder is not None,
        eval_settings=EvalSettings.of(config, autocast_dtype),
        world=world,
        adapter=adapter,
    )
    if state is not None:
        _restore(run, folder, state)
    if config.decoder == "vllm":  # after the restore: it starts from the base weights, the first push brings it up
        run.engine = vllm_engine.VLLMEngine(_model_source(config.model), config, device, world.launched)
    if world.is_main:
        runs.prepare_output_dir(config.output_dir, config.resume, config.overwrite, config_to_dict(config))
        _say_checkpoint_size(config, model)
    world.barrier()  # the run folder exists for every rank
    return run


SAY_SIZE_ABOVE = 256e6
"""Bytes of weights above which a run says, once, what each of its checkpoints will take on disk."""


def _say_checkpoint_size(config: GRPOConfig, model: Any) -> None:
    """One line on what a checkpoint costs when that is a lot: the weights, and with ``save_optimizer`` AdamW's two
    moments (twice the weights again), times the checkpoints kept."""
    # what save_pretrained writes: every weight, or with LoRA the adapters alone (the trainable ones)
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad or not config.lora_rank)
    if weights < SAY_SIZE_ABOVE:
        return
    each = weights * (3 if config.save_optimizer else 1)
    kept = f"up to {config.keep_checkpoints} kept besides final/" if config.keep_checkpoints else "all kept"
    if config.save_optimizer:
        how = f"weights and AdamW's state, for an exact resume; --no-save-optimizer: {weights / 1e9:.1f} GB"
    else:
        how = "weights only (save_optimizer: false, so a resume restarts AdamW's moments)"
    print(f"policygrad train: each checkpoint takes about {each / 1e9:.1f} GB: {how}; {kept}", file=sys.stderr)


def _check_launch(config: GRPOConfig, launch: Launch | None) -> Launch | None:
    """Refuse, in one line, a launch this config cannot run: ``fsdp`` without torchrun, and B prompts that do not
    split into whole groups per process."""
    if config.fsdp and launch is None:
        raise UsageError(
            "--fsdp", "shards the model over the processes of a torchrun launch: start the run with torchrun"
        )
    if launch is None or launch.size == 1:
        return launch
    if config.prompts_per_step % launch.size:
        raise UsageError(
            "--prompts-per-step",
            f"{config.prompts_per_step} prompts per step do not split evenly over the {launch.size} processes of "
            f"this torchrun launch (each takes whole prompt groups); use a multiple of {launch.size}",
        )
    return launch


def _rank_device(device: torch.device, launch: Launch | None) -> torch.device:
    """Under torchrun, ``cuda`` without an index means this rank's GPU, ``cuda:LOCAL_RANK``."""
    if launch is not None and device.type == "cuda" and device.index is None:
        return torch.device("cuda", launch.local_rank)
    return device


def _setup_threads(config: GRPOConfig, launch: Launch | None) -> None:
    """``--threads``, or by default the idle cores shared out among the processes of this machine."""
    if launch is None or config.threads is not None:
        use_threads(config)
        return
    from policygrad.threads import default_threads, set_threads

    set_threads(max(1, default_threads() // max(launch.local_size, 1)))


def _setup_rewards(config: GRPOConfig) -> Any:
    from policygrad.lm.rewards import load_rewards

    return load_rewards(config.rewards)  # before the model: a typo here should not cost a model load


def _check_prompt_source(config: GRPOConfig) -> None:
    from policygrad.lm.data import check_prompt_source

    check_prompt_source(config.prompts)  # likewise a missing or malformed prompts file


def _model_source(model: str) -> str:
    from policygrad.lm.models import _resolve_source

    return _resolve_source(model)


def _setup_policy(config: GRPOConfig, folder: Path | None, device: torch.device, world: World) -> tuple[Any, Any, Any]:
    """(model, tokenizer, adapter): the model the loop trains, from ``folder`` when resuming. With LoRA the base
    weights always come from ``config.model`` and the adapters from the checkpoint; ``adapter`` is the PeftModel
    around ``model`` (None without LoRA)."""
    if config.lora_rank <= 0:
        model, tokenizer = _setup_model(str(folder or config.model), device)
        adapter = None
    else:
        model, tokenizer = _setup_model(str(config.model), device)
        adapter = attach(model, config, folder)
    if config.gradient_checkpointing and enable_gradient_checkpointing(model) == 0 and world.is_main:
        print(
            "policygrad train: --gradient-checkpointing: this model has no layers transformers can checkpoint; "
            "training without",
            file=sys.stderr,
        )
    return model, tokenizer, adapter


def _setup_model(source: str, device: torch.device) -> tuple[Any, Any]:
    from policygrad.lm.models import load_model

    model, tokenizer = load_model(source, dtype="float32", device=device)
    # weights of their own: loaded ones can be views into the mapped safetensors file at any offset (40 bytes past
    # a 64-byte boundary for the tiny test model), and CPU kernels round differently at another alignment, so a
    # resumed run (a checkpoint's weights, a reference loaded again) and the run it continues (a deepcopy for the
    # reference) would part in the last bits. A copy is allocated aligned, whatever the file.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()
    # dropout off throughout: the ratio pi/pi_old and the KL must compare the same deterministic function
    model.eval()
    return model, tokenizer


def _setup_prompts(config: GRPOConfig, tokenizer: Any) -> Any:
    from policygrad.lm.data import prompts_for

    return prompts_for(config, tokenizer)


def _setup_steps(
    config: GRPOConfig, prompts: Any, state: TrainerState | None, folder: Path | None = None
) -> tuple[int, int]:
    steps_per_epoch = len(prompts.train) // config.prompts_per_step
    if steps_per_epoch == 0:
        raise UsageError(
            "--prompts-per-step", f"{config.prompts_per_step} is more than the {len(prompts.train)} training prompts"
        )
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    if state is not None and state.step > total_steps:
        raise UsageError(
            "--max-steps", f"the run to resume is at step {state.step}, past the {total_steps} steps asked for"
        )
    if state is not None and state.step == total_steps and folder is not None and folder.name == "final":
        raise runs.RunComplete(
            f"the run in {config.output_dir} is complete ({total_steps} steps); nothing to do (to train it further, "
            f"resume with a larger --max-steps)"
        )
    if state is not None and (extended := runs.budget_change(config.output_dir, _budget(config))):
        print(f"policygrad train: resuming with a new budget: {extended}", file=sys.stderr)
    return steps_per_epoch, total_steps


def _budget(config: GRPOConfig) -> dict[str, Any]:
    """The fields that say how long the run trains."""
    return {"max_steps": config.max_steps, "epochs": config.epochs}


def _setup_curriculum(config: GRPOConfig, prompts: Any) -> ToleranceCurriculum | None:
    if not config.curriculum_tolerance:
        return None
    if "target_length" not in prompts.train[0]:
        raise UsageError(
            "--curriculum-tolerance", "schedules the length_digits tolerance, but the prompts have no target_length"
        )
    return ToleranceCurriculum(
        config.curriculum_tolerance, config.length_tolerance, config.curriculum_advance_at, config.curriculum_window
    )


def _setup_reference(
    config: GRPOConfig, model: Any, device: torch.device, from_checkpoint: bool, adapter: Any = None
) -> Any:
    """A frozen copy of the run's INITIAL model for the KL term (also when resuming from a later checkpoint); with
    LoRA, the policy itself with its adapters switched off."""
    if config.kl_coef <= 0:
        return None
    if adapter is not None:
        return AdapterOff(adapter, model)
    if from_checkpoint:
        reference = _setup_model(config.model, device)[0]
    else:
        reference = copy.deepcopy(model)
    return reference.eval().requires_grad_(False)


def _setup_optimizer(config: GRPOConfig, model: Any, device: torch.device) -> torch.optim.Optimizer:
    # fused: one kernel over all parameters instead of a dozen passes over memory (0.48 s -> 0.11 s per step for
    # SmolLM2-135M on this CPU, benchmarks/NOTES.md); same update rule
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.lr,
        weight_decay=config.weight_decay,
        fused=fused_adamw_supported(device),
    )


def _setup_resume(config: GRPOConfig, world: World) -> tuple[Path | None, TrainerState | None]:
    """The newest complete checkpoint of the run being resumed and its trainer state, after tidying what a killed
    save left (rank 0 tidies, then every rank reads); refuses a config that differs from the checkpoint's unless
    ``allow_config_change``, and a launch other than the one that saved it (another number of processes)."""
    out = config.output_dir
    if world.is_main:
        checkpointing.recover(out)
        checkpointing.recover(out / runs.CHECKPOINTS)
    world.barrier()
    folder = runs.latest_checkpoint(out)
    if folder is None:
        if any(candidate.is_dir() for candidate in runs.checkpoint_candidates(out)):  # each one reported above
            raise UsageError(
                "--resume",
                f"{out} holds no intact checkpoint (every one is damaged, see above); pass "
                "--overwrite instead of --resume to start the run again",
            )
        print(f"policygrad train: {out} has no complete checkpoint yet; starting from step 0", file=sys.stderr)
        return None, None
    state = load_trainer_state(folder)
    launched = world.size if world.launched else None
    if state.world_size != launched:
        raise UsageError(
            "--resume",
            f"{folder.relative_to(out)} was saved by {_launch_name(state.world_size)} and this is "
            f"{_launch_name(launched)}; resume with the launch that started the run (the same number of processes: "
            "the shards, the sampling seeds and every rank's generators are part of its state)",
        )
    if state.config is not None and not config.allow_config_change:
        changes = runs.config_changes(state.config, comparable(config), RESUME_MAY_CHANGE)
        if changes:
            raise UsageError(
                "--resume",
                f"the config differs from the one {folder.relative_to(out)} was trained with: {'; '.join(changes)}"
                f" (resume with --recipe {out / runs.CONFIG_FILE}, or pass --allow-config-change to go on anyway)",
            )
    return folder, state


def _launch_name(world_size: int | None) -> str:
    if world_size is None:
        return "a single process (no torchrun)"
    return f"torchrun with {world_size} process{'es' if world_size > 1 else ''}"


def _restore(run: Run, folder: Path, state: TrainerState) -> None:
    """Put a checkpoint's trainer state into a fresh run: AdamW's moments, the generators, the estimators, the step.
    A state that loads but does not fit (another model's optimiser, a damaged generator state) is a one-line
    ``--resume`` error naming the file."""
    try:
        if state.optimizer is not None and fsdp.is_sharded(run.model):  # saved whole: each rank takes its shards
            fsdp.load_optimizer_state(run.model, run.optimizer, state.optimizer)
        elif state.optimizer is not None:  # else saved with save_optimizer=false: AdamW restarts its moments
            run.optimizer.load_state_dict(state.optimizer)
        if state.rank_rng:
            set_rng_state(state.rank_rng[run.world.rank])  # this rank's own generators
        elif state.rng:
            set_rng_state(state.rng)
        run.estimator.restore(state.advantage)
        if run.curriculum is not None and state.curriculum is not None:
            run.curriculum.restore(state.curriculum)
    except Exception as exc:  # ValueError, KeyError, TypeError, RuntimeError: all "this file does not fit"
        raise UsageError("--resume", f"{folder / TRAINER_STATE} does not fit this run: {first_line(exc)}") from None
    if state.optimizer is None and run.world.is_main:
        print(
            f"policygrad train: {folder} has no optimiser state (save_optimizer: false); AdamW's "
            "moments restart from zero, so this resume is not exact",
            file=sys.stderr,
        )
    run.start_step = run.last_saved = state.step


def _check_rewards_fit_prompts(reward_set: Any, record: dict[str, Any], config: GRPOConfig) -> None:
    """Score the first training prompt with an empty completion (one a model can always produce), so a reward that
    needs fields the prompts file lacks (the built-ins need ``target_length`` and ``target_digit_sum``) fails now,
    in one line naming --rewards and --prompts, rather than at step 1 after the run folder exists. Under
    ``reward_fault: skip`` such faults are tolerated by design, so the trial only warns. The generators are put back
    afterwards: the trial leaves the run exactly as it would have been without it."""
    have = ", ".join(sorted(k for k in record if k != "prompt")) or "none"
    trial = f"tried on the first prompt of --prompts {config.prompts} (fields: {have}) with an empty completion"
    saved = rng_state()
    try:
        scores = reward_set.score(
            [record["prompt"]],
            [""],
            group_fields([record], 1),
            on_fault=config.reward_fault,
            timeout=config.reward_timeout or None,
        )
    except RewardError as err:
        raise UsageError("--rewards", f"these rewards do not fit the prompts: {trial}, {err}") from None
    finally:
        set_rng_state(saved)
    if scores.faults:
        print(
            f"policygrad train: the rewards may not fit the prompts ({trial}): {scores.faults[0].line()}; with "
            "--reward-fault skip the run goes on, and such samples train with advantage 0",
            file=sys.stderr,
            flush=True,
        )
