"""The GRPO trainer of ``policygrad train``: the loop, in Spinning Up's order (sample, score, advantages, update, log),
and nothing else. What it calls owns the rest: :mod:`policygrad.lm.setup` builds (or restores) the :class:`Run`,
:mod:`policygrad.guard` holds the reliability behaviour between steps, :mod:`policygrad.runlog` the logs.

For each step: take B prompts, sample G completions of each (N = B * G rows, see :mod:`policygrad.lm.rollout` for
the letters), score them with the reward functions, turn the N rewards into N advantages (GRPO, RLOO or a REINFORCE
moving-average baseline, :data:`policygrad.variants.ADVANTAGES`), and take ``updates_per_batch`` AdamW steps on

    loss = policy_loss(logprobs, advantages)  -  w_H * entropy  +  beta * KL(pi || pi_ref)

each aggregated over the completion tokens (:mod:`policygrad.lm.update`). With one update per batch the policy term is
REINFORCE's; with several it is the clipped importance-ratio surrogate against the sampling policy's log-probs
(Schulman et al. 2017; the GRPO objective of Shao et al. 2024, eq. 3, is this with group advantages and the k3 KL).

A long run survives its own failures (docs/reliability.md): every random draw of a step is a function of (seed, step)
or restored from the checkpoint, so a resumed run is bit for bit the run that was stopped; checkpoints are atomic with
checksums; SIGINT/SIGTERM finish the step and save; a reward function's fault stops the run with a checkpoint or, with
``reward_fault: skip``, costs only the samples concerned; a non-finite loss or gradient skips the update.

Under ``torchrun`` (docs/distributed.md, :mod:`policygrad.distributed`) the same loop runs on every process: each
samples, scores and back-propagates its own shard of the B prompts; the advantages, the entropy weight and the logged
numbers come from the whole batch (:meth:`~policygrad.lm.setup.Run.whole_batch`), the gradients are summed inside
:func:`~policygrad.lm.update.update`, and only rank 0 writes. In one process every one of those is the identity.

``train(config)`` returns the run folder; ``run_train(config)`` is the CLI entry point (exit code).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import torch

from policygrad.distributed import RankLost, launch_from_env, launcher_command
from policygrad.errors import UsageError
from policygrad.guard import StepGuard
from policygrad.lm.config import GRPOConfig
from policygrad.lm.dynamic import sample_and_score
from policygrad.lm.fsdp import gathered
from policygrad.lm.metrics import curriculum_record, flat_scalars, samples, step_record
from policygrad.lm.report import Progress, print_before_after, step0_evaluation
from policygrad.lm.rollout import Rollout
from policygrad.lm.scoring import importance_correction, reference_logprobs
from policygrad.lm.setup import Run, setup
from policygrad.lm.update import update
from policygrad.rng import step_seed
from policygrad.runlog import RunLog
from policygrad.runs import resume_command, write_atomic
from policygrad.stopping import Stopped
from policygrad.variants import TASKS

__all__ = ["run_train", "train"]

USAGE_ERROR_GRACE_S = 5.0
"""Under torchrun: how long a process other than rank 0 waits before exiting on a usage error that rank 0 prints."""


def train(config: GRPOConfig) -> Path:
    """Train ``config.model`` on ``config.prompts`` and return the run folder (see the module docstring)."""
    run = setup(config)
    guard = _guard(run)
    append_after = run.start_step if run.resumed else None
    main = run.world.is_main  # the process that writes (the only one, without torchrun)
    with (
        RunLog(run.output_dir, append_after, ("completions", "faults"), command="policygrad train", write=main) as log,
        guard,
        Progress(config.progress and main, run.total_steps, run.start_step) as progress,
    ):
        if config.eval_every and not run.resumed and (initial := flat_scalars(run.evaluate())):
            log.write(0, initial)  # the learning curve's starting point, before any update
        for step in range(run.start_step, run.total_steps):
            started = time.perf_counter()
            guard.remember(step)
            records = run.batch(step)  # this process's prompts: all B of them, or its B / W under torchrun

            # 1-2. sample G completions of each prompt with the current policy and score them (with dynamic
            # sampling, groups without reward spread are replaced by fresh prompts' groups)
            torch.manual_seed(step_seed(config.seed, step))  # repeatable, and the same after a resume
            with gathered(run.model):  # FSDP: every weight on every rank while generating; else nothing
                rollout, scored, dynamic = sample_and_score(run, guard, log, records, step)
            sampled = time.perf_counter()
            ref_logprobs = reference_logprobs(run, rollout)  # (N, T) or None
            is_weights, tis = importance_correction(run, rollout)  # (N, T) or None: tis_cap, the sampler's gap

            # 3. advantages, and this batch's entropy and KL weights, from the whole batch's rewards (all processes')
            batch, batch_scored = run.whole_batch(rollout, scored)  # the B prompts' N rows
            advantages = run.estimator(batch_scored.rewards)  # (N,)
            entropy_weight, kl_coef = run.entropy_weight(batch_scored.rewards), run.kl_weight(batch_scored.rewards)

            # 4. update the policy on this process's rows (the gradients are summed over the processes)
            metrics = update(
                run.model,
                run.optimizer,
                rollout,
                advantages[run.world.shard(len(advantages))],  # this process's rows
                ref_logprobs,
                entropy_weight,
                config,
                run.autocast_dtype,
                run.world,
                kl_coef=kl_coef,
                is_weights=is_weights,
            )

            # 5. log the whole batch, and now and then evaluate; the guard then checkpoints or stops
            record = step_record(run.task, batch, batch_scored, advantages, entropy_weight, metrics, config.group_size)
            record.update(curriculum_record(run.task, run.curriculum, batch, batch_scored), **dynamic, **tis)
            record.update(_timings(run, batch, step, started, sampled), **_estimator_record(run))
            if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < run.total_steps:
                record.update(flat_scalars(run.evaluate()))
            log.write(step + 1, record)
            log.rows("completions", step + 1, samples(batch, batch_scored.scores.rewards, config.log_completions))
            progress.advance(f"reward {record['reward_mean']:.3f}", record["step_time"])
            guard.after(step + 1, bool(record["skipped_updates"]), _skip_detail(record))
        _finish(run, log)
    run.world.close()
    return run.output_dir


def _guard(run: Run) -> StepGuard:
    """The run's :class:`~policygrad.guard.StepGuard`: its snapshots and checkpoints are the run's."""
    config = run.config
    return StepGuard(
        "policygrad train",
        run.total_steps,
        config.max_bad_steps,
        config.save_every,
        snapshot=run.snapshot,
        save=run.checkpoint,
        resume_hint=run.resume_hint,
        consensus=run.world.maximum,
        speaks=run.world.is_main,
        quiet_signals=(signal.SIGTERM,) if run.world.size > 1 else (),  # torchrun's, to survivors of a dead process
    )


def _timings(run: Run, rollout: Rollout, step: int, started: float, sampled: float) -> dict[str, float]:
    elapsed = time.perf_counter() - started
    return {
        "lr": run.optimizer.param_groups[0]["lr"],
        "epoch": step // run.steps_per_epoch,
        "sample_time": sampled - started,
        "step_time": elapsed,
        "tokens_per_s": float(rollout.completion_lengths.sum()) / elapsed,
    }


def _estimator_record(run: Run) -> dict[str, float]:
    """The moving-average baseline, for the estimators that keep one."""
    mean = run.estimator.state().get("mean")
    return {} if mean is None else {"baseline": float(mean)}


def _skip_detail(record: dict[str, float]) -> str:
    return f" (loss {record.get('loss')}, grad_norm {record.get('grad_norm')})"


def _finish(run: Run, log: RunLog) -> None:
    """The final evaluation (eval.json and the last line of metrics.jsonl) and the ``final`` checkpoint."""
    final = run.evaluate()
    prompts = min(run.config.eval_size, len(run.prompts.heldout))
    summary = {"step": run.total_steps, "prompts": prompts, **final}
    if run.world.is_main:
        write_atomic(run.output_dir / "eval.json", json.dumps(summary, indent=2) + "\n")
    if final:
        log.write(run.total_steps, flat_scalars(final))
    run.save(run.output_dir / "final", run.snapshot(run.total_steps))


def run_train(config: GRPOConfig) -> int:
    """``policygrad train``: train, then show the held-out numbers before and after. Returns the exit code.

    Under torchrun every process returns the same code and only rank 0 prints (a lost process: the lowest one still
    alive), so a message appears once, not once per process."""
    launch = launch_from_env()
    main = launch is None or launch.rank == 0
    try:
        output_dir = train(config)
    except Stopped as stopped:
        if main:
            print(f"policygrad train: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except RankLost as lost:
        if lost.reporter:
            hint = resume_command("train", config.output_dir, launcher_command(launch))
            print(
                f"policygrad train: {lost}; every process stopped without saving (the last checkpoint is intact); "
                f"resume with: {hint}",
                file=sys.stderr,
                flush=True,
            )
        return lost.exit_code
    except UsageError:
        if main:
            raise  # the command line prints it, once
        # every process found the same error; torchrun stops the others as soon as one exits, so this one gives
        # rank 0 time to print it first (seen once under load: the line never appeared; this is the suspected cause)
        time.sleep(USAGE_ERROR_GRACE_S)
        return 2
    if not main:
        return 0
    final = json.loads((output_dir / "eval.json").read_text())
    after = {k: v for k, v in final.items() if isinstance(v, dict)}
    if after:
        prompts = final.get("prompts", config.eval_size)
        print_before_after(step0_evaluation(output_dir), after, prompts, TASKS[config.task].summary_rows)
    print(f"saved {output_dir} (final model in {output_dir / 'final'})")
    return 0
