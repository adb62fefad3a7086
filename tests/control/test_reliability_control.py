"""Issue 6, "Nothing lost", for the control trainer: a run stopped by a signal, or killed while it saves, resumes to
bit-identical weights and metrics; a changed config is refused; checkpoints load without unpickling. The run folder,
its resume command and its messages are those of ``policygrad train`` (issue 13).

The counts of docs/reliability.md are the constants here: ``_fault_table_rows`` at the end declares this file's rows
of its table from them, and a test compares the two cell by cell.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("gymnasium")

import fault_table  # noqa: E402  (tests/, on sys.path under pytest)

from policygrad import checkpointing, runs  # noqa: E402
from policygrad.control.checkpoint import env_state, load_policy  # noqa: E402
from policygrad.control.config import ControlConfig, load_config  # noqa: E402
from policygrad.control.train import run  # noqa: E402
from policygrad.errors import UsageError  # noqa: E402
from policygrad.runs import RunComplete  # noqa: E402
from policygrad.stopping import EXIT_DIVERGED  # noqa: E402

POLICYGRAD = str(Path(sys.executable).with_name("policygrad"))
SRC = Path(__file__).resolve().parents[2] / "src"
KILLS_DURING_SAVE = 3  # SIGKILLs of `policygrad control` while it writes a checkpoint
BAD_STEPS = (4, 5, 6)  # non-finite steps in a row, with --max-bad-steps len(BAD_STEPS)


def _resume_command(run_dir: Path, started: str | None = None) -> str:
    """The printed resume command; ``started``: the program's path when it ran as a child process (its short name
    where that is on the PATH, else the path: .venv/bin is not on the PATH of someone who used `make`)."""
    program = "policygrad"
    if started is not None:
        found = shutil.which("policygrad")
        program = "policygrad" if found and Path(found).resolve() == Path(started).resolve() else shlex.quote(started)
    return f"{program} control --recipe {shlex.quote(str(run_dir / 'config.yaml'))} --resume"


def _resume(run_dir: Path, **changes) -> int:
    """What the printed resume command does, in-process: the run's own config.yaml as the recipe, and --resume."""
    return run(load_config(run_dir / "config.yaml", {"resume": True, **changes}))


def _policy(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_policy(run_dir / "policy.pt")[0].state_dict()


def _metrics(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def _assert_same_run(a: Path, b: Path) -> None:
    left, right = _policy(a), _policy(b)
    assert all(torch.equal(left[name], right[name]) for name in left)
    assert _metrics(a) == _metrics(b)


CASES = {
    "cartpole-ppo": dict(env="CartPole-v1", algo="ppo", num_envs=2, num_steps=64, total_steps=8 * 128),
    "pendulum-a2c": dict(env="Pendulum-v1", algo="a2c", num_envs=2, num_steps=64, total_steps=8 * 128),
}


@pytest.mark.smoke
@pytest.mark.parametrize("case", sorted(CASES))
def test_stopped_by_a_signal_then_resumed_is_bit_identical(case, tmp_path, capsys):
    settings = dict(CASES[case], seed=3, progress=False, eval_episodes=0, save_every=3)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(ControlConfig(output_dir=straight, **settings)) == 0

    # SIGINT to ourselves during step 5: the step finishes, a checkpoint is written, the run stops
    def interrupt(record: dict) -> None:
        if record["step"] == 5:
            os.kill(os.getpid(), signal.SIGINT)

    from policygrad.control import train as train_module

    original = train_module.train
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "train", lambda cfg, output_dir, on_step=None: original(cfg, output_dir, interrupt))
        assert run(ControlConfig(output_dir=split, **settings)) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"policygrad control: stopped by SIGINT after step 5 of 8; saved {split / 'checkpoints' / 'step-000005'}; "
        f"resume with: {_resume_command(split)}"
    )
    assert not (split / "policy.pt").exists()

    assert _resume(split) == 0
    _assert_same_run(straight, split)
    assert sorted(p.name for p in (split / "checkpoints").iterdir()) == ["step-000003", "step-000005", "step-000006"]


