"""policygrad.control.plots: the learning-curve figure of a `policygrad control` run is drawn from the run's own
records (checked point for point against its metrics.jsonl), not merely written as some PNG."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gymnasium")
pytest.importorskip("matplotlib")

from policygrad.control.config import ControlConfig  # noqa: E402
from policygrad.control.train import run  # noqa: E402

pytestmark = pytest.mark.smoke  # a real `policygrad control` run, tiny


def _flat(points) -> list[float]:
    return [float(v) for point in points for v in point]


def test_the_curves_are_the_logged_episode_returns(tmp_path, figures):
    cfg = ControlConfig(
        env="CartPole-v1",
        algo="a2c",
        num_envs=2,
        num_steps=64,
        total_steps=6 * 128,
        seed=1,
        output_dir=tmp_path,
        plot=True,
        progress=False,
        eval_episodes=0,
    )
    assert run(cfg) == 0
    run_dir = tmp_path
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6

    (figure,) = figures
    assert figure.get_suptitle() == "CartPole-v1, a2c, seed 1"
    by_steps, by_time = figure.axes
    assert by_steps.get_ylabel() == "episode return"
    for ax, key, label in ((by_steps, "env_steps", "environment steps"), (by_time, "time", "wall time (s)")):
        assert ax.get_xlabel() == label
        (dots,) = ax.collections  # one dot per finished episode, at the end of its update
        episodes = [(record[key], g) for record in records for g in record["episode_returns"]]
        assert len(episodes) > 10 and _flat(dots.get_offsets().tolist()) == pytest.approx(_flat(episodes))
        (line,) = ax.lines  # the mean of the last 10 episodes, per update that had finished one
        recent = [(record[key], record["return_recent"]) for record in records if record["return_recent"] is not None]
        assert _flat(zip(line.get_xdata(), line.get_ydata())) == pytest.approx(_flat(recent))
    assert [record["env_steps"] for record in records] == [128 * k for k in range(1, 7)]
