"""The small traps of a new user's first hour (issue 16) outside the language-model commands: an unknown command is
named with the known ones; a flag of another algorithm is refused; a step budget that is not whole batches says what
it rounds to; help shows one default per flag; a resumed control run may be extended, and says so."""

from __future__ import annotations

import re

import pytest

from policygrad.cli import main

pytestmark = pytest.mark.smoke


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    "word, hint", [("trian", "did you mean 'train'?"), ("evaluate", "did you mean 'eval'?"), ("xyz", "")]
)
def test_an_unknown_command_is_named_with_the_known_ones(word, hint, capsys):
    assert main([word, "--recipe", "r.yaml"]) == 2
    line = _one_line_error(capsys)
    assert line.startswith(f"policygrad: error: '{word}': unknown command")
    assert hint in line and "(commands: bandit, control, train, eval, sample, plot" in line


@pytest.mark.parametrize(
    "args, flag, algos",
    [
        (["--algo", "reinforce", "--max-kl", "5"], "--max-kl", "npg"),
        (["--algo", "a2c", "--clip-eps", "0.1"], "--clip-eps", "ppo"),
        (["--algo", "ppo", "--cg-iters", "3"], "--cg-iters", "npg"),
        (["--algo", "ppo", "--damping", "0.5"], "--damping", "npg"),
    ],
)
def test_a_flag_of_another_algorithm_is_refused(args, flag, algos, capsys, tmp_path):
    assert main(["control", *args, "--output-dir", str(tmp_path / "r")]) == 2
    line = _one_line_error(capsys)
    assert line == (f"policygrad control: error: {flag}: applies to --algo {algos} only; --algo {args[1]} ignores it")
    assert not (tmp_path / "r").exists()


def test_a_budget_of_part_of_a_batch_says_what_it_rounds_to(capsys, tmp_path):
    out = tmp_path / "r"
    flags = ["--algo", "a2c", "--num-envs", "2", "--num-steps", "8", "--eval-episodes", "0", "--no-progress"]
    assert main(["control", *flags, "--total-steps", "10", "--output-dir", str(out)]) == 0
    captured = capsys.readouterr()
    assert "--total-steps 10 rounds up to 16 environment steps (whole batches of 2 environments x 8 steps)" in (
        captured.err
    )
    assert "16 steps in" in captured.out

    # a finished run resumed with a larger budget goes on, and says so; with the same budget, nothing to do
    again = ["control", "--recipe", str(out / "config.yaml"), "--resume", "--no-progress"]
    assert main([*again, "--total-steps", "32"]) == 0
    captured = capsys.readouterr()
    assert "resuming with a new budget: total_steps 10 -> 32" in captured.err and "32 steps in" in captured.out
    assert main(again) == 0
    assert "is complete (policy.pt is saved); nothing to do" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    ["control", "train", "eval", "sample", "bandit", "plot", "playground", "sweep", "compare", "export", "serve"],
)
def test_help_shows_one_default_per_flag(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    entries = re.split(r"\n(?=[│| ]+-)", out)  # one chunk per flag
    doubled = [entry.split()[1] for entry in entries if len(re.findall(r"\(default:", entry)) > 1]
    assert not doubled, doubled


def test_a_one_arm_bandit_is_refused(capsys):
    assert main(["bandit", "--means", "1", "--json"]) == 2
    assert _one_line_error(capsys) == (
        "policygrad bandit: error: --means: give at least two arms, e.g. --means 1 0 0.5 (got 1)"
    )