@pytest.mark.smoke
def test_resume_refuses_changed_settings_and_names_them(tmp_path):
    settings = dict(CASES["cartpole-ppo"], progress=False, eval_episodes=0, save_every=2, total_steps=4 * 128)
    # a finished run cannot be resumed; stop one half way by keeping only its checkpoint
    assert run(ControlConfig(output_dir=tmp_path, **settings)) == 0
    (tmp_path / "policy.pt").unlink()
    before = _files(tmp_path)
    with pytest.raises(UsageError) as info:
        _resume(tmp_path, lr=0.5, gamma=0.5)
    assert str(info.value) == (
        "--resume: the settings differ from the ones checkpoints/step-000002 was trained with: lr 0.001 -> 0.5; "
        f"gamma 0.98 -> 0.5 (resume with --recipe {tmp_path / 'config.yaml'}, or pass --allow-config-change to go "
        "on anyway)"
    )
    # without the run's recipe every setting that differs from the defaults is named (here num_envs and num_steps)
    with pytest.raises(UsageError, match=r"^--resume: .* num_envs 2 -> 8; num_steps 64 -> 32 \(resume with --recipe"):
        run(ControlConfig(output_dir=tmp_path, resume=True, progress=False))
    assert _files(tmp_path) == before  # refused before anything was written
    assert _resume(tmp_path, save_every=1, keep_checkpoints=5, eval_episodes=0) == 0  # free to change
    (tmp_path / "policy.pt").unlink()
    assert _resume(tmp_path, lr=0.5, allow_config_change=True) == 0
    finished = _files(tmp_path)
    with pytest.raises(RunComplete, match=r"is complete \(policy.pt is saved\); nothing to do"):
        _resume(tmp_path)  # a finished run resumed with the same budget: nothing to do, nothing written
    assert _files(tmp_path) == finished


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.smoke
def test_a_run_whose_checkpoints_are_all_damaged_is_not_resumed(tmp_path, capsys):
    """Every checkpoint truncated: each is reported, and the resume is refused in one line rather than starting the
    run over its logs; the folder is left as it was. A run stopped before its first checkpoint starts from step 0."""
    settings = dict(CASES["cartpole-ppo"], progress=False, eval_episodes=0, save_every=1, total_steps=3 * 128)
    assert run(ControlConfig(output_dir=tmp_path / "run", **settings)) == 0
    out = tmp_path / "run"
    (out / "policy.pt").unlink()
    for folder in (out / "checkpoints").iterdir():
        path = folder / "networks.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    before = _files(out)
    with pytest.raises(UsageError) as info:
        _resume(out)
    assert str(info.value) == (
        f"--resume: {out} holds no intact checkpoint (every one is damaged, see above); pass --overwrite instead of "
        "--resume to start the run again"
    )
    assert capsys.readouterr().err.count("networks.safetensors is truncated (100 of ") == 2  # step-000001, 000002
    assert _files(out) == before

    shutil.rmtree(out / "checkpoints")  # as if stopped before its first checkpoint
    assert _resume(out) == 0
    assert "has no complete checkpoint yet; starting from step 0" in capsys.readouterr().err
    assert run(ControlConfig(output_dir=tmp_path / "straight", **settings)) == 0
    _assert_same_run(tmp_path / "straight", out)


