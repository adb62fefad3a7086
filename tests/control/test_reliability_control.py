"""Issue 6, "Nothing lost", for the control trainer: a run stopped by a signal, or killed while it saves, resumes to
bit-identical weights and metrics; a changed config is refused; checkpoints load without unpickling.

The counts of docs/reliability.md are the constants here: ``_fault_table_rows`` at the end declares this file's rows
of its table from them, and a test compares the two cell by cell.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("gymnasium")

import fault_table  # noqa: E402  (tests/, on sys.path under pytest)

from policygrad import checkpointing  # noqa: E402
from policygrad.control.checkpoint import env_state, load_policy  # noqa: E402
from policygrad.control.config import ControlConfig  # noqa: E402
from policygrad.control.train import run  # noqa: E402
from policygrad.errors import UsageError  # noqa: E402
from policygrad.stopping import EXIT_DIVERGED  # noqa: E402

POLICYGRAD = str(Path(sys.executable).with_name("policygrad"))
SRC = Path(__file__).resolve().parents[2] / "src"
KILLS_DURING_SAVE = 3  # SIGKILLs of `policygrad control` while it writes a checkpoint
BAD_UPDATES = (4, 5, 6)  # non-finite updates in a row, with --max-bad-updates len(BAD_UPDATES)


@pytest.fixture(autouse=True)
def float32_default():
    """The top-level conftest makes float64 the default; `policygrad control` runs with torch's float32 default, and
    these tests compare in-process runs with CLI runs bit for bit."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(previous)


def _only_run_dir(root: Path) -> Path:
    (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
    return run_dir


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


@pytest.mark.parametrize("case", sorted(CASES))
def test_stopped_by_a_signal_then_resumed_is_bit_identical(case, tmp_path, capsys):
    settings = dict(CASES[case], seed=3, progress=False, eval_episodes=0, save_every=3)
    assert run(ControlConfig(run_dir=tmp_path / "straight", **settings)) == 0
    straight = _only_run_dir(tmp_path / "straight")

    # SIGINT to ourselves during update 5: the update finishes, a checkpoint is written, the run stops
    def interrupt(record: dict) -> None:
        if record["update"] == 5:
            os.kill(os.getpid(), signal.SIGINT)

    from policygrad.control import train as train_module

    original = train_module.train
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "train", lambda cfg, run_dir, on_update=None: original(cfg, run_dir, interrupt))
        assert run(ControlConfig(run_dir=tmp_path / "split", **settings)) == 130
    split = _only_run_dir(tmp_path / "split")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"policygrad control: stopped by SIGINT after update 5 of 8; saved {split / 'checkpoints' / 'update-000005'}; "
        f"resume with: policygrad control --resume {shlex.quote(str(split))}"
    )
    assert not (split / "policy.pt").exists()

    assert run(ControlConfig(resume=split, progress=False, eval_episodes=0)) == 0
    _assert_same_run(straight, split)
    assert sorted(p.name for p in (split / "checkpoints").iterdir()) == [
        "update-000003",
        "update-000005",
        "update-000006",
    ]


def test_resume_refuses_changed_settings_and_names_them(tmp_path):
    settings = dict(CASES["cartpole-ppo"], progress=False, eval_episodes=0, save_every=2, total_steps=4 * 128)
    # a finished run cannot be resumed; stop one half way by keeping only its checkpoint
    assert run(ControlConfig(run_dir=tmp_path, **settings)) == 0
    run_dir = _only_run_dir(tmp_path)
    (run_dir / "policy.pt").unlink()
    with pytest.raises(UsageError) as info:
        run(ControlConfig(resume=run_dir, lr=0.5, gamma=0.5, progress=False))
    message = str(info.value)
    assert message.startswith("--resume: ") and "lr 0.001 -> 0.5" in message and "gamma 0.98 -> 0.5" in message
    assert "\n" not in message and "--allow-config-change" in message
    assert run(ControlConfig(resume=run_dir, threads=1, eval_episodes=0, progress=False)) == 0  # free to change
    (run_dir / "policy.pt").unlink()
    assert run(ControlConfig(resume=run_dir, lr=0.5, allow_config_change=True, eval_episodes=0, progress=False)) == 0
    with pytest.raises(UsageError, match="has finished"):
        run(ControlConfig(resume=run_dir, progress=False))


