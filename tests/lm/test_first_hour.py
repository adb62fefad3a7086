"""What a new user trips over in their first hour (issue 16), each as a test: evaluating a run's checkpoint scores
that run's task; resuming a finished run changes nothing (and a larger budget extends it, saying so); a reward fault
before any update saves no copy of the base model; checkpoints are readable by others; the eval command prints a
table (JSON on request); the train progress line notices a shared CPU."""

from __future__ import annotations

import json
import os
import stat

import pytest

pytest.importorskip("transformers")

import fault_table  # noqa: E402  (tests/, on sys.path under pytest)
from lm_helpers import tiny_config  # noqa: E402  (tests/lm, on sys.path under pytest)

from policygrad.cli import _parse, main  # noqa: E402
from policygrad.configs import config_to_dict  # noqa: E402
from policygrad.lm.config import EvalConfig  # noqa: E402
from policygrad.lm.trainer import train  # noqa: E402
from policygrad.runs import CONFIG_FILE  # noqa: E402

pytestmark = pytest.mark.smoke


def _files(folder):
    """Every file of a folder with its bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_run(tiny_llama_chat, tiny_prompts, tmp_path):
    """A finished 2-step tiny run whose task differs from every default that matters for evaluation."""
    config = tiny_config(
        tiny_llama_chat,
        tiny_prompts,
        tmp_path / "run",
        target_length=7,
        digit_sum_min=1,
        digit_sum_max=3,
        max_new_tokens=5,
        heldout_prompts=3,
        eval_size=3,
        eval_decoding=("greedy",),
        rewards=("binary",),
        save_every=1,
    )
    return train(config), config


@pytest.mark.parametrize("which", ["final", "run folder", "checkpoint"])
def test_eval_of_a_runs_checkpoint_scores_the_runs_task(finished_run, which, capsys):
    out, config = finished_run
    model = {"final": out / "final", "run folder": out, "checkpoint": out / "checkpoints" / "step-000001"}[which]
    evaluated = _parse(["eval", "--model", str(model)])
    said = capsys.readouterr().err
    assert isinstance(evaluated, EvalConfig)
    expected = EvalConfig.of(config, model=str(model))
    assert config_to_dict(evaluated) == config_to_dict(expected)
    assert f"the task of {out / CONFIG_FILE}" in said and "5 new tokens" in said and "eval size 3" in said
    assert len(said.strip().splitlines()) == 1

    flagged = _parse(["eval", "--model", str(model), "--max-new-tokens", "4"])  # a flag overrides the run's value
    assert (flagged.max_new_tokens, flagged.target_length) == (4, 7)


def test_eval_prints_a_table_and_json_on_request(finished_run, capsys):
    out, config = finished_run
    assert main(["eval", "--model", str(out / "final"), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "held-out prompts (3, greedy decoding)" in table and "pass rate" in table and "by target" in table
    assert main(["eval", "--model", str(out / "final"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    final = json.loads((out / "eval.json").read_text())  # the run's own final evaluation: the same numbers
    assert result["prompts"] == final["prompts"] == 3
    assert result["greedy"]["pass_rate"] == final["greedy"]["pass_rate"]
    assert result["greedy"]["mean_reward"] == final["greedy"]["mean_reward"]


STEPS, MORE = 2, 3  # the finished run's steps, and the larger budget it is resumed with


def test_resuming_a_finished_run_changes_nothing_and_a_larger_budget_extends_it(finished_run, capsys):
    out, config = finished_run
    assert config.max_steps == STEPS
    before = _files(out)
    assert main(["train", "--recipe", str(out / CONFIG_FILE), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"is complete ({STEPS} steps); nothing to do" in err and len(err.strip().splitlines()) == 1
    assert _files(out) == before  # not a byte or a timestamp changed: no re-evaluation, no new row, no rewrite

    assert main(["train", "--recipe", str(out / CONFIG_FILE), "--resume", "--max-steps", str(MORE)]) == 0
    err = capsys.readouterr().err
    assert f"resuming with a new budget: max_steps {STEPS} -> {MORE}" in err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2, 3, 3]  # each step's row, and the final evaluation's row after steps 2 and 3
    assert steps[-1] == MORE


def test_a_reward_fault_before_the_first_update_saves_no_copy_of_the_base_model(
    tiny_llama_chat, tiny_prompts, tmp_path, capsys
):
    broken = tmp_path / "broken.py"
    broken.write_text(  # passes the set-up's trial on one empty completion, then fails on the first real batch
        "calls = []\ndef reward(prompts, completions, **kw):\n    calls.append(1)\n"
        "    if len(calls) > 1:\n        raise RuntimeError('oops')\n    return [0.0] * len(completions)\n"
    )
    out = tmp_path / "run"
    config = tiny_config(tiny_llama_chat, tiny_prompts, out, rewards=(f"{broken}:reward",), reward_fault="error")
    code = main(["train", *_flags(config)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "nothing trained yet, so nothing saved" in err and "oops" in err
    assert not (out / "checkpoints").exists() and not (out / "final").exists()


def test_checkpoint_files_get_the_usual_modes(finished_run):
    out, _ = finished_run
    umask = os.umask(0)
    os.umask(umask)
    for path in [out / "final", *(out / "final").rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, (path, oct(mode))


def test_the_progress_line_says_when_steps_run_far_slower_than_the_runs_own(monkeypatch):
    from policygrad import threads

    slow = threads.SlowSteps()
    monkeypatch.setattr(threads, "_load", lambda: 3.0)
    monkeypatch.setattr(threads, "_usable_cpus", lambda: 2)
    assert [slow.note(s) for s in (10.0, 11.0, 12.0)] == ["", "", ""]
    warning = slow.note(60.0)
    assert warning.startswith("6x slower: CPU shared (load 3.0 on 2 cores")
    monkeypatch.setattr(threads, "_load", lambda: 1.0)  # slow, but not for want of a CPU: no word
    assert slow.note(60.0) == ""


def _flags(config) -> list[str]:
    """The command-line flags of a tiny config's fields that tests set."""
    values = config_to_dict(config)
    args = []
    for name in ("model", "prompts", "output_dir", "heldout_prompts", "prompts_per_step", "group_size"):
        args += [f"--{name.replace('_', '-')}", str(values[name])]
    for name in ("max_new_tokens", "max_steps", "micro_batch_size", "eval_size", "threads", "precision", "device"):
        args += [f"--{name.replace('_', '-')}", str(values[name])]
    args += ["--rewards", *values["rewards"], "--eval-decoding", *values["eval_decoding"], "--no-progress"]
    return args


