"""Smoke runs of the real entry point: a short run that learns, its files, reloading the policy with --eval."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import pytest

pytest.importorskip("gymnasium")

from policygrad.control.config import ControlConfig  # noqa: E402
from policygrad.control.train import run  # noqa: E402
from policygrad.errors import UsageError  # noqa: E402


def _only_run_dir(root):
    (run_dir,) = list(root.iterdir())
    return run_dir


def test_short_cartpole_run_learns_and_reloads(tmp_path, capsys):
    cfg = ControlConfig(
        env="CartPole-v1",
        algo="a2c",
        total_steps=10_240,
        seed=0,
        run_dir=tmp_path,
        plot=True,
        progress=False,
        eval_episodes=3,
    )
    assert run(cfg) == 0
    run_dir = _only_run_dir(tmp_path)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["steps"] == 10_240 and all(r["time"] >= 0 for r in records)
    first = [g for r in records[:3] for g in r["episode_returns"]]
    # a random CartPole policy lasts about 22 steps; learning shows as much longer episodes
    assert sum(first) / len(first) < 40 and records[-1]["return_recent"] > 150
    assert (run_dir / "curves.png").stat().st_size > 1000
    assert "saved" in capsys.readouterr().out

    assert run(ControlConfig(eval=run_dir / "policy.pt", eval_episodes=2)) == 0
    line = capsys.readouterr().out
    assert line.startswith("CartPole-v1 a2c policy") and "over 2 episodes" in line


@pytest.mark.parametrize("algo", ["reinforce", "ppo", "npg"])
def test_every_algorithm_runs_and_saves(tmp_path, algo):
    assert run(ControlConfig(algo=algo, total_steps=1_024, run_dir=tmp_path, progress=False, eval_episodes=1)) == 0
    run_dir = _only_run_dir(tmp_path)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["steps"] >= 1_024 and "value_loss" in records[-1]
    assert (run_dir / "policy.pt").is_file()


def test_pendulum_gaussian_policy_runs(tmp_path):
    cfg = ControlConfig(
        env="Pendulum-v1",
        algo="ppo",
        total_steps=1_024,
        num_envs=2,
        num_steps=256,
        run_dir=tmp_path,
        progress=False,
        eval_episodes=1,
    )
    assert run(cfg) == 0
    run_dir = _only_run_dir(tmp_path)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # every Pendulum episode is cut at 200 steps, so each 256-step batch ends exactly one episode per environment
    assert [r["steps"] for r in records] == [512, 1024] and [len(r["episode_returns"]) for r in records] == [2, 2]
    episodes = [g for r in records for g in r["episode_returns"]]
    # a step costs theta^2 + 0.1 theta_dot^2 + 0.001 u^2 with |theta| <= pi, |theta_dot| <= 8, |u| <= 2: an episode
    # returns between -200 (pi^2 + 6.4 + 0.004) and 0; four different seeds of the start state, four different sums
    assert all(-200 * (math.pi**2 + 6.4 + 0.004) < g < 0 for g in episodes) and len(set(episodes)) == 4
    assert [r["return_recent"] for r in records] == [statistics.fmean(episodes[:2]), statistics.fmean(episodes)]
    with pytest.raises(UsageError, match=r"^--env: CartPole-v1 does not fit this policy \(trained on Pendulum-v1\)"):
        run(ControlConfig(eval=run_dir / "policy.pt", env="CartPole-v1"))


def test_eval_rejects_a_file_that_is_not_a_policy(tmp_path):
    bogus = tmp_path / "policy.pt"
    bogus.write_bytes(b"not a policy")
    with pytest.raises(UsageError, match=r"^--eval: .* is not a policy saved by policygrad control"):
        run(ControlConfig(eval=bogus))


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
            "--run-dir",
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


def test_same_seed_same_run():
    from policygrad.control.train import train

    def returns(seed):
        cfg = ControlConfig(algo="ppo", total_steps=2_048, seed=seed, progress=False, eval_episodes=0)
        return [r["episode_returns"] for r in train(cfg).records]

    assert returns(3) == returns(3) != returns(4)
