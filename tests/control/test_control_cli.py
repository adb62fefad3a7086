"""Smoke runs of the real entry point: a short run that learns, its files, reloading the policy with --eval, and the
run folder's policy (the one of ``policygrad train``) through the command line."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import subprocess
import sys

import pytest

pytest.importorskip("gymnasium")

from policygrad import checkpointing  # noqa: E402
from policygrad.cli import main  # noqa: E402
from policygrad.control.config import ControlConfig  # noqa: E402
from policygrad.control.train import run  # noqa: E402
from policygrad.errors import UsageError  # noqa: E402


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.smoke
def test_short_cartpole_run_learns_and_reloads(tmp_path, capsys):
    cfg = ControlConfig(
        env="CartPole-v1",
        algo="a2c",
        total_steps=10_240,
        seed=0,
        output_dir=tmp_path,
        plot=True,
        progress=False,
        eval_episodes=3,
    )
    assert run(cfg) == 0
    run_dir = tmp_path
    records = _records(run_dir)
    assert records[-1]["env_steps"] == 10_240 and all(r["time"] >= 0 for r in records)
    assert [r["step"] for r in records] == list(range(1, 41))  # 40 batches of 4 x 64
    first = [g for r in records[:3] for g in r["episode_returns"]]
    # a random CartPole policy lasts about 22 steps; learning shows as much longer episodes
    assert sum(first) / len(first) < 40 and records[-1]["return_recent"] > 150
    assert (run_dir / "curves.png").stat().st_size > 1000
    assert "saved" in capsys.readouterr().out

    assert run(ControlConfig(eval=run_dir / "policy.pt", eval_episodes=2)) == 0
    line = capsys.readouterr().out
    assert line.startswith("CartPole-v1 a2c policy") and "over 2 episodes" in line


@pytest.mark.smoke
@pytest.mark.parametrize("algo", ["reinforce", "ppo", "npg"])
def test_every_algorithm_runs_and_saves(tmp_path, algo):
    assert run(ControlConfig(algo=algo, total_steps=1_024, output_dir=tmp_path, progress=False, eval_episodes=1)) == 0
    records = _records(tmp_path)
    assert records[-1]["env_steps"] >= 1_024 and "value_loss" in records[-1]
    assert (tmp_path / "policy.pt").is_file()


@pytest.mark.smoke
def test_pendulum_gaussian_policy_runs(tmp_path):
    cfg = ControlConfig(
        env="Pendulum-v1",
        algo="ppo",
        total_steps=1_024,
        num_envs=2,
        num_steps=256,
        output_dir=tmp_path,
        progress=False,
        eval_episodes=1,
    )
    assert run(cfg) == 0
    run_dir = tmp_path
    records = _records(run_dir)
    # every Pendulum episode is cut at 200 steps, so each 256-step batch ends exactly one episode per environment
    assert [r["env_steps"] for r in records] == [512, 1024] and [len(r["episode_returns"]) for r in records] == [2, 2]
    episodes = [g for r in records for g in r["episode_returns"]]
    # a step costs theta^2 + 0.1 theta_dot^2 + 0.001 u^2 with |theta| <= pi, |theta_dot| <= 8, |u| <= 2: an episode
    # returns between -200 (pi^2 + 6.4 + 0.004) and 0; four different seeds of the start state, four different sums
    assert all(-200 * (math.pi**2 + 6.4 + 0.004) < g < 0 for g in episodes) and len(set(episodes)) == 4
    assert [r["return_recent"] for r in records] == [statistics.fmean(episodes[:2]), statistics.fmean(episodes)]
    with pytest.raises(UsageError, match=r"^--env: CartPole-v1 does not fit this policy \(trained on Pendulum-v1\)"):
        run(ControlConfig(eval=run_dir / "policy.pt", env="CartPole-v1"))


@pytest.mark.exact
def test_eval_rejects_a_file_that_is_not_a_policy(tmp_path):
    bogus = tmp_path / "policy.pt"
    bogus.write_bytes(b"not a policy")
    with pytest.raises(UsageError, match=r"^--eval: .* is not a policy saved by policygrad control"):
        run(ControlConfig(eval=bogus))


@pytest.mark.smoke
def test_policygrad_control_command(tmp_path):
    """Through the installed CLI (needs `control` registered in policygrad.cli)."""
    base = [sys.executable, "-m", "policygrad", "control"]
    ok = subprocess.run(
        [
            *base,
            "--env",
            "CartPole-v1",
            "--algo",
            "a2c",
            "--total-steps",
            "2000",
            "--output-dir",
            str(tmp_path),
            "--no-progress",
            "--eval-episodes",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "CartPole-v1 a2c seed 0" in ok.stdout
    bad = subprocess.run([*base, "--env", "NoSuchEnv-v0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--env" in bad.stderr


@pytest.mark.smoke
def test_same_seed_same_run():
    from policygrad.control.train import train

    def returns(seed):
        cfg = ControlConfig(algo="ppo", total_steps=2_048, seed=seed, progress=False, eval_episodes=0)
        return [r["episode_returns"] for r in train(cfg).records]

    assert returns(3) == returns(3) != returns(4)


@pytest.mark.smoke
def test_the_run_folder_policy_of_policygrad_train(tmp_path, capsys):
    """A folder holding a run is refused unless --resume or --overwrite; --overwrite starts again; a non-empty folder
    that is not a run is never touched; --recipe FILE gives the defaults that flags override."""
    out = tmp_path / "run"
    flags = ["control", "--total-steps", "256", "--num-envs", "2", "--num-steps", "64", "--eval-episodes", "0"]
    flags += ["--no-progress", "--output-dir", str(out)]
    assert main(flags) == 0
    first = _records(out)
    assert main(flags) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"policygrad control: error: --output-dir: {out} already holds a run; pass --resume to continue it or "
        "--overwrite to replace it"
    )
    assert main([*flags, "--overwrite", "--seed", "1"]) == 0
    assert _records(out)[0]["episode_returns"] != first[0]["episode_returns"]  # a new run, seed 1
    assert main([*flags, "--overwrite", "--resume"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "policygrad control: error: --overwrite: cannot be combined with --resume"
    )

    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main([*flags[:-1], str(other), "--overwrite"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"policygrad control: error: --output-dir: {other} is not empty and holds no policygrad run; choose another "
        "folder"
    )
    assert [p.name for p in other.iterdir()] == ["notes.txt"]

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"algo: a2c\ntotal_steps: 256\nnum_envs: 2\nnum_steps: 64\noutput_dir: {tmp_path / 'r'}\n")
    assert main(["control", "--recipe", str(recipe), "--lr", "0.02", "--eval-episodes", "0", "--no-progress"]) == 0
    saved = (tmp_path / "r" / "config.yaml").read_text()
    assert "algo: a2c\n" in saved and "lr: 0.02\n" in saved and "value_lr: 0.01\n" in saved  # a2c's preset
    assert main(["control", "--recipe", str(recipe), "--lrr", "1"]) == 2
    assert "--lrr" in capsys.readouterr().err


def _older_run(folder):
    """A run folder as policygrad control wrote it before issue 13: runs/<env>-<algo>-s<seed>-<date>/ with
    config.json, metrics.jsonl keyed by "update" and checkpoints/update-N."""
    folder.mkdir()
    renamed = ("output_dir", "entropy_coef", "max_bad_steps", "overwrite")
    config = {k: v for k, v in dataclasses.asdict(ControlConfig()).items() if k not in renamed}
    config.update(run_dir="runs", ent_coef=0.0, max_bad_updates=3, resume=None, hidden=[64, 64])
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    (folder / "metrics.jsonl").write_text('{"update": 1, "steps": 256, "skipped_steps": 0}\n')

    def write(tmp):
        (tmp / "trainer_state.pt").write_bytes(b"not read")

    checkpointing.save_atomic(folder / "checkpoints" / "update-000001", write, 1)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.exact
def test_a_run_folder_of_an_older_policygrad_is_refused_in_one_line(tmp_path, capsys):
    old = tmp_path / "CartPole-v1-ppo-s0-20250101-120000"
    files = _older_run(old)
    said = (
        f"{old} holds a run written by an older policygrad control (config.json, checkpoints/update-N), which this "
        "version cannot resume; "
    )
    cases = {
        ("--output-dir", str(old)): f"--output-dir: {said}pass --overwrite to start it again, or choose another",
        ("--output-dir", str(old), "--resume"): f"--resume: {said}start it again with --overwrite instead of --resume",
        ("--recipe", str(old / "config.json"), "--resume"): (
            f"--recipe: {said}start it again with --output-dir {old} --overwrite, or choose another --output-dir"
        ),
    }
    for args, message in cases.items():
        assert main(["control", *args, "--no-progress"]) == 2, args
        err = capsys.readouterr().err
        assert err == f"policygrad control: error: {message}\n"
        assert {str(p.relative_to(old)): p.read_bytes() for p in sorted(old.rglob("*")) if p.is_file()} == files

    args = ["--total-steps", "256", "--num-envs", "2", "--num-steps", "64", "--eval-episodes", "0", "--no-progress"]
    assert main(["control", "--output-dir", str(old), "--overwrite", *args]) == 0
    assert sorted(p.name for p in old.iterdir()) == ["config.yaml", "metrics.jsonl", "policy.pt", "tensorboard"]
    assert [r["step"] for r in _records(old)] == [1, 2]


@pytest.mark.exact
@pytest.mark.parametrize("command", ["control", "train"])
def test_the_old_resume_with_a_folder_says_how_to_resume_now(command, capsys, tmp_path):
    """``--resume DIR`` (policygrad control before issue 13) is one line with the command that works now."""
    assert main([command, "--resume", f"{tmp_path}/run/"]) == 2
    assert capsys.readouterr().err == (
        f"policygrad {command}: error: --resume: is a flag and takes no folder; continue the run in {tmp_path}/run "
        f"with: policygrad {command} --recipe {tmp_path}/run/config.yaml --resume\n"
    )


@pytest.mark.smoke
def test_a_discrete_state_environment_trains_on_one_hot_observations_and_reloads(tmp_path, capsys):
    """FrozenLake's observation is a Discrete state (16 of them): the networks get it one-hot, 16 inputs, in training
    and when the saved policy is evaluated; the dynamic entropy weight is logged each step."""
    import torch

    out = tmp_path / "lake"
    args = ["control", "--env", "FrozenLake-v1", "--algo", "a2c", "--total-steps", "512", "--entropy-weight"]
    assert main([*args, "dynamic", "--entropy-coef", "0.001", "--output-dir", str(out), "--no-progress"]) == 0
    records = _records(out)
    assert len(records) == 2 and all(0 < r["entropy_weight"] <= 0.1 for r in records)
    assert all(r in (0.0, 1.0) for record in records for r in record["episode_returns"])
    first_layer = next(v for k, v in torch.load(out / "policy.pt", weights_only=True)["state_dict"].items())
    assert first_layer.shape[-1] == 16
    capsys.readouterr()
    assert main(["control", "--eval", str(out / "policy.pt"), "--eval-episodes", "3"]) == 0
    assert capsys.readouterr().out.startswith("FrozenLake-v1 a2c policy")
