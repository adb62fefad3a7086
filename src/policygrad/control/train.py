"""The trainer of ``policygrad control``, in Spinning Up's order: sample, estimate advantages, update, log.

``run(config)`` is the CLI entry point (exit code); ``train(config)`` does the training and returns its records, so
benchmarks and tests can call it without the command line.

A *step* of this trainer is one batch of ``num_envs * num_steps`` environment steps and its update: ``step`` in
metrics.jsonl, ``checkpoints/step-N``, ``--save-every`` and ``--max-bad-steps`` count them, while ``--total-steps``
and ``env_steps`` count environment steps. The run folder and its overwrite/resume policy, ``config.yaml``,
``metrics.jsonl`` with TensorBoard, the checkpoints and the guard against non-finite steps and stop signals are those
of ``policygrad train`` (:mod:`policygrad.runs`, :mod:`policygrad.runlog`, :mod:`policygrad.guard`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policygrad import checkpointing, runs
from policygrad.advantages import gae
from policygrad.configs import config_to_dict
from policygrad.control.algorithms import UPDATES, Batch, Learner
from policygrad.control.checkpoint import (
    env_state,
    load_policy,
    load_training,
    save_policy,
    save_training,
    set_env_state,
)
from policygrad.control.config import OLD_RUN, RESUME_MAY_CHANGE, ControlConfig, older_run
from policygrad.control.envs import EnvSpec, inspect_env, make_vector_env
from policygrad.control.policies import Policy, ValueNet
from policygrad.control.rollout import Collector, Rollout, evaluate_policy
from policygrad.errors import UsageError, first_line
from policygrad.guard import StepGuard
from policygrad.runlog import RunLog
from policygrad.stopping import EXIT_DIVERGED, Stopped
from policygrad.variants import ENTROPY_WEIGHTS, build

__all__ = ["TrainResult", "train", "run", "RECENT_EPISODES", "NETWORK_DTYPE"]

COMMAND = "policygrad control"

RECENT_EPISODES = 10
"""``return_recent`` is the mean undiscounted return of this many most recently finished training episodes."""

NETWORK_DTYPE = torch.float32
"""The dtype of the trainer's networks: they are tiny, float32 is fast, and its rounding is far below the noise of
the returns."""


@dataclass
class TrainResult:
    records: list[dict]  # one per step, as written to metrics.jsonl
    policy: Policy
    spec: EnvSpec
    eval_returns: list[float]
    output_dir: Path | None


def _flatten(rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor) -> Batch:
    """(N, T, ...) -> (T * N, ...). The rows are time-major (t0 env0, t0 env1, ..., t1 env0, ...), the order the batch
    has always had, so the minibatches drawn from it and every sum over it, hence every result, are unchanged."""

    def rows(values: torch.Tensor) -> torch.Tensor:
        return values.transpose(0, 1).flatten(0, 1)

    return Batch(rows(rollout.obs), rows(rollout.actions), rows(rollout.logprobs), rows(advantages), rows(returns))


class _Unsaved(StepGuard[None]):
    """The guard of a run without an output folder (benchmarks, tests): the same streak of non-finite steps stops it,
    with nothing to save; no periodic checkpoint, and no signal handlers (Ctrl-C stops at once)."""

    def __init__(self, total_steps: int, max_bad_steps: int):
        super().__init__(COMMAND, total_steps, max_bad_steps, 0, lambda step: None, self._nothing, "")

    def __enter__(self) -> _Unsaved:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def _nothing(self, state: None) -> Path:
        raise Stopped(
            f"stopped: {self.bad_steps} steps in a row had a non-finite loss or gradient norm (no output folder, "
            "nothing saved)",
            EXIT_DIVERGED,
        )


def check_output_dir(cfg: ControlConfig, output_dir: Path) -> None:
    """Refuse an output folder that cannot take this run, writing nothing (:func:`policygrad.runs.check_output_dir`),
    and a run written by an older policygrad control or one that has finished when asked to resume it."""
    out = Path(output_dir)
    if older_run(out):
        if cfg.resume:
            raise UsageError("--resume", f"{out} {OLD_RUN}; start it again with --overwrite instead of --resume")
        if not cfg.overwrite:
            raise UsageError("--output-dir", f"{out} {OLD_RUN}; pass --overwrite to start it again, or choose another")
        return  # deleted by --overwrite once the run's inputs have loaded
    runs.check_output_dir(out, cfg.resume, cfg.overwrite)
    if not cfg.resume:
        return
    extended = runs.budget_change(out, {"total_steps": cfg.total_steps})
    if (out / "policy.pt").is_file() and not extended:
        raise runs.RunComplete(
            f"the run in {out} is complete (policy.pt is saved); nothing to do (to train it further, resume with a "
            "larger --total-steps)"
        )
    if extended:
        print(f"{COMMAND}: resuming with a new budget: {extended}", file=sys.stderr)


def train(
    cfg: ControlConfig, output_dir: Path | None = None, on_step: Callable[[dict], None] | None = None
) -> TrainResult:
    """Train ``cfg.algo`` on ``cfg.env`` for ``cfg.total_steps`` environment steps.

    With an ``output_dir`` (the CLI passes ``cfg.output_dir``) the run folder gets ``config.yaml`` (every setting,
    defaults resolved), ``metrics.jsonl`` and TensorBoard events (one record per step), ``checkpoints/step-N`` every
    ``cfg.save_every`` steps, ``policy.pt`` and, with ``cfg.plot``, ``curves.png``; SIGINT and SIGTERM finish the
    step, save and raise :class:`policygrad.stopping.Stopped`; and ``cfg.resume`` continues from the newest intact
    checkpoint, bit for bit as if never stopped when the environment's state can be saved (see
    :func:`policygrad.control.checkpoint.env_state`). Without one nothing is written. ``on_step`` sees every record as
    it is made (progress bars, benchmarks).

    An optimiser update with a non-finite loss or gradient norm is skipped (``skipped_updates`` in the record). After
    ``cfg.max_bad_steps`` steps in a row that skipped any, the run stops with :data:`EXIT_DIVERGED`, saving the state
    from before the first of them: everything a checkpoint holds is copied at the start of each step (the networks
    are small), because the environments and generators move on even when the weights do not.
    """
    run = _setup(cfg, None if output_dir is None else Path(output_dir))
    learner, update = run.learner, UPDATES[cfg.algo]
    try:
        with run.guard() as guard, run.log() as log:
            for k in range(run.first, run.total):
                guard.remember(k)  # the state a stop inside this step, or a streak from it, saves
                run.anneal(k)
                # 1. sample a batch with the current policy
                rollout = run.collector.collect(learner.policy, learner.value_net, cfg.num_steps, run.generator)
                # 2. estimate advantages: (N, T) each, last_value (N,)
                advantages, returns = gae(
                    rollout.rewards, rollout.values, rollout.dones, rollout.last_value, cfg.gamma, cfg.gae_lambda
                )
                # 3. update the policy and the baseline, the entropy bonus weighted for this batch's returns
                entropy_weight = run.entropy_weight(torch.tensor(rollout.episode_returns, dtype=torch.float64))
                metrics = update(learner, _flatten(rollout, advantages, returns), cfg, run.generator, entropy_weight)
                metrics["entropy_weight"] = entropy_weight
                # 4. log
                record = run.record(k + 1, rollout, metrics)
                if log is not None:
                    log.write(k + 1, {key: value for key, value in record.items() if key != "step"})
                if on_step is not None:
                    on_step(record)
                # 5. a non-finite loss or gradient skipped those updates; several such steps in a row stop the run.
                # Then the periodic checkpoint, and a stop signal
                skipped = metrics["skipped_updates"]
                guard.after(k + 1, bool(skipped), f" ({skipped} optimiser updates skipped)" if skipped else "")
        return run.finish()
    finally:
        run.envs.close()


@dataclass
class _Run:
    """What the loop of :func:`train` reads: built by :func:`_setup`, snapshotted and saved between steps."""

    cfg: ControlConfig
    out: Path | None
    spec: EnvSpec
    learner: Learner
    generator: torch.Generator  # action sampling and minibatch order
    envs: Any
    collector: Collector
    total: int  # steps (batches) in the run
    entropy_weight: Callable[[torch.Tensor], float]  # episode returns (E,) -> w_H (policygrad.variants.ENTROPY_WEIGHTS)
    first: int = 0  # steps done before this invocation (a resume)
    start: float = 0.0  # perf_counter() at step 0, carried over a resume
    trained_with: str = ""  # the settings as JSON, kept in every checkpoint for a resume to compare with
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_EPISODES))
    records: list[dict] = field(default_factory=list)
    saved: int = -1  # the step of the newest checkpoint written, so a stop does not write the same one twice

    def anneal(self, k: int) -> None:
        """Both learning rates decayed linearly to 0 over the run, with ``anneal_lr``."""
        if self.cfg.anneal_lr:
            for opt, lr in ((self.learner.policy_opt, self.cfg.lr), (self.learner.value_opt, self.cfg.value_lr)):
                opt.param_groups[0]["lr"] = lr * (1.0 - k / self.total)

    def record(self, step: int, rollout: Rollout, metrics: dict[str, float]) -> dict:
        """The step's record (also kept in :attr:`records`)."""
        self.recent.extend(rollout.episode_returns)
        record = {
            "step": step,
            "env_steps": step * self.cfg.batch_size,
            "time": time.perf_counter() - self.start,
            "return_recent": statistics.fmean(self.recent) if self.recent else None,
            "episode_returns": rollout.episode_returns,
            # NaN (e.g. explained variance of constant returns) is not JSON; null is
            **{name: None if value != value else value for name, value in metrics.items()},
        }
        self.records.append(record)
        return record

    def snapshot(self, k: int) -> tuple[int, dict, dict, dict | None]:
        """A copy of everything the checkpoint after ``k`` steps holds, taken now and saved now or later."""
        learner, collector = self.learner, self.collector
        state = {
            "policy_opt": copy.deepcopy(learner.policy_opt.state_dict()),
            "value_opt": copy.deepcopy(learner.value_opt.state_dict()),
            "generator": self.generator.get_state(),
            "recent": list(self.recent),
            "elapsed": time.perf_counter() - self.start,
            "obs": torch.tensor(np.asarray(collector.obs)),
            "running_return": torch.tensor(collector.running_return),
            "running_length": torch.tensor(collector.running_length),
            "config": self.trained_with,
        }
        networks = {
            **{f"policy.{n}": t.detach().clone() for n, t in learner.policy.state_dict().items()},
            **{f"value.{n}": t.detach().clone() for n, t in learner.value_net.state_dict().items()},
        }
        return k, networks, state, env_state(self.envs)

    def save(self, snapshot: tuple[int, dict, dict, dict | None]) -> Path:
        """``checkpoints/step-N`` from a snapshot (unless the newest checkpoint already is step N), then prune."""
        k = snapshot[0]
        folder = runs.checkpoint_dir(self.out, k)
        if self.saved != k or checkpointing.verify(folder) is not None:
            save_training(folder, *snapshot)
            checkpointing.prune(folder.parent, self.cfg.keep_checkpoints)
            self.saved = k
        return folder

    def guard(self) -> StepGuard:
        if self.out is None:
            return _Unsaved(self.total, self.cfg.max_bad_steps)
        hint, advice = runs.resume_command("control", self.out), "check the environment's rewards"
        cfg = self.cfg
        return StepGuard(COMMAND, self.total, cfg.max_bad_steps, cfg.save_every, self.snapshot, self.save, hint, advice)

    def log(self) -> contextlib.AbstractContextManager[RunLog | None]:
        """The run's RunLog; a resumed run's keeps the records up to its checkpoint and drops what came after."""
        if self.out is None:
            return contextlib.nullcontext(None)
        return RunLog(self.out, append_after=self.first if self.cfg.resume else None, command=COMMAND)

    def finish(self) -> TrainResult:
        """Evaluate the deterministic policy, save ``policy.pt`` (and ``curves.png``)."""
        cfg, policy, spec = self.cfg, self.learner.policy, self.spec
        eval_returns = (
            evaluate_policy(policy, spec, cfg.eval_episodes, seed=cfg.seed + 10_000) if cfg.eval_episodes else []
        )
        if self.out is not None:
            save_policy(
                self.out / "policy.pt", policy, spec.env_id, spec.obs_size, spec.action_size, cfg.hidden, cfg.algo
            )
            if cfg.plot:
                from policygrad.control.plots import plot_curves

                plot_curves(self.records, self.out / "curves.png", f"{cfg.env}, {cfg.algo}, seed {cfg.seed}")
        return TrainResult(self.records, policy, spec, eval_returns, self.out)


