"""`policygrad sweep` and `policygrad compare` (issue 19) on tiny control runs: the grid and seeds become runs, a
second call reruns nothing, a stopped run is resumed, bad overrides are one line before anything runs, and the
compare table's numbers are the runs' own, with Student-t intervals worked out by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from policygrad.cli import main
from policygrad.compare import mean_interval

RECIPE = "env: CartPole-v1\nalgo: a2c\ntotal_steps: 256\nnum_envs: 2\nnum_steps: 64\neval_episodes: 0\nsave_every: 1\n"


def _files(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.exact
def test_the_interval_is_students_t_of_the_mean():
    mean, half = mean_interval([1.0, 2.0, 3.0])  # s = 1, n = 3, t(0.975, 2) = 4.303
    assert mean == 2.0 and half == pytest.approx(4.303 / math.sqrt(3), abs=1e-12)
    mean, half = mean_interval([5.0, math.nan])  # one finite value: no interval
    assert mean == 5.0 and math.isnan(half)
    assert mean_interval([0.0] * 40)[1] == 0.0


@pytest.mark.smoke
def test_a_control_sweep_runs_the_grid_once_and_compare_reports_it(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "sweep"
    argv = ["sweep", str(recipe), "--command", "control", "--set", "algo=a2c,reinforce", "--seeds", "0", "1"]
    argv += ["--parallel", "2", "--output-dir", str(out)]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "2 arms x 2 seeds = 4 runs" in said and "0 finished, 4 to run" in said
    runs = sorted(p.parent for p in out.glob("*/seed-*/policy.pt"))
    assert [f"{p.parent.name}/{p.name}" for p in runs] == [
        "algo=a2c/seed-0",
        "algo=a2c/seed-1",
        "algo=reinforce/seed-0",
        "algo=reinforce/seed-1",
    ]
    assert "threads: 1" in (out / "recipes" / "algo=a2c.seed-1.yaml").read_text()  # parallel runs: a thread each

    before = _files(out)
    assert main(argv) == 0  # nothing to do: not a file touched but the recipes
    assert "4 finished, 0 to run" in capsys.readouterr().out
    assert {p: t for p, t in _files(out).items() if "recipes" not in p.parts} == {
        p: t for p, t in before.items() if "recipes" not in p.parts
    }

    (runs[0] / "policy.pt").unlink()  # a run stopped before its end: resumed from its checkpoint, not restarted
    assert main(argv) == 0
    assert "3 finished, 1 to run" in capsys.readouterr().out
    assert (runs[0] / "policy.pt").is_file()
    assert "extending" not in (out / "logs" / "algo=a2c.seed-0.log").read_text()

    assert main(["compare", str(out), "--threshold", "10", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["kind"] == "control" and list(table["arms"]) == ["algo=a2c", "algo=reinforce"]
    for arm, row in table["arms"].items():
        finals = []
        for seed in (0, 1):
            records = [
                json.loads(line) for line in (out / arm / f"seed-{seed}" / "metrics.jsonl").read_text().splitlines()
            ]
            finals.append(records[-1]["return_recent"])
        mean, half = mean_interval(finals)
        assert row["n"] == 2 and row["final"] == [pytest.approx(mean), pytest.approx(half)]
    assert main(["compare", str(out)]) == 0
    assert "algo=reinforce" in capsys.readouterr().out and (out / "compare.png").is_file()


@pytest.mark.exact
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "algo"], "--set: expected FIELD=V1,V2,..., got 'algo'"),
        (["--set", "lrr=1,2"], "--set: arm lrr=1, {recipe}: unknown field 'lrr'"),
        (["--set", "gamma=0.5,2"], "--set: arm gamma=2, --gamma: must be in [0, 1], got 2.0"),
        (["--set", "seed=1,2"], "--set: seed is set by the sweep itself (use --seeds and --output-dir)"),
        (["--seeds", "1", "1"], "--seeds: repeats a seed: [1, 1]"),
    ],
)
def test_a_bad_sweep_is_one_line_and_runs_nothing(extra, message, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "sweep"
    assert main(["sweep", str(recipe), "--command", "control", "--output-dir", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"policygrad sweep: error: {message.format(recipe=recipe)}"
    assert not out.exists()