@pytest.mark.smoke
@pytest.mark.slow
def test_sigterm_through_the_cli_and_the_printed_resume_command(tmp_path):
    args = (
        f"--env CartPole-v1 --algo a2c --num-envs 2 --num-steps 64 --total-steps {20 * 128} --seed 5 "
        "--eval-episodes 0 --save-every 0 --no-progress"
    ).split()
    out = tmp_path / "run"
    child = subprocess.Popen(
        [POLICYGRAD, "control", *args, "--output-dir", str(out)], stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.01)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 143, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("policygrad control: stopped by SIGTERM after step ") and "Traceback" not in err
    assert line.endswith(f"; resume with: {_resume_command(out, started=POLICYGRAD)}")
    resumed = subprocess.run(shlex.split(line.split("resume with: ")[1]), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert run(ControlConfig(**_flags(args), output_dir=tmp_path / "straight")) == 0
    _assert_same_run(tmp_path / "straight", out)


def _flags(args: list[str]) -> dict:
    values, i = {}, 0
    while i < len(args):
        name = args[i][2:].replace("-", "_")
        if name == "no_progress":
            values["progress"], i = False, i + 1
            continue
        values[name] = args[i + 1] if name in ("env", "algo") else int(args[i + 1])
        i += 2
    return values


@pytest.mark.smoke
@pytest.mark.slow
def test_killed_while_saving_resumes_to_the_same_run(tmp_path):
    args = (
        f"--env CartPole-v1 --algo a2c --num-envs 2 --num-steps 32 --total-steps {24 * 64} --seed 9 "
        "--eval-episodes 0 --save-every 1 --keep-checkpoints 2 --no-progress"
    ).split()
    root = tmp_path / "run"
    rng, table, kills, cut_short = random.Random(7), fault_table, 0, 0
    child = subprocess.Popen([POLICYGRAD, "control", *args, "--output-dir", str(root)], stderr=subprocess.DEVNULL)
    while kills < KILLS_DURING_SAVE:

        def saving(pid=child.pid) -> bool:  # this process's save is under way (a leftover has another pid)
            return bool(list(root.glob(f"checkpoints/.*.tmp-{pid}")))

        deadline = time.monotonic() + 120
        while child.poll() is None and time.monotonic() < deadline:
            if saving():  # stopped at a random moment of the save; killed only if it is still saving then
                time.sleep(rng.uniform(0.0, 0.003))
                if table.kill_inside_a_save(child, saving):
                    kills += 1
                    break
            time.sleep(0.0005)
        assert child.returncode == -signal.SIGKILL, f"the run ended (exit {child.returncode}) after {kills} kills"
        cut_short += saving(child.pid)  # the save it was killed in is left half done
        child = subprocess.Popen(
            [POLICYGRAD, "control", "--recipe", str(root / "config.yaml"), "--resume"], stderr=subprocess.PIPE
        )
    _, err = child.communicate(timeout=300)
    assert child.returncode == 0, err.decode()
    assert kills == cut_short == KILLS_DURING_SAVE
    assert run(ControlConfig(**_flags(args), output_dir=tmp_path / "straight")) == 0
    _assert_same_run(tmp_path / "straight", root)


@pytest.mark.exact
def test_environment_state_is_saved_only_when_it_can_be_seen():
    from policygrad.control.envs import make_vector_env

    envs = make_vector_env("CartPole-v1", 2)
    envs.reset(seed=0)
    state = env_state(envs)
    assert state is not None and json.loads(json.dumps(state)) == state  # plain JSON: nothing to unpickle

    class Native:  # stands for a physics engine's handle
        pass

    envs.envs[1].unwrapped.engine = Native()
    assert env_state(envs) is None  # then a resume starts new episodes, and says so
    envs.close()


@pytest.mark.smoke
def test_control_checkpoints_are_complete_and_load_without_pickle(tmp_path):
    settings = dict(CASES["cartpole-ppo"], progress=False, eval_episodes=0, save_every=2)
    assert run(ControlConfig(output_dir=tmp_path, **settings)) == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000006"]
    folder = runs.latest_checkpoint(tmp_path)
    assert folder == runs.checkpoint_dir(tmp_path, 6) == tmp_path / "checkpoints" / "step-000006"
    assert checkpointing.verify(folder) is None
    assert sorted(p.name for p in folder.iterdir()) == [
        "env_state.json",
        "manifest.json",
        "networks.safetensors",
        "trainer_state.pt",
    ]
    state = torch.load(folder / "trainer_state.pt", weights_only=True)  # tensors and plain values only
    assert state["step"] == 6 and json.loads(state["config"])["lr"] == 0.001  # what a resume compares with
    # the run folder of `policygrad train`: config.yaml (the resume recipe), metrics.jsonl keyed by step, TensorBoard
    assert load_config(tmp_path / "config.yaml") == ControlConfig(output_dir=tmp_path, **settings)
    assert [record["step"] for record in _metrics(tmp_path)] == list(range(1, 9))
    assert [record["env_steps"] for record in _metrics(tmp_path)] == [128 * k for k in range(1, 9)]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


# --------------------------------------------------------------------------------------------------------------
# Non-finite numbers
# --------------------------------------------------------------------------------------------------------------

NONFINITE_ALGOS = ("ppo", "a2c", "npg")  # the three kinds of update step (reinforce shares a2c's)


def _poison_rewards(patch: pytest.MonkeyPatch, bad_steps: set[int]) -> None:
    """From now on, the batches of the given steps (1-based) carry a NaN reward in every environment step: an
    environment gone wrong. Every loss of those steps is then NaN."""
    from policygrad.control import train as train_module

    class Poisoned(train_module.Collector):
        calls = 0

        def collect(self, *args, **kwargs):
            rollout = super().collect(*args, **kwargs)
            Poisoned.calls += 1
            if Poisoned.calls in bad_steps:
                rollout.rewards.fill_(float("nan"))
            return rollout

    patch.setattr(train_module, "Collector", Poisoned)


def _optimiser_steps(algo: str) -> int:
    """The optimiser updates of one step of the CartPole case: the policy's (one per minibatch of each epoch for
    PPO, one for A2C and NPG) plus the value network's (one per minibatch of each epoch)."""
    cfg = ControlConfig(**dict(CASES["cartpole-ppo"], algo=algo))
    return (cfg.epochs * cfg.minibatches if algo == "ppo" else 1) + cfg.epochs * cfg.minibatches


@pytest.mark.smoke
@pytest.mark.parametrize("algo", NONFINITE_ALGOS)
def test_a_non_finite_update_is_skipped_and_counted(algo, tmp_path, capsys):
    settings = dict(CASES["cartpole-ppo"], algo=algo, total_steps=5 * 128, progress=False, eval_episodes=0)
    with pytest.MonkeyPatch.context() as patch:
        _poison_rewards(patch, {3})
        assert run(ControlConfig(output_dir=tmp_path, **settings)) == 0
    skipped = [record["skipped_updates"] for record in _metrics(tmp_path)]
    assert skipped == [0, 0, _optimiser_steps(algo), 0, 0]  # every optimiser update of step 3, no other
    assert (
        f"policygrad control: step 3: non-finite loss or gradient norm ({_optimiser_steps(algo)} optimiser updates "
        "skipped); update skipped (1 of 3 in a row)"
    ) in capsys.readouterr().err.splitlines()
    assert all(torch.isfinite(t).all() for t in _policy(tmp_path).values())


@pytest.mark.smoke
@pytest.mark.parametrize("algo", NONFINITE_ALGOS)
def test_non_finite_updates_in_a_row_stop_with_the_state_from_before_the_first(algo, tmp_path, capsys):
    """Steps 4, 5 and 6 go bad: the run stops with exit 3 and the checkpoint of the state after step 3, which a
    resume (the environment mended) continues into exactly the run that never went wrong."""
    settings = dict(CASES["cartpole-ppo"], algo=algo, seed=4, progress=False, eval_episodes=0)
    good = BAD_STEPS[0] - 1  # the last good step
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(ControlConfig(output_dir=straight, **settings)) == 0
    with pytest.MonkeyPatch.context() as patch:
        _poison_rewards(patch, {*BAD_STEPS, BAD_STEPS[-1] + 1})
        config = ControlConfig(output_dir=split, save_every=1, max_bad_steps=len(BAD_STEPS), **settings)
        code = run(config)
    assert code == EXIT_DIVERGED
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (
        f"policygrad control: stopped: {len(BAD_STEPS)} steps in a row had a non-finite loss or gradient norm; "
        f"saved the state from before the first of them (step {good}) in {split / 'checkpoints' / f'step-{good:06d}'}"
        f"; lower --lr or check the environment's rewards, then resume with: {_resume_command(split)}"
    )
    assert [record["step"] for record in _metrics(split)][-1] == BAD_STEPS[-1]  # stopped after the last bad one
    assert runs.latest_checkpoint(split).name == f"step-{good:06d}"
    assert _resume(split) == 0
    _assert_same_run(straight, split)


def _fault_table_rows() -> list:
    """This file's rows of docs/reliability.md's fault table, from the constants the tests above inject."""
    Row = fault_table.Row
    ppo, a2c, npg = (_optimiser_steps(algo) for algo in NONFINITE_ALGOS)
    cfg = ControlConfig(**CASES["cartpole-ppo"])
    assert a2c == npg  # the table gives them one number
    return [
        Row("Resume with changed flags (`lr`, `gamma`)", "control", "1", [], "nothing"),
        Row(
            "SIGKILL of `policygrad control` while it writes a checkpoint",
            "control",
            f"{KILLS_DURING_SAVE}",
            [KILLS_DURING_SAVE, KILLS_DURING_SAVE],
            "nothing",
        ),
        Row(
            "SIGINT during a step (CartPole PPO, Pendulum A2C)",
            "control",
            f"{len(CASES)}",
            [128 + signal.SIGINT],
            "nothing",
        ),
        Row("SIGTERM to `policygrad control`", "control", "1", [128 + signal.SIGTERM], "nothing"),
        Row(
            "NaN rewards in every environment step of one batch",
            "control",
            f"{len(NONFINITE_ALGOS)} (one each)",
            [ppo, a2c, cfg.epochs, cfg.minibatches],
            "that one batch",
        ),
        Row(
            "The same on steps",
            "control",
            f"{len(NONFINITE_ALGOS)} (one each)",
            [*BAD_STEPS, len(BAD_STEPS), EXIT_DIVERGED, f"{BAD_STEPS[0] - 1:06d}", BAD_STEPS[0] - 1],
            "nothing",
        ),
    ]


@pytest.mark.exact
def test_the_fault_table_rows_are_these_tests():
    """docs/reliability.md's rows for this file say, cell by cell, what the tests above inject and assert."""
    fault_table.check("control/test_reliability_control.py", _fault_table_rows())


@pytest.mark.property
def test_the_fault_table_check_fails_on_any_changed_number():
    """Each number of this file's rows, changed alone in a copy of the page, fails the check above."""
    assert fault_table.check_catches_every_change("control/test_reliability_control.py", _fault_table_rows()) >= 15
