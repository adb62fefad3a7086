"""policygrad.runs: the run folder's policy, the same for `policygrad train` and `policygrad control`."""

from __future__ import annotations

import json

import pytest
import yaml

from policygrad import runs
from policygrad.errors import UsageError

pytestmark = pytest.mark.exact


def test_a_new_folder_is_created_with_the_settings_and_the_invocation_fields_cleared(tmp_path):
    out = tmp_path / "a" / "run"
    settings = {"lr": 0.1, "resume": True, "overwrite": True, "allow_config_change": True}
    assert runs.prepare_output_dir(out, resume=False, overwrite=False, settings=settings) == out
    saved = yaml.safe_load((out / runs.CONFIG_FILE).read_text())
    assert saved == {"lr": 0.1, "resume": False, "overwrite": False, "allow_config_change": False}
    assert [p.name for p in out.iterdir()] == [runs.CONFIG_FILE]  # no temporary file left


def test_a_folder_holding_a_run_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    runs.prepare_output_dir(out, False, False, {"lr": 0.1})
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UsageError, match=r"--output-dir: .* already holds a run; pass --resume .* or --overwrite"):
        runs.check_output_dir(out, resume=False, overwrite=False)
    assert runs.check_output_dir(out, resume=True, overwrite=False) is True
    runs.prepare_output_dir(out, resume=False, overwrite=True, settings={"lr": 0.2})
    assert sorted(p.name for p in out.iterdir()) == [runs.CONFIG_FILE]  # the old run is gone
    assert yaml.safe_load((out / runs.CONFIG_FILE).read_text()) == {"lr": 0.2}


def test_a_folder_that_is_not_a_run_is_never_deleted(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for resume, overwrite in ((False, False), (False, True)):
        with pytest.raises(UsageError, match="is not empty and holds no policygrad run"):
            runs.check_output_dir(tmp_path, resume, overwrite)
    with pytest.raises(UsageError, match="--resume: .* holds no run to resume"):
        runs.check_output_dir(tmp_path, True, False)
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="--output-dir: .* is a file"):
        runs.check_output_dir(tmp_path / "file", False, False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_config_changes_name_each_field_and_leave_out_what_may_change():
    saved = {"lr": 0.01, "group_size": 3, "threads": 1, "resume": False}
    now = {"lr": 0.03, "group_size": 3, "threads": 2, "resume": True, "new_field": 1}
    assert runs.config_changes(saved, now, may_change={"threads"}) == ["lr 0.01 -> 0.03"]
    long = {"prompts": "x" * 80}
    (change,) = runs.config_changes({"prompts": "y"}, long, ())
    assert change == 'prompts "y" -> "' + "x" * 36 + "..."  # a value is quoted in 40 characters at most


def test_truncate_jsonl_keeps_the_steps_a_checkpoint_has_seen_byte_for_byte(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = ['{"step": 1, "x": NaN}', '{"step": 2, "x": 0.1}', '{"step": 3, "x": 0.2}', '{"step": 4, "x"']
    path.write_text("\n".join(lines))
    kept = runs.truncate_jsonl(path, 2)
    assert path.read_text() == lines[0] + "\n" + lines[1] + "\n"
    assert [record["step"] for record in kept] == [1, 2]
    assert runs.truncate_jsonl(tmp_path / "missing.jsonl", 2) == []


def test_checkpoint_names_and_the_resume_command(tmp_path):
    assert runs.checkpoint_dir(tmp_path, 42) == tmp_path / "checkpoints" / "step-000042"
    out = tmp_path / "my run"
    assert runs.resume_command("control", out) == f"policygrad control --recipe '{out}/config.yaml' --resume"


def test_latest_checkpoint_tidies_only_when_asked(tmp_path):
    from policygrad import checkpointing

    for step in (1, 2):
        checkpointing.save_atomic(runs.checkpoint_dir(tmp_path, step), lambda tmp: (tmp / "w").write_text("w"), step)
    half = tmp_path / "checkpoints" / ".step-000003.tmp-1"
    half.mkdir()
    assert runs.latest_checkpoint(tmp_path) == runs.checkpoint_dir(tmp_path, 2)
    assert half.exists()  # a reader of a live run leaves a save in progress alone
    assert runs.latest_checkpoint(tmp_path, tidy=True) == runs.checkpoint_dir(tmp_path, 2)
    assert not half.exists()


def test_write_atomic_replaces_the_whole_file(tmp_path):
    path = tmp_path / "eval.json"
    runs.write_atomic(path, json.dumps({"a": 1}))
    runs.write_atomic(path, "second")
    assert path.read_text() == "second" and [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_the_resume_command_names_the_program_as_it_was_started(tmp_path, monkeypatch):
    """After `make`, .venv/bin is not on the PATH: the printed resume command must start with a program that runs."""
    script = tmp_path / "venv" / "bin" / "policygrad"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr("sys.argv", [str(script), "train"])
    assert runs.program() == str(script)
    assert runs.resume_command("train", tmp_path / "r").startswith(f"{script} train --recipe ")
    monkeypatch.setenv("PATH", str(script.parent))  # the same program on the PATH: its short name
    assert runs.program() == "policygrad"
    monkeypatch.setattr("sys.argv", ["/somewhere/policygrad/__main__.py"])  # python -m policygrad
    assert runs.program().endswith(" -m policygrad")
    monkeypatch.setattr("sys.argv", ["/usr/lib/python3/pytest/__main__.py"])  # in-process
    assert runs.program() == "policygrad"
