"""The trainer of ``policygrad control``, in Spinning Up's order: sample, estimate advantages, update, log.

``run(config)`` is the CLI entry point (exit code); ``train(config)`` does the training and returns its records, so
benchmarks and tests can call it without the command line.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from policygrad import checkpointing
from policygrad.advantages import gae
from policygrad.control.algorithms import UPDATES, Batch, Learner
from policygrad.control.checkpoint import (
    env_state,
    load_policy,
    load_training,
    save_policy,
    save_training,
    set_env_state,
)
from policygrad.control.config import ControlConfig
from policygrad.control.envs import EnvSpec, inspect_env, make_vector_env
from policygrad.control.policies import Policy, ValueNet
from policygrad.control.rollout import Collector, Rollout, evaluate_policy
from policygrad.errors import UsageError
from policygrad.stopping import EXIT_DIVERGED, Stopped, StopSignals

__all__ = ["TrainResult", "train", "run", "RECENT_EPISODES"]

RECENT_EPISODES = 10
"""``return_recent`` is the mean undiscounted return of this many most recently finished training episodes."""


@dataclass
class TrainResult:
    records: list[dict]  # one per update, as written to metrics.jsonl
    policy: Policy
    spec: EnvSpec
    eval_returns: list[float]
    run_dir: Path | None


def _flatten(rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor) -> Batch:
    """(T, N, ...) -> (T * N, ...). Advantages and returns arrive (N, T), the layout of ``gae``."""
    obs = rollout.obs.flatten(0, 1)  # (B, O)
    actions = rollout.actions.flatten(0, 1)  # (B,) or (B, D)
    return Batch(obs, actions, rollout.logprobs.flatten(), advantages.T.flatten(), returns.T.flatten())


def train(
    cfg: ControlConfig, run_dir: Path | None = None, on_update: Callable[[dict], None] | None = None
) -> TrainResult:
    """Train ``cfg.algo`` on ``cfg.env`` for ``cfg.total_steps`` environment steps.

    Writes ``config.json`` (every setting, defaults resolved), ``metrics.jsonl`` (one JSON object per update),
    ``policy.pt`` and, with ``cfg.plot``, ``curves.png`` into ``run_dir`` when one is given. ``on_update`` sees every record as it is made (progress bars, benchmarks).

    With a ``run_dir``, a checkpoint goes to ``checkpoints/update-N`` every ``cfg.save_every`` updates, SIGINT and
    SIGTERM finish the update, save and raise :class:`policygrad.stopping.Stopped`, and ``cfg.resume`` (the same
    folder) continues from the newest complete checkpoint, bit for bit as if never stopped when the environment's
    state can be saved (see :func:`policygrad.control.checkpoint.env_state`).

    An optimiser step with a non-finite loss or gradient norm is skipped (``skipped_steps`` in the record). After
    ``cfg.max_bad_updates`` updates in a row that skipped any, the run stops with :data:`EXIT_DIVERGED`, saving the
    state from before the first of them: everything a checkpoint holds is copied at the start of each update (the
    networks are small), because the environments and generators move on even when the weights do not.
    """
    torch.set_num_threads(cfg.threads)
    generator = torch.Generator().manual_seed(cfg.seed)  # action sampling and minibatch order
    spec = inspect_env(cfg.env, cfg.policy)
    with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching the caller's global RNG
        torch.manual_seed(cfg.seed)
        # float32 whatever the process default: these networks are tiny and speed matters more than the last digits
        policy = Policy(spec.obs_size, spec.action_size, cfg.hidden, spec.family).float()
        value_net = ValueNet(spec.obs_size, cfg.hidden).float()
    learner = Learner(
        policy,
        value_net,
        torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=1e-5),
        torch.optim.Adam(value_net.parameters(), lr=cfg.value_lr, eps=1e-5),
    )
    envs = make_vector_env(cfg.env, cfg.num_envs)
    collector = Collector(envs, spec, cfg.gamma, cfg.seed)
    update = UPDATES[cfg.algo]
    log = None
    records: list[dict] = []
    recent: deque[float] = deque(maxlen=RECENT_EPISODES)
    num_updates = math.ceil(cfg.total_steps / cfg.batch_size)
    first, elapsed = 0, 0.0
    if run_dir is not None:
        if cfg.resume is not None:
            first, elapsed = _restore(cfg, run_dir, learner, generator, envs, collector, recent)
            records = _truncate_metrics(run_dir / "metrics.jsonl", first)
        else:
            _write_config(run_dir, cfg)
        log = (run_dir / "metrics.jsonl").open("a" if first else "w")
    stop = StopSignals("policygrad control") if run_dir is not None else contextlib.nullcontext(None)

    def snapshot(k: int) -> tuple[int, dict, dict, dict | None]:
        """A copy of everything the checkpoint after ``k`` updates holds, taken now and saved now or later."""
        state = {
            "policy_opt": copy.deepcopy(learner.policy_opt.state_dict()),
            "value_opt": copy.deepcopy(learner.value_opt.state_dict()),
            "generator": generator.get_state(),
            "recent": list(recent),
            "elapsed": time.perf_counter() - start,
            "obs": torch.tensor(np.asarray(collector.obs)),
            "running_return": torch.tensor(collector.running_return),
            "running_length": torch.tensor(collector.running_length),
        }
        networks = {
            **{f"policy.{n}": t.detach().clone() for n, t in policy.state_dict().items()},
            **{f"value.{n}": t.detach().clone() for n, t in value_net.state_dict().items()},
        }
        return k, networks, state, env_state(envs)

    saved = [-1]  # the update of the newest checkpoint written, so a stop does not write the same one twice

    def save(snap: tuple[int, dict, dict, dict | None]) -> Path:
        k = snap[0]
        folder = run_dir / "checkpoints" / f"update-{k:06d}"
        if saved[0] != k or checkpointing.verify(folder) is not None:
            save_training(folder, *snap)
            checkpointing.prune(run_dir / "checkpoints", cfg.keep_checkpoints, prefix="update-")
            saved[0] = k
        return folder

    def stop_run(message: str, exit_code: int) -> None:
        if log is not None:
            log.close()
        envs.close()
        raise Stopped(message, exit_code)

    start = time.perf_counter() - elapsed
    before = snapshot(first) if run_dir is not None else None  # the state before this update: what a stop may save
    bad, before_bad = 0, None  # updates in a row that skipped a non-finite step; the snapshot from before the first
    with stop as signals:
        for k in range(first, num_updates):
            if cfg.anneal_lr:
                for opt, lr in ((learner.policy_opt, cfg.lr), (learner.value_opt, cfg.value_lr)):
                    opt.param_groups[0]["lr"] = lr * (1.0 - k / num_updates)
            # 1. sample a batch with the current policy
            rollout = collector.collect(policy, value_net, cfg.num_steps, generator)
            # 2. estimate advantages; gae wants time last: (T, N) -> (N, T), last_value (N,)
            advantages, returns = gae(
                rollout.rewards.T, rollout.values.T, rollout.dones.T, rollout.last_value, cfg.gamma, cfg.gae_lambda
            )
            # 3. update the policy and the baseline
            metrics = update(learner, _flatten(rollout, advantages, returns), cfg, generator)
            # 4. log
            recent.extend(rollout.episode_returns)
            record = {
                "update": k + 1,
                "steps": (k + 1) * cfg.batch_size,
                "time": time.perf_counter() - start,
                "return_recent": statistics.fmean(recent) if recent else None,
                "episode_returns": rollout.episode_returns,
                # NaN (e.g. explained variance of constant returns) is not JSON; null is
                **{name: None if value != value else value for name, value in metrics.items()},
            }
            records.append(record)
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if on_update is not None:
                on_update(record)
            done = k + 1
            # 5. a non-finite loss or gradient: those steps were skipped; several such updates in a row stop the run
            if metrics["skipped_steps"]:
                bad, before_bad = bad + 1, before_bad or before
                print(
                    f"policygrad control: update {done}: non-finite loss or gradient norm; {metrics['skipped_steps']} "
                    f"optimiser steps skipped ({bad} of {cfg.max_bad_updates} in a row)",
                    file=sys.stderr,
                    flush=True,
                )
                if bad >= cfg.max_bad_updates:
                    message = f"stopped: {bad} updates in a row had a non-finite loss or gradient norm"
                    if run_dir is None:
                        stop_run(f"{message} (no run folder, nothing saved)", EXIT_DIVERGED)
                    stop_run(
                        f"{message}; saved the state from before the first of them (after update {before_bad[0]}) "
                        f"in {save(before_bad)}; lower --lr or check the environment's rewards, then "
                        f"resume with: policygrad control --resume {shlex.quote(str(run_dir))}",
                        EXIT_DIVERGED,
                    )
            else:
                bad, before_bad = 0, None
            if run_dir is not None and done < num_updates:
                before = snapshot(done)
                if cfg.save_every and done % cfg.save_every == 0 and not bad:  # none while a run may be going wrong
                    save(before)
                if signals.requested:
                    folder = save(before_bad or before)
                    stop_run(
                        f"stopped by {signals.name} after update {done} of {num_updates}; saved {folder}; "
                        f"resume with: policygrad control --resume {shlex.quote(str(run_dir))}",
                        signals.exit_code,
                    )
    envs.close()
    if log is not None:
        log.close()

    eval_returns = evaluate_policy(policy, spec, cfg.eval_episodes, seed=cfg.seed + 10_000) if cfg.eval_episodes else []
    if run_dir is not None:
        save_policy(run_dir / "policy.pt", policy, spec.env_id, spec.obs_size, spec.action_size, cfg.hidden, cfg.algo)
        if cfg.plot:
            from policygrad.control.plots import plot_curves

            plot_curves(records, run_dir / "curves.png", f"{cfg.env}, {cfg.algo}, seed {cfg.seed}")
    return TrainResult(records, policy, spec, eval_returns, run_dir)


def _write_config(run_dir: Path, cfg: ControlConfig) -> None:
    """config.json, written through a temporary file so a kill never leaves half of it. ``resume`` and
    ``allow_config_change`` are what one invocation did, not settings of the run, so they are not kept."""
    values = {**dataclasses.asdict(cfg), "resume": None, "allow_config_change": False}
    tmp = run_dir / f".config.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(values, default=str, indent=1) + "\n")
    os.replace(tmp, run_dir / "config.json")


def _truncate_metrics(path: Path, last_update: int) -> list[dict]:
    """Keep the records of updates <= ``last_update`` (what the checkpoint has seen) and return them; later ones, and
    a line cut short by a kill, are what the resumed run writes again."""
    kept = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("update", math.inf) <= last_update:
                kept.append(record)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
    return kept


def _restore(cfg, run_dir, learner, generator, envs, collector, recent) -> tuple[int, float]:
    """Load the newest complete checkpoint of ``run_dir`` into the freshly built objects; return (updates done,
    seconds trained). Without one the run starts over."""
    checkpointing.recover(run_dir / "checkpoints")
    folder = checkpointing.latest_good(checkpointing.folders_in(run_dir / "checkpoints"))
    if folder is None:
        print(f"policygrad control: {run_dir} has no complete checkpoint yet; starting from update 0", file=sys.stderr)
        return 0, 0.0
    networks, state, environments = load_training(folder)
    learner.policy.load_state_dict({k[len("policy.") :]: v for k, v in networks.items() if k.startswith("policy.")})
    learner.value_net.load_state_dict({k[len("value.") :]: v for k, v in networks.items() if k.startswith("value.")})
    learner.policy_opt.load_state_dict(state["policy_opt"])
    learner.value_opt.load_state_dict(state["value_opt"])
    generator.set_state(state["generator"])
    recent.extend(state["recent"])
    update = int(state["update"])
    if environments is not None:
        set_env_state(envs, environments)
        collector.obs = state["obs"].numpy()
        collector.running_return = state["running_return"].numpy().copy()
        collector.running_length = state["running_length"].numpy().copy()
    else:  # native environment state (MuJoCo, Box2D) cannot be saved: new episodes, seeded by the update
        print(
            f"policygrad control: {cfg.env} keeps state that cannot be saved; the resumed run starts new episodes, "
            "so it is not bit for bit the run it would have been",
            file=sys.stderr,
        )
        collector.obs, _ = envs.reset(seed=cfg.seed + 7919 * update)
    return update, float(state["elapsed"])


RESUME_MAY_CHANGE = (
    "threads",
    "progress",
    "plot",
    "eval_episodes",
    "save_every",
    "keep_checkpoints",
    "run_dir",
    "resume",
    "allow_config_change",
    "eval",
    "max_bad_updates",
)
"""Settings a resumed run may change freely: none changes what an update does."""


def resumed_config(cfg: ControlConfig) -> ControlConfig:
    """The config of ``--resume DIR``: the run's own (DIR/config.json), with the flags given now on top.

    A flag left at its default is taken as not given. One that sets a value the run did not have is refused, with
    the fields named, unless it is in :data:`RESUME_MAY_CHANGE` or ``--allow-config-change`` is passed.
    """
    saved = json.loads((cfg.resume / "config.json").read_text())
    given = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    defaults = json.loads(json.dumps(dataclasses.asdict(ControlConfig(algo=cfg.algo)), default=str))
    changes, merged = [], dict(saved)
    for name, value in given.items():
        if name not in saved or (value == defaults.get(name) and name not in ("resume", "allow_config_change")):
            continue
        if value != saved[name] and name not in RESUME_MAY_CHANGE:
            changes.append(f"{name} {json.dumps(saved[name])} -> {json.dumps(value)}")
        merged[name] = value
    if changes and not cfg.allow_config_change:
        raise UsageError(
            "--resume",
            f"these flags change the run's settings: {'; '.join(changes)} (leave them out to "
            "continue the run as it was, or pass --allow-config-change)",
        )
    merged["run_dir"] = Path(merged["run_dir"])
    merged["resume"] = cfg.resume
    merged["eval"] = None
    return ControlConfig(**merged)


def _new_run_dir(cfg: ControlConfig) -> Path:
    """runs/<env>-<algo>-s<seed>-<date-time>[-n], never reusing a folder."""
    try:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError("--run-dir", f"cannot create {cfg.run_dir}: {err.strerror}") from None
    stem = f"{cfg.env.replace('/', '_')}-{cfg.algo}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = cfg.run_dir / stem, 1
    while path.exists():
        n += 1
        path = cfg.run_dir / f"{stem}-{n}"
    path.mkdir()
    return path


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
    """``policygrad control``: train (or, with ``--eval``, evaluate a saved policy) and print a summary line."""
    if config.eval is not None:
        return _evaluate_saved(config)
    if config.resume is not None:
        config = resumed_config(config)
    inspect_env(config.env, config.policy)  # fail on a bad id or space before creating a run folder
    if config.resume is not None:
        if (config.resume / "policy.pt").is_file():
            raise UsageError("--resume", f"{config.resume} has finished (policy.pt is saved); start a new run instead")
        run_dir = config.resume
    else:
        run_dir = _new_run_dir(config)
    try:
        return _run_training(config, run_dir)
    except Stopped as stopped:
        print(f"policygrad control: {stopped}", file=sys.stderr)
        return stopped.exit_code


def _run_training(config: ControlConfig, run_dir: Path) -> int:
    """Train into ``run_dir`` with an optional progress bar, then print the one-line summary."""
    if not config.progress:
        result = train(config, run_dir)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("return {task.fields[ret]}"),
        )
        with Progress(*columns) as bar:
            task = bar.add_task(f"{config.algo} {config.env}", total=config.total_steps, ret="-")

            def show(record: dict) -> None:
                ret = record["return_recent"]
                bar.update(
                    task, completed=min(record["steps"], config.total_steps), ret="-" if ret is None else f"{ret:.1f}"
                )

            result = train(config, run_dir, on_update=show)
    last = result.records[-1]
    recent = "n/a" if last["return_recent"] is None else f"{last['return_recent']:.1f}"
    evaluation = f"; eval return {_summary(result.eval_returns)}" if result.eval_returns else ""
    print(
        f"{config.env} {config.algo} seed {config.seed}: {last['steps']:,} steps in {last['time']:.1f} s; "
        f"training return (last {RECENT_EPISODES}) {recent}{evaluation}; saved {run_dir}"
    )
    return 0