def _fault_table_rows() -> list:
    Row = fault_table.Row
    return [
        Row("Reward function raises on the first batch of a run", "train", "1", [], "nothing"),
        Row("`--resume` of a finished run", "train", "2", [STEPS, 0, STEPS, MORE, MORE], "nothing"),
    ]


def test_the_fault_table_rows_are_these_tests():
    """docs/reliability.md's rows for this file say, cell by cell, what the tests above inject and assert."""
    fault_table.check("lm/test_first_hour.py", _fault_table_rows())


def test_the_fault_table_check_fails_on_any_changed_number():
    assert fault_table.check_catches_every_change("lm/test_first_hour.py", _fault_table_rows()) >= 5


def test_a_run_says_what_each_checkpoint_takes_on_disk(tiny_llama_chat, tiny_prompts, tmp_path, monkeypatch, capsys):
    """The embedded model's checkpoints are 0.5 GB, 1.6 GB with the optimiser state: a run says so once (here the
    threshold is lowered to the tiny model's size)."""
    from policygrad.lm import setup as setup_module

    monkeypatch.setattr(setup_module, "SAY_SIZE_ABOVE", 0)
    train(tiny_config(tiny_llama_chat, tiny_prompts, tmp_path / "a", max_steps=1, keep_checkpoints=2))
    said = [line for line in capsys.readouterr().err.splitlines() if "each checkpoint takes" in line]
    assert len(said) == 1 and "weights and AdamW's state, for an exact resume; --no-save-optimizer:" in said[0]
    assert said[0].endswith("up to 2 kept besides final/")
    train(tiny_config(tiny_llama_chat, tiny_prompts, tmp_path / "b", max_steps=1, save_optimizer=False))
    assert "weights only (save_optimizer: false" in capsys.readouterr().err
