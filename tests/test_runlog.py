"""policygrad.runlog: metrics.jsonl, TensorBoard and side logs, and what a resume keeps of them."""

from __future__ import annotations

import json

import pytest

from policygrad.runlog import RunLog

pytestmark = pytest.mark.exact


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_fresh_log_writes_steps_side_rows_and_tensorboard_scalars(tmp_path):
    (tmp_path / "faults.jsonl").write_text('{"step": 9}\n')  # left by an earlier run in this folder
    with RunLog(tmp_path, None, ("completions", "faults")) as log:
        log.write(1, {"reward_mean": 0.5, "reward_std": float("nan"), "flag": True})
        log.rows("completions", 1, [{"completion": "a"}, {"completion": "b"}])
    assert _lines(tmp_path / "metrics.jsonl")[0]["reward_mean"] == 0.5
    assert (tmp_path / "metrics.jsonl").read_text().count("NaN") == 1  # written as Python's json reads it back
    assert _lines(tmp_path / "completions.jsonl") == [{"step": 1, "completion": "a"}, {"step": 1, "completion": "b"}]
    assert not (tmp_path / "faults.jsonl").exists()  # a fresh run starts every log empty
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["reward_mean", "reward_std"]  # numbers only, no booleans


def test_a_resumed_log_drops_what_came_after_the_checkpoint(tmp_path):
    with RunLog(tmp_path, None, ("completions",)) as log:
        for step in (1, 2, 3):
            log.write(step, {"x": step})
            log.rows("completions", step, [{"c": step}])
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 4, "x"')  # a line cut off by a kill
    with RunLog(tmp_path, 2, ("completions",)) as log:
        log.write(3, {"x": 30})
    assert [r["x"] for r in _lines(tmp_path / "metrics.jsonl")] == [1, 2, 30]
    assert [r["c"] for r in _lines(tmp_path / "completions.jsonl")] == [1, 2]


def test_an_unknown_side_log_is_refused(tmp_path):
    with RunLog(tmp_path, None, ("completions",), tensorboard=False) as log, pytest.raises(ValueError, match="faults"):
        log.rows("faults", 1, [{}])
