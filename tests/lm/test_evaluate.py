"""policygrad.lm.evaluate: the task's rates, cut-off completions, `policygrad eval`."""

from __future__ import annotations

import json

import pytest
import torch
from lm_helpers import tiny_config  # tests/lm, on sys.path under pytest's default import mode

from policygrad.lm.models import load_model


@pytest.mark.exact
def test_evaluate_docstrings_run():
    import doctest

    from policygrad.lm import evaluate

    assert doctest.testmod(evaluate).failed == 0


@pytest.mark.exact
@pytest.mark.parametrize("eos_boost, expected", [(50.0, 0.0), (-50.0, 1.0)])
def test_evaluation_counts_completions_cut_off_by_max_new_tokens(tiny_llama_chat, eos_boost, expected):
    from policygrad.lm.evaluate import EvalSettings, evaluate
    from policygrad.lm.rewards import load_rewards

    model, tokenizer = load_model(str(tiny_llama_chat))
    boost = torch.zeros(len(tokenizer))
    boost[tokenizer.eos_token_id] = eos_boost  # +50: EOS first, nothing is cut off; -50: never EOS, all are
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + boost)
    records = [{"prompt": f"p{i}", "target_length": 4, "target_digit_sum": 0} for i in range(6)]
    settings = EvalSettings(decodings=("sampled",), max_new_tokens=4)
    result = evaluate(model.eval(), tokenizer, records, load_rewards(("binary",)), settings)
    assert result["sampled"]["truncated_rate"] == expected
    assert result["sampled"]["mean_length"] == (0.0 if expected == 0.0 else pytest.approx(4.0, abs=1.0))


@pytest.mark.smoke
def test_run_eval_prints_rates_for_both_decodings(tiny_llama_chat, tiny_prompts, tmp_path, capsys):
    from policygrad.lm.config import EvalConfig
    from policygrad.lm.evaluate import run_eval

    config = tiny_config(
        tiny_llama_chat,
        tiny_prompts,
        tmp_path / "unused",
        heldout_prompts=3,
        eval_size=3,
        eval_decoding=("greedy", "sampled"),
        rewards=("binary",),
    )
    assert run_eval(EvalConfig.of(config, json=True)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompts"] == 3
    for decoding in ("greedy", "sampled"):
        assert set(report[decoding]) >= {"pass_rate", "length_rate", "digits_rate", "mean_reward", "examples"}
        assert len(report[decoding]["examples"]) == 3
        rewards = report[decoding]["rewards"]  # every prompt's, in order: the examples' and the mean's
        assert rewards[:3] == [example["reward"] for example in report[decoding]["examples"]]
        assert sum(rewards) / 3 == pytest.approx(report[decoding]["mean_reward"], rel=1e-12)
        parts = report[decoding]["by_part"]  # the rates of each digit-sum target, adding up to the whole
        assert list(parts) == sorted(parts, key=lambda part: int(part[2:])) and all(p.startswith("S=") for p in parts)
        assert sum(part["prompts"] for part in parts.values()) == 3
        passed = sum(part["pass_rate"] * part["prompts"] for part in parts.values())
        assert passed == pytest.approx(report[decoding]["pass_rate"] * 3)
    assert not (tmp_path / "unused").exists()  # evaluation writes no run directory


@pytest.mark.exact
def test_policygrad_eval_gives_the_numbers_of_the_step0_evaluation_in_train(tiny_llama_chat, tiny_prompts, tmp_path):
    """The same untrained model scored by `policygrad eval` and by `policygrad train` before its first step: the same
    batches, threads and precision, so the same numbers to the last digit (issue 14 found them apart when `eval`
    ignored --threads)."""
    import dataclasses

    from policygrad.lm.evaluate import evaluate_heldout
    from policygrad.lm.metrics import flat_scalars
    from policygrad.lm.trainer import train

    config = tiny_config(
        tiny_llama_chat, tiny_prompts, tmp_path / "run", eval_every=1, eval_decoding=("greedy", "sampled"), max_steps=1
    )
    step0 = json.loads((train(config) / "metrics.jsonl").read_text().splitlines()[0])
    assert step0.pop("step") == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # eval must set the config's thread count itself
    try:
        result = evaluate_heldout(dataclasses.replace(config, model=str(tiny_llama_chat)))
        assert torch.get_num_threads() == config.threads
    finally:
        torch.set_num_threads(threads)
    assert flat_scalars({d: result[d] for d in config.eval_decoding}) == step0