def _setup(cfg: ControlConfig, out: Path | None) -> _Run:
    """Networks, optimisers, environments and collector, restored from the newest checkpoint with ``resume``; the run
    folder is checked first and written last (nothing is written until the inputs have loaded)."""
    if out is not None:
        check_output_dir(cfg, out)
    torch.set_num_threads(cfg.threads)
    spec = inspect_env(cfg.env, cfg.policy)
    with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching the caller's global RNG
        torch.manual_seed(cfg.seed)
        policy = Policy(spec.obs_size, spec.action_size, cfg.hidden, spec.family, dtype=NETWORK_DTYPE)
        value_net = ValueNet(spec.obs_size, cfg.hidden, dtype=NETWORK_DTYPE)
    learner = Learner(
        policy,
        value_net,
        torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=1e-5),
        torch.optim.Adam(value_net.parameters(), lr=cfg.value_lr, eps=1e-5),
    )
    envs = make_vector_env(cfg.env, cfg.num_envs)
    generator = torch.Generator().manual_seed(cfg.seed)
    total = math.ceil(cfg.total_steps / cfg.batch_size)
    collector = Collector(envs, spec, cfg.gamma, cfg.seed)
    run = _Run(
        cfg, out, spec, learner, generator, envs, collector, total, build(ENTROPY_WEIGHTS, cfg.entropy_weight, cfg)
    )
    settings = config_to_dict(cfg)
    run.trained_with = json.dumps(settings)
    elapsed = 0.0
    try:
        if out is not None:
            if cfg.resume:
                run.first, elapsed = _restore(cfg, out, settings, learner, generator, envs, run.collector, run.recent)
                run.records = _read_records(out / "metrics.jsonl", run.first)
            if cfg.overwrite and older_run(out):
                shutil.rmtree(out)
            runs.prepare_output_dir(out, cfg.resume, cfg.overwrite, settings)  # the run's first write
    except BaseException:
        envs.close()
        raise
    run.start = time.perf_counter() - elapsed  # seconds trained, carried over a resume
    return run


