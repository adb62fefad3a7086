"""The trainer of ``policygrad control``, in Spinning Up's order: sample, estimate advantages, update, log.

``run(config)`` is the CLI entry point (exit code); ``train(config)`` does the training and returns its records, so
benchmarks and tests can call it without the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from policygrad.advantages import gae
from policygrad.control.algorithms import UPDATES, Batch, Learner
from policygrad.control.checkpoint import load_policy, save_policy
from policygrad.control.config import ControlConfig
from policygrad.control.envs import EnvSpec, inspect_env, make_vector_env
from policygrad.control.policies import Policy, ValueNet
from policygrad.control.rollout import Collector, Rollout, evaluate_policy
from policygrad.errors import UsageError

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


def train(cfg: ControlConfig, run_dir: Path | None = None, on_update: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``cfg.algo`` on ``cfg.env`` for ``cfg.total_steps`` environment steps.

    Writes ``config.json`` (every setting, defaults resolved), ``metrics.jsonl`` (one JSON object per update),
    ``policy.pt`` and, with ``cfg.plot``, ``curves.png`` into ``run_dir`` when one is given. ``on_update`` sees every record as it is made (progress bars, benchmarks).
    """
    torch.set_num_threads(cfg.threads)
    generator = torch.Generator().manual_seed(cfg.seed)  # action sampling and minibatch order
    spec = inspect_env(cfg.env, cfg.policy)
    with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching the caller's global RNG
        torch.manual_seed(cfg.seed)
        # float32 whatever the process default: these networks are tiny and speed matters more than the last digits
        policy = Policy(spec.obs_size, spec.action_size, cfg.hidden, spec.family).float()
        value_net = ValueNet(spec.obs_size, cfg.hidden).float()
    learner = Learner(policy, value_net, torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=1e-5),
                      torch.optim.Adam(value_net.parameters(), lr=cfg.value_lr, eps=1e-5))
    envs = make_vector_env(cfg.env, cfg.num_envs)
    collector = Collector(envs, spec, cfg.gamma, cfg.seed)
    update = UPDATES[cfg.algo]
    log = None
    if run_dir is not None:
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), default=str, indent=1) + "\n")
        log = (run_dir / "metrics.jsonl").open("w")

    records: list[dict] = []
    recent: deque[float] = deque(maxlen=RECENT_EPISODES)
    num_updates = math.ceil(cfg.total_steps / cfg.batch_size)
    start = time.perf_counter()
    for k in range(num_updates):
        if cfg.anneal_lr:
            for opt, lr in ((learner.policy_opt, cfg.lr), (learner.value_opt, cfg.value_lr)):
                opt.param_groups[0]["lr"] = lr * (1.0 - k / num_updates)
        # 1. sample a batch with the current policy
        rollout = collector.collect(policy, value_net, cfg.num_steps, generator)
        # 2. estimate advantages; gae wants time last: (T, N) -> (N, T), last_value (N,)
        advantages, returns = gae(rollout.rewards.T, rollout.values.T, rollout.dones.T, rollout.last_value,
                                  cfg.gamma, cfg.gae_lambda)
        # 3. update the policy and the baseline
        metrics = update(learner, _flatten(rollout, advantages, returns), cfg, generator)
        # 4. log
        recent.extend(rollout.episode_returns)
        record = {"update": k + 1, "steps": (k + 1) * cfg.batch_size, "time": time.perf_counter() - start,
                  "return_recent": statistics.fmean(recent) if recent else None,
                  "episode_returns": rollout.episode_returns,
                  # NaN (e.g. explained variance of constant returns) is not JSON; null is
                  **{name: None if value != value else value for name, value in metrics.items()}}
        records.append(record)
        if log is not None:
            log.write(json.dumps(record) + "\n")
        if on_update is not None:
            on_update(record)
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
    if (spec.family, spec.obs_size, spec.action_size) != (policy.family_name, metadata["obs_size"], metadata["action_size"]):
        raise UsageError("--env", f"{spec.env_id} does not fit this policy (trained on {metadata['env']}): it needs a "
                                  f"{spec.family} policy for {spec.obs_size} observations and {spec.action_size} actions, "
                                  f"the file has a {policy.family_name} one for {metadata['obs_size']} and {metadata['action_size']}")
    returns = evaluate_policy(policy, spec, cfg.eval_episodes, seed=cfg.seed + 10_000)
    print(f"{spec.env_id} {metadata['algo']} policy {cfg.eval}: return {_summary(returns)}")
    return 0


def run(config: ControlConfig) -> int:
    """``policygrad control``: train (or, with ``--eval``, evaluate a saved policy) and print a summary line."""
    if config.eval is not None:
        return _evaluate_saved(config)
    inspect_env(config.env, config.policy)  # fail on a bad id or space before creating a run folder
    run_dir = _new_run_dir(config)
    if not config.progress:
        result = train(config, run_dir)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("return {task.fields[ret]}"))
        with Progress(*columns) as bar:
            task = bar.add_task(f"{config.algo} {config.env}", total=config.total_steps, ret="-")

            def show(record: dict) -> None:
                ret = record["return_recent"]
                bar.update(task, completed=min(record["steps"], config.total_steps), ret="-" if ret is None else f"{ret:.1f}")

            result = train(config, run_dir, on_update=show)
    last = result.records[-1]
    recent = "n/a" if last["return_recent"] is None else f"{last['return_recent']:.1f}"
    evaluation = f"; eval return {_summary(result.eval_returns)}" if result.eval_returns else ""
    print(f"{config.env} {config.algo} seed {config.seed}: {last['steps']:,} steps in {last['time']:.1f} s; "
          f"training return (last {RECENT_EPISODES}) {recent}{evaluation}; saved {run_dir}")
    return 0
