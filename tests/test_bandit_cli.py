"""The real `policygrad` command, end to end, in subprocesses."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

POLICYGRAD = str(Path(sys.executable).with_name("policygrad"))

pytestmark = pytest.mark.smoke  # the real command, in subprocesses and through cli.main


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


def test_plot_draws_the_runs_it_compares(tmp_path, figures, capsys):
    """The figure is drawn from the runs it names: the median J of each baseline's 8 seeds, their gradient variance
    averaged over 10 steps, the last run's policy; checked against the same runs made here (not just "a PNG")."""
    import torch

    from policygrad.bandit.core import run_bandit
    from policygrad.cli import main

    path, steps, seeds, means = tmp_path / "bandit.png", 60, 8, (3.2, 4.0, 3.6, 3.0)
    assert main(["bandit", "--steps", str(steps), "--plot-seeds", str(seeds), "--json", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {path}" in capsys.readouterr().err
    (figure,) = figures
    learning, variance, policy = figure.axes
    assert figure.get_suptitle() == f"{seeds} seeds, N=4 samples per update, lr=0.3, noise=0.5"  # the defaults

    runs = {
        name: run_bandit(
            torch.tensor(means, dtype=torch.float64),
            noise=0.5,
            baseline=name,
            samples=4,
            lr=0.3,
            steps=steps,
            seed=0,
            seeds=seeds,
        )
        for name in ("none", "loo")
    }
    assert (learning.get_xlabel(), learning.get_ylabel()) == ("update step", "expected reward J")
    assert [line.get_label() for line in learning.lines] == ["baseline: none", "baseline: loo", "best arm"]
    for line, run in zip(learning.lines, runs.values()):
        assert list(line.get_xdata()) == list(range(steps + 1))
        medians = [sorted(row)[seeds // 2 - 1 : seeds // 2 + 1] for row in run.expected_reward.tolist()]
        assert line.get_ydata() == pytest.approx([sum(pair) / 2 for pair in medians], abs=1e-12)  # median of 8
    assert list(learning.lines[2].get_ydata()) == [max(means)] * 2
    assert learning.lines[0].get_ydata()[-1] < learning.lines[1].get_ydata()[-1]  # the baseline learns faster

    assert variance.get_yscale() == "log" and variance.get_xlabel() == "update step"
    for line, run in zip(variance.lines, runs.values()):
        g, e = run.gradient_estimates.tolist(), run.exact_gradients.tolist()  # (steps, seeds, arms)
        per_step = [
            sum(sum((a - b) ** 2 for a, b in zip(gs, es)) for gs, es in zip(g[t], e[t])) / seeds for t in range(steps)
        ]  # mean over seeds of ||g - grad J||^2
        assert list(line.get_xdata()) == list(range(10, steps + 1))
        assert line.get_ydata() == pytest.approx([sum(per_step[t - 10 : t]) / 10 for t in range(10, steps + 1)])

    assert policy.get_title() == "Policy, one seed (baseline: loo)" and policy.get_ylim() == (0, 1)
    bands = policy.collections  # one stacked band per arm
    assert [band.get_label() for band in bands] == [f"arm {k} (mean {m:g})" for k, m in enumerate(means)]
    top = bands[-1].get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx(1.0)  # the stacked probabilities of the first seed sum to 1


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
