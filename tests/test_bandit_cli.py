"""The real `policygrad` command, end to end, in subprocesses."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

POLICYGRAD = str(Path(sys.executable).with_name("policygrad"))


def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([POLICYGRAD, *args], capture_output=True, text=True, timeout=timeout)


def test_import_is_cheap():
    code = "import sys, policygrad; print('torch' in sys.modules, 'tyro' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_help():
    result = run("--help")
    assert result.returncode == 0 and "bandit" in result.stdout
    result = run("bandit", "--help")
    assert result.returncode == 0 and "--baseline" in result.stdout and "--plot" in result.stdout


def test_json_run_is_consistent():
    result = run("bandit", "--steps", "40", "--means", "1", "0", "0.5", "--noise", "0.1", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data["steps"]) == 40 and data["config"]["means"] == [1.0, 0.0, 0.5]
    assert sum(data["final_probs"]) == pytest.approx(1.0, abs=1e-12)
    means = data["config"]["means"]
    for step in data["steps"]:
        J = sum(p * m for p, m in zip(step["probs"], means))
        assert step["expected_reward"] == pytest.approx(J, abs=1e-12)
        assert step["exact_gradient"] == pytest.approx([p * (m - J) for p, m in zip(step["probs"], means)], abs=1e-12)
    assert data["final_probs"][0] > data["steps"][0]["probs"][0]  # it learns toward the best arm
    again = json.loads(run("bandit", "--steps", "40", "--means", "1", "0", "0.5", "--noise", "0.1", "--json").stdout)
    assert again["final_probs"] == data["final_probs"]  # same seed, same run


def test_live_view_without_a_terminal_prints_the_final_state():
    result = run("bandit", "--steps", "30", "--delay", "0")
    assert result.returncode == 0, result.stderr
    assert "step 30/30" in result.stdout and "policy probability" in result.stdout


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "bandit.png"
    result = run("bandit", "--steps", "60", "--plot-seeds", "8", "--delay", "0", "--plot", str(path))
    assert result.returncode == 0, result.stderr
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


@pytest.mark.parametrize(
    "args, names",
    [
        (["--means"], "--means"),
        (["--means", "1", "x"], "--means"),
        (["--means", "1", "nan"], "--means"),
        (["--lr", "abc"], "--lr"),
        (["--lr", "0"], "--lr"),
        (["--lr", "-1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--noise", "-0.1"], "--noise"),
        (["--noise", "inf"], "--noise"),
        (["--steps", "0"], "--steps"),
        (["--samples", "0"], "--samples"),
        (["--samples", "1", "--baseline", "loo"], "--samples"),
        (["--baseline", "best"], "--baseline"),
        (["--entropy-coef", "-1"], "--entropy-coef"),
        (["--plot", "/no/such/folder/x.png"], "--plot"),
        (["--plot", "out.txt"], "--plot"),
        (["--bogus", "1"], "--bogus"),
        (["--seed", "-1"], "--seed"),
        (["--seed", "99999999999999999999"], "--seed"),
        (["--means", "1e308", "-1e308"], "--lr"),  # the policy diverges: named, with what to change
    ],
)
def test_bad_arguments_give_one_line(args, names):
    result = run("bandit", *args, "--json")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("policygrad bandit: error:") and names in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