@pytest.mark.slow
def test_sigterm_through_the_cli_and_the_printed_resume_command(tmp_path):
    args = [
        "--env",
        "CartPole-v1",
        "--algo",
        "a2c",
        "--num-envs",
        "2",
        "--num-steps",
        "64",
        "--total-steps",
        str(20 * 128),
        "--seed",
        "5",
        "--eval-episodes",
        "0",
        "--save-every",
        "0",
        "--no-progress",
    ]
    child = subprocess.Popen(
        [POLICYGRAD, "control", *args, "--run-dir", str(tmp_path / "run")], stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        metrics = list((tmp_path / "run").glob("*/metrics.jsonl"))
        if metrics and metrics[0].read_text().count("\n") >= 2:
            break
        time.sleep(0.01)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 143, err
    line = err.strip().splitlines()[-1]
    assert "stopped by SIGTERM after update" in line and "Traceback" not in err
    resumed = subprocess.run(
        [POLICYGRAD, *shlex.split(line.split("resume with: ")[1])[1:]], capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert run(ControlConfig(**_flags(args), run_dir=tmp_path / "straight")) == 0
    _assert_same_run(_only_run_dir(tmp_path / "straight"), _only_run_dir(tmp_path / "run"))


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


@pytest.mark.slow
def test_killed_while_saving_resumes_to_the_same_run(tmp_path):
    args = [
        "--env",
        "CartPole-v1",
        "--algo",
        "a2c",
        "--num-envs",
        "2",
        "--num-steps",
        "32",
        "--total-steps",
        str(24 * 64),
        "--seed",
        "9",
        "--eval-episodes",
        "0",
        "--save-every",
        "1",
        "--keep-checkpoints",
        "2",
        "--no-progress",
    ]
    root = tmp_path / "run"
    rng, table, kills, cut_short = random.Random(7), fault_table, 0, 0
    child = subprocess.Popen([POLICYGRAD, "control", *args, "--run-dir", str(root)], stderr=subprocess.DEVNULL)
    while kills < KILLS_DURING_SAVE:

        def saving(pid=child.pid) -> bool:  # this process's save is under way (a leftover has another pid)
            return bool(list(root.glob(f"*/checkpoints/.*.tmp-{pid}")))

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
            [POLICYGRAD, "control", "--resume", str(_only_run_dir(root)), "--no-progress"], stderr=subprocess.PIPE
        )
    _, err = child.communicate(timeout=300)
    assert child.returncode == 0, err.decode()
    assert kills == cut_short == KILLS_DURING_SAVE
    assert run(ControlConfig(**_flags(args), run_dir=tmp_path / "straight")) == 0
    _assert_same_run(_only_run_dir(tmp_path / "straight"), _only_run_dir(root))


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


def test_control_checkpoints_are_complete_and_load_without_pickle(tmp_path):
    settings = dict(CASES["cartpole-ppo"], progress=False, eval_episodes=0, save_every=2)
    assert run(ControlConfig(run_dir=tmp_path, **settings)) == 0
    folder = _only_run_dir(tmp_path) / "checkpoints" / "update-000006"
    assert checkpointing.verify(folder) is None
    assert sorted(p.name for p in folder.iterdir()) == [
        "env_state.json",
        "manifest.json",
        "networks.safetensors",
        "trainer_state.pt",
    ]
    torch.load(folder / "trainer_state.pt", weights_only=True)  # tensors and plain values only


# --------------------------------------------------------------------------------------------------------------
# Non-finite numbers
# --------------------------------------------------------------------------------------------------------------

NONFINITE_ALGOS = ("ppo", "a2c", "npg")  # the three kinds of update step (reinforce shares a2c's)


def _poison_rewards(patch: pytest.MonkeyPatch, bad_updates: set[int]) -> None:
    """From now on, the batches of the given updates (1-based) carry a NaN reward in every step: an environment
    gone wrong. Every loss of those updates is then NaN."""
    from policygrad.control import train as train_module

    class Poisoned(train_module.Collector):
        calls = 0

        def collect(self, *args, **kwargs):
            rollout = super().collect(*args, **kwargs)
            Poisoned.calls += 1
            if Poisoned.calls in bad_updates:
                rollout.rewards.fill_(float("nan"))
            return rollout

    patch.setattr(train_module, "Collector", Poisoned)


def _optimiser_steps(algo: str) -> int:
    """The optimiser steps of one update of the CartPole case: the policy's (one per minibatch of each epoch for
    PPO, one for A2C and NPG) plus the value network's (one per minibatch of each epoch)."""
    cfg = ControlConfig(**dict(CASES["cartpole-ppo"], algo=algo))
    return (cfg.epochs * cfg.minibatches if algo == "ppo" else 1) + cfg.epochs * cfg.minibatches


@pytest.mark.parametrize("algo", NONFINITE_ALGOS)
def test_a_non_finite_update_is_skipped_and_counted(algo, tmp_path, capsys):
    settings = dict(CASES["cartpole-ppo"], algo=algo, total_steps=5 * 128, progress=False, eval_episodes=0)
    with pytest.MonkeyPatch.context() as patch:
        _poison_rewards(patch, {3})
        assert run(ControlConfig(run_dir=tmp_path, **settings)) == 0
    run_dir = _only_run_dir(tmp_path)
    skipped = [record["skipped_steps"] for record in _metrics(run_dir)]
    assert skipped == [0, 0, _optimiser_steps(algo), 0, 0]  # every step of update 3, no other
    assert "update 3: non-finite loss or gradient norm" in capsys.readouterr().err
    assert all(torch.isfinite(t).all() for t in _policy(run_dir).values())


@pytest.mark.parametrize("algo", NONFINITE_ALGOS)
def test_non_finite_updates_in_a_row_stop_with_the_state_from_before_the_first(algo, tmp_path, capsys):
    """Updates 4, 5 and 6 go bad: the run stops with exit 3 and the checkpoint of the state after update 3, which a
    resume (the environment mended) continues into exactly the run that never went wrong."""
    settings = dict(CASES["cartpole-ppo"], algo=algo, seed=4, progress=False, eval_episodes=0)
    good = BAD_UPDATES[0] - 1  # the last good update
    assert run(ControlConfig(run_dir=tmp_path / "straight", **settings)) == 0
    with pytest.MonkeyPatch.context() as patch:
        _poison_rewards(patch, {*BAD_UPDATES, BAD_UPDATES[-1] + 1})
        config = ControlConfig(run_dir=tmp_path / "split", save_every=1, max_bad_updates=len(BAD_UPDATES), **settings)
        code = run(config)
    assert code == EXIT_DIVERGED
    split = _only_run_dir(tmp_path / "split")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(
        f"policygrad control: stopped: {len(BAD_UPDATES)} updates in a row had a non-finite loss "
        f"or gradient norm; saved the state from before the first of them (after update {good}) in "
        f"{split / 'checkpoints' / f'update-{good:06d}'}"
    )
    assert line.endswith(f"resume with: policygrad control --resume {shlex.quote(str(split))}")
    assert [record["update"] for record in _metrics(split)][-1] == BAD_UPDATES[-1]  # stopped after the last bad one
    assert checkpointing.latest_good(checkpointing.folders_in(split / "checkpoints")).name == f"update-{good:06d}"
    assert run(ControlConfig(resume=split, progress=False, eval_episodes=0)) == 0
    _assert_same_run(_only_run_dir(tmp_path / "straight"), split)


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
            "SIGINT during an update (CartPole PPO, Pendulum A2C)",
            "control",
            f"{len(CASES)}",
            [128 + signal.SIGINT],
            "nothing",
        ),
        Row("SIGTERM to `policygrad control`", "control", "1", [128 + signal.SIGTERM], "nothing"),
        Row(
            "NaN rewards in every step of one update",
            "control",
            f"{len(NONFINITE_ALGOS)} (one each)",
            [ppo, a2c, cfg.epochs, cfg.minibatches],
            "that one batch",
        ),
        Row(
            "The same on updates",
            "control",
            f"{len(NONFINITE_ALGOS)} (one each)",
            [*BAD_UPDATES, len(BAD_UPDATES), EXIT_DIVERGED, f"{BAD_UPDATES[0] - 1:06d}", BAD_UPDATES[0] - 1],
            "nothing",
        ),
    ]


def test_the_fault_table_rows_are_these_tests():
    """docs/reliability.md's rows for this file say, cell by cell, what the tests above inject and assert."""
    fault_table.check("control/test_reliability_control.py", _fault_table_rows())


def test_the_fault_table_check_fails_on_any_changed_number():
    """Each number of this file's rows, changed alone in a copy of the page, fails the check above."""
    assert fault_table.check_catches_every_change("control/test_reliability_control.py", _fault_table_rows()) >= 15
