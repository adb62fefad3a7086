"""`policygrad train` and `policygrad eval` through the real command, on a tiny local model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.smoke

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

POLICYGRAD = str(Path(sys.executable).with_name("policygrad"))
TINY = [
    "--heldout-prompts",
    "2",
    "--prompts-per-step",
    "2",
    "--group-size",
    "3",
    "--max-new-tokens",
    "8",
    "--lr",
    "1e-2",
    "--max-steps",
    "2",
    "--micro-batch-size",
    "4",
    "--eval-size",
    "2",
    "--device",
    "cpu",
    "--threads",
    "1",
    "--no-progress",
]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([POLICYGRAD, *args], capture_output=True, text=True, timeout=600)


def test_train_through_the_cli_changes_the_model_then_eval_reads_it(tiny_llama_chat, tiny_prompts, tmp_path):
    out = tmp_path / "run"
    result = run(
        "train", "--model", str(tiny_llama_chat), "--prompts", str(tiny_prompts), "--output-dir", str(out), *TINY
    )
    assert result.returncode == 0, result.stderr
    before, after = (
        load_file(str(tiny_llama_chat / "model.safetensors")),
        load_file(str(out / "final" / "model.safetensors")),
    )
    assert any(not torch.equal(before[name], after[name]) for name in after)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()][:2] == [1, 2]

    # the same output folder again: refused, one line, nothing lost
    files = {path: path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}
    again = run(
        "train", "--model", str(tiny_llama_chat), "--prompts", str(tiny_prompts), "--output-dir", str(out), *TINY
    )
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1 and "Traceback" not in again.stderr
    kept = load_file(str(out / "final" / "model.safetensors"))
    assert kept.keys() == after.keys()
    for name in after:  # every trained tensor as it was, bit for bit
        assert torch.equal(kept[name], after[name]), name
    assert {path: path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()} == files  # and every file

    # the run's checkpoint is evaluated on the run's own task (its config.yaml), said in one line
    evaluated = run("eval", "--model", str(out / "final"), "--json", "--no-progress")
    assert evaluated.returncode == 0, evaluated.stderr
    assert evaluated.stderr.strip().splitlines() == [
        line for line in evaluated.stderr.strip().splitlines() if line.startswith("policygrad eval: the task of ")
    ]
    report = json.loads(evaluated.stdout)
    assert report["prompts"] == 2 and "pass_rate" in report["greedy"]  # --heldout-prompts 2 of the run


@pytest.mark.parametrize(
    "args, names",
    [
        (["--model", "/no/such/model"], "/no/such/model"),
        (["--prompts", "/no/such/prompts.jsonl"], "prompts.jsonl"),
        (["--group-size", "0"], "--group-size"),
        (["--rewards", "no_such_module:fn"], "no_such_module"),
    ],
)
def test_bad_training_input_is_one_line(args, names, tiny_llama_chat, tiny_prompts, tmp_path):
    base = ["--model", str(tiny_llama_chat), "--prompts", str(tiny_prompts), "--output-dir", str(tmp_path / "r")]
    result = run("train", *base, *TINY, *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and names in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "r").exists()  # a run that could not start leaves no folder that blocks the next try
