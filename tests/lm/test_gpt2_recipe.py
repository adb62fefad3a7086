"""recipes/gpt2.yaml end to end (issue 19, item 4): the seed's GPT-2 variant (batch 8, a 32-character target, plain
prompts without a chat template) on a tiny model of GPT-2's architecture with a GPT-2-style tokenizer built here (the
hub is out of reach); only ``--model``, the run's length and the evaluation's size differ from the recipe as shipped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_models import save_tiny_gpt2

ROOT = Path(__file__).resolve().parents[2]
POLICYGRAD = str(Path(sys.executable).with_name("policygrad"))


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([POLICYGRAD, *args], capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.smoke
def test_the_gpt2_recipe_trains_and_evaluates_a_gpt2_model_on_plain_prompts(tiny_gpt2, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from policygrad.lm.models import format_prompt

    assert AutoConfig.from_pretrained(tiny_gpt2).model_type == "gpt2"
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    assert tokenizer.chat_template is None and tokenizer.pad_token is None  # as the hub's gpt2

    out = tmp_path / "gpt2"
    flags = (
        "--model",
        str(tiny_gpt2),
        "--output-dir",
        str(out),
        "--max-steps",
        "1",
        "--eval-size",
        "10",
        "--no-progress",
    )
    trained = run("train", "--recipe", "recipes/gpt2.yaml", *flags)
    assert trained.returncode == 0, trained.stderr
    assert "Traceback" not in trained.stderr and "Warning" not in trained.stderr, trained.stderr

    recipe = yaml.safe_load((ROOT / "recipes" / "gpt2.yaml").read_text())
    config = yaml.safe_load((out / "config.yaml").read_text())
    changed = ("model", "output_dir", "eval_size")
    assert {key: config[key] for key in recipe if key not in changed} == {
        key: value for key, value in recipe.items() if key not in changed
    }  # the recipe as shipped: batch 8, group 8, a 32-character target, 32 new tokens
    assert (config["prompts_per_step"], config["target_length"]) == (8, 32)

    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "reward_mean" in s] == [1]
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    for row in rows:  # the model sees the prompt as it is: no chat markup around it, a 32-character target
        assert format_prompt(tokenizer, row["prompt"]) == row["prompt"]
        assert "32" in row["prompt"] and "<|" not in row["prompt"], row["prompt"]
    final = json.loads((out / "eval.json").read_text())
    assert final["prompts"] == 10 and 0 <= final["greedy"]["mean_reward"] <= 1

    evaluated = run("eval", "--model", str(out / "final"), "--json", "--no-progress", "--eval-size", "4")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["prompts"] == 4