def _read_records(path: Path, last_step: int) -> list[dict]:
    """The records of metrics.jsonl up to the checkpoint's step (what the resumed run continues)."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:  # a line cut off by a kill
            continue
    return [record for record in records if record.get("step", math.inf) <= last_step]


def _refuse_changes(cfg: ControlConfig, saved: dict[str, Any] | None, now: dict[str, Any], source: str, out: Path):
    """Refuse settings that differ from those the run was trained with (``saved``, from ``source``), naming each."""
    if cfg.allow_config_change or not isinstance(saved, dict):
        return
    changes = runs.config_changes(saved, now, RESUME_MAY_CHANGE)
    if changes:
        raise UsageError(
            "--resume",
            f"the settings differ from the ones {source} was trained with: {'; '.join(changes)} (resume with "
            f"--recipe {out / runs.CONFIG_FILE}, or pass --allow-config-change to go on anyway)",
        )


def _restore(cfg, out, settings, learner, generator, envs, collector, recent) -> tuple[int, float]:
    """Load the newest intact checkpoint of ``out`` into the freshly built objects; return (steps done, seconds
    trained). Without any checkpoint the run starts over; with only damaged ones the resume is refused."""
    folder = runs.latest_checkpoint(out, tidy=True)  # a resume: tidy what a killed save left first
    if folder is None:
        if any(candidate.is_dir() for candidate in runs.checkpoint_candidates(out)):  # each one reported above
            raise UsageError(
                "--resume",
                f"{out} holds no intact checkpoint (every one is damaged, see above); pass --overwrite instead of "
                "--resume to start the run again",
            )
        import yaml

        try:  # what the run was started with; one that does not parse has nothing to compare with
            saved = yaml.safe_load((out / runs.CONFIG_FILE).read_text())
        except (OSError, ValueError, yaml.YAMLError):
            saved = None
        _refuse_changes(cfg, saved, settings, runs.CONFIG_FILE, out)
        print(f"{COMMAND}: {out} has no complete checkpoint yet; starting from step 0", file=sys.stderr)
        return 0, 0.0
    networks, state, environments = load_training(folder)
    if "config" in state:
        _refuse_changes(cfg, json.loads(state["config"]), settings, str(folder.relative_to(out)), out)
    try:
        learner.policy.load_state_dict({k[len("policy.") :]: v for k, v in networks.items() if k.startswith("policy.")})
        learner.value_net.load_state_dict(
            {k[len("value.") :]: v for k, v in networks.items() if k.startswith("value.")}
        )
        learner.policy_opt.load_state_dict(state["policy_opt"])
        learner.value_opt.load_state_dict(state["value_opt"])
        generator.set_state(state["generator"])
    except Exception as err:  # another run's shapes (a changed --hidden with --allow-config-change), a damaged state
        raise UsageError("--resume", f"{folder} does not fit this run: {first_line(err)}") from None
    recent.extend(state["recent"])
    step = state["step"]
    if environments is not None:
        set_env_state(envs, environments)
        collector.obs = state["obs"].numpy()
        collector.running_return = state["running_return"].numpy().copy()
        collector.running_length = state["running_length"].numpy().copy()
    else:  # native environment state (MuJoCo, Box2D) cannot be saved: new episodes, seeded by the step
        print(
            f"{COMMAND}: {cfg.env} keeps state that cannot be saved; the resumed run starts new episodes, "
            "so it is not bit for bit the run it would have been",
            file=sys.stderr,
        )
        collector.obs, _ = envs.reset(seed=cfg.seed + 7919 * step)
    return step, float(state["elapsed"])


def _summary(returns: list[float]) -> str:
    spread = statistics.stdev(returns) if len(returns) > 1 else 0.0
    return f"{statistics.fmean(returns):.1f} +- {spread:.1f} over {len(returns)} episodes"


def _evaluate_saved(cfg: ControlConfig) -> int:
    torch.set_num_threads(cfg.threads)
    policy, metadata = load_policy(cfg.eval)
    spec = inspect_env(cfg.env or metadata["env"])
    if (spec.family, spec.obs_size, spec.action_size) != (
        policy.family_name,
        metadata["obs_size"],
        metadata["action_size"],
    ):
        raise UsageError(
            "--env",
            f"{spec.env_id} does not fit this policy (trained on {metadata['env']}): it needs a "
            f"{spec.family} policy for {spec.obs_size} observations and {spec.action_size} actions, "
            f"the file has a {policy.family_name} one for {metadata['obs_size']} and {metadata['action_size']}",
        )
    returns = evaluate_policy(policy, spec, cfg.eval_episodes, seed=cfg.seed + 10_000)
    print(f"{spec.env_id} {metadata['algo']} policy {cfg.eval}: return {_summary(returns)}")
    return 0


def run(config: ControlConfig) -> int:
    """``policygrad control``: train into ``config.output_dir`` (or, with ``--eval``, evaluate a saved policy) and
    print a summary line; a stopped run prints where it saved and the command that resumes it."""
    if config.eval is not None:
        return _evaluate_saved(config)
    try:
        return _run_training(config)
    except Stopped as stopped:
        print(f"{COMMAND}: {stopped}", file=sys.stderr)
        return stopped.exit_code


def _run_training(config: ControlConfig) -> int:
    """Train into ``config.output_dir`` with an optional progress bar, then print the one-line summary."""
    planned = math.ceil(config.total_steps / config.batch_size) * config.batch_size  # whole batches
    if planned > 1.01 * config.total_steps:  # worth a word (the default 50,000 becomes 50,176 for PPO: not)
        print(
            f"{COMMAND}: --total-steps {config.total_steps:,} rounds up to {planned:,} environment steps (whole "
            f"batches of {config.num_envs} environments x {config.num_steps} steps)",
            file=sys.stderr,
        )
    if not config.progress:
        result = train(config, config.output_dir)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("return {task.fields[ret]}"),
        )
        bar = Progress(*columns)
        task = bar.add_task(f"{config.algo} {config.env}", total=planned, ret="-")

        def show(record: dict) -> None:
            bar.start()  # on the first record: a run refused at its start shows no bar (a no-op once started)
            ret = record["return_recent"]
            done = record["env_steps"]
            bar.update(task, completed=done, ret="-" if ret is None else f"{ret:.1f}")

        try:
            result = train(config, config.output_dir, on_step=show)
        finally:
            bar.stop()
    last = result.records[-1]
    recent = "n/a" if last["return_recent"] is None else f"{last['return_recent']:.1f}"
    evaluation = f"; eval return {_summary(result.eval_returns)}" if result.eval_returns else ""
    print(
        f"{config.env} {config.algo} seed {config.seed}: {last['env_steps']:,} steps in {last['time']:.1f} s; "
        f"training return (last {RECENT_EPISODES}) {recent}{evaluation}; saved {result.output_dir}"
    )
    return 0
