"""policygrad.lm.trainer: training end to end on tiny random models built in conftest.py (no network): the run it
writes, the overwrite/resume policy, variants, reward errors, the truncated reward."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lm_helpers import tiny_config, weights  # tests/lm, on sys.path under pytest's default import mode

from policygrad.errors import UsageError
from policygrad.lm.config import load_config
from policygrad.lm.trainer import train

pytestmark = pytest.mark.smoke

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


# ------------------------------------------------------------------------------------------------------------------
# Training end to end
# ------------------------------------------------------------------------------------------------------------------


def test_train_end_to_end_changes_the_model_and_writes_the_run(tiny_llama_chat, tiny_prompts, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = tiny_config(
        tiny_llama_chat,
        tiny_prompts,
        tmp_path / "run",
        eval_decoding=("greedy",),
        save_every=1,
        entropy_weight="dynamic",
        entropy_coef=1e-3,
    )
    run_dir = train(config)
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoints",
        "completions.jsonl",
        "config.yaml",
        "eval.json",
        "final",
        "metrics.jsonl",
        "tensorboard",
    ]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 2]  # two steps, then the final evaluation
    for key in (
        "reward_mean",
        "reward_std",
        "advantage_std",
        "entropy",
        "entropy_weight",
        "grad_norm",
        "completion_tokens",
        "pass_rate",
        "tokens_per_s",
        "step_time",
    ):
        assert math.isfinite(records[0][key]), key
    assert "eval/greedy/pass_rate" in records[-1]
    for record in records[:2]:  # the groups with no reward spread, out of the step's prompts_per_step
        assert record["zero_spread_groups"] in [k / config.prompts_per_step for k in range(config.prompts_per_step + 1)]
    assert len((run_dir / "completions.jsonl").read_text().splitlines()) == 2 * config.log_completions
    assert load_config(run_dir / "config.yaml") == config  # the resolved config reloads as itself

    initial, final = weights(tiny_llama_chat), weights(run_dir / "final")
    assert any(not torch.equal(initial[name], final[name]) for name in final)
    # a plain transformers load of the checkpoint gives the same weights and a working tokenizer
    reloaded = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, final[name] if name in final else final["model.embed_tokens.weight"]), name
    assert AutoTokenizer.from_pretrained(run_dir / "final").encode("ab", add_special_tokens=False) == [
        *AutoTokenizer.from_pretrained(tiny_llama_chat).encode("ab", add_special_tokens=False)
    ]
    assert (run_dir / "checkpoints" / "step-000001" / "model.safetensors").is_file()


def test_existing_run_is_refused_then_overwritten_or_resumed(tiny_llama_chat, tiny_prompts, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_llama_chat, tiny_prompts, out, max_steps=1))
    with pytest.raises(UsageError, match="already holds a run") as info:
        train(tiny_config(tiny_llama_chat, tiny_prompts, out, max_steps=1))
    assert str(info.value).startswith("--output-dir: ")
    resumed = train(tiny_config(tiny_llama_chat, tiny_prompts, out, max_steps=2, resume=True))
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # continued from the step-1 checkpoint, log appended
    train(tiny_config(tiny_llama_chat, tiny_prompts, out, max_steps=1, overwrite=True))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1

    stranger = tmp_path / "not-a-run"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="holds no policygrad run"):
        train(tiny_config(tiny_llama_chat, tiny_prompts, stranger, overwrite=True))
    assert (stranger / "notes.txt").read_text() == "mine"


def test_train_variants_base_model_kl_clipping_bfloat16(tiny_qwen_base, tiny_prompts, tmp_path):
    run_dir = train(
        tiny_config(
            tiny_qwen_base,
            tiny_prompts,
            tmp_path / "run",
            advantage="reinforce",
            kl_coef=0.1,
            kl_estimator="k2",
            updates_per_batch=2,
            clip_eps_high=0.28,
            precision="bfloat16",
            aggregation="sequence_mean",
            rewards=("binary", "shaped=0.5"),
        )
    )
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("kl", "clip_fraction", "ratio_mean", "baseline", "reward/binary", "reward/shaped"):
        assert key in record and math.isfinite(record[key]), key
    assert record["baseline"] != 0.0
    # the last of two updates: off the sampling policy and off the reference (the exact values: test_update_math.py)
    assert abs(record["ratio_mean"] - 1.0) > 1e-3 and record["kl"] > 1e-3  # more than rounding


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_truncated_importance_sampling_measures_the_samplers_gap(precision, tiny_llama_chat, tiny_prompts, tmp_path):
    # the sampler (cached one-token decoding steps) and the trainer's log-prob pass (one forward pass over each
    # completion) compute the same probabilities with other kernels; on this tiny model they agree to rounding
    # (5e-8 nats per token when recorded, in both precisions, on CPUs with bfloat16 units; 1.9e-5 under bfloat16
    # on an AMD EPYC without them, whose bfloat16 products are emulated), so every weight is 1 and none is capped
    config = tiny_config(tiny_llama_chat, tiny_prompts, tmp_path / "run", tis_cap=2.0, precision=precision)
    records = [json.loads(line) for line in (train(config) / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "tis/logprob_gap" in record] == [1, 2]  # every step
    bound = 1e-5 if precision == "float32" else 1e-3  # bfloat16 keeps 8 bits: its rounding is 4e-3 relative
    for record in records:
        assert 0.0 <= record["tis/logprob_gap"] < bound
        assert record["tis/weight_mean"] == pytest.approx(1.0, abs=bound) and record["tis/capped_fraction"] == 0.0


def test_reward_error_during_training_is_one_line(tiny_llama_chat, tiny_prompts, tmp_path):
    rewards_file = tmp_path / "bad.py"
    rewards_file.write_text("def bad(prompts, completions, **fields):\n    return [1.0]\n")
    with pytest.raises(UsageError, match=r"reward .*bad.py:bad: returned 1 rewards for 6 completions"):
        train(tiny_config(tiny_llama_chat, tiny_prompts, tmp_path / "run", rewards=(f"{rewards_file}:bad",)))


def test_resume_continues_exactly_where_the_run_stopped(tiny_llama_chat, tiny_prompts, tmp_path):
    straight = train(
        tiny_config(tiny_llama_chat, tiny_prompts, tmp_path / "straight", max_steps=3, advantage="reinforce")
    )
    split = tmp_path / "split"
    train(tiny_config(tiny_llama_chat, tiny_prompts, split, max_steps=1, advantage="reinforce"))
    train(tiny_config(tiny_llama_chat, tiny_prompts, split, max_steps=3, advantage="reinforce", resume=True))
    expected, resumed = weights(straight / "final"), weights(split / "final")
    for name, tensor in expected.items():
        assert torch.allclose(resumed[name], tensor, atol=1e-6), name  # same prompts, samples, AdamW moments, baseline
    rewards = [
        [json.loads(line)["reward_mean"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        for run in (straight, split)
    ]
    assert rewards[0] == rewards[1]


def test_truncated_reward_replaces_the_reward_of_completions_cut_off(tiny_llama_chat, tiny_prompts, tmp_path):
    reward = tmp_path / "half.py"
    reward.write_text("def half(prompts, completions, **fields):\n    return [0.5] * len(completions)\n")
    run = train(
        tiny_config(
            tiny_llama_chat,
            tiny_prompts,
            tmp_path / "run",
            rewards=(f"{reward}:half",),
            truncated_reward=-1.0,
            max_new_tokens=3,
            max_steps=3,
        )
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "truncated" in line]
    assert any(r["truncated"] > 0 for r in records)
    for r in records:  # -1 for the rows cut off at 3 tokens, 0.5 for the rows that ended with EOS
        assert r["reward_mean"] == pytest.approx(-1.0 * r["truncated"] + 0.5 * (1 - r["truncated"]))


def _parity_reward(folder: Path) -> Path:
    """A reward file whose prompts of even-numbered notes all score 0 (no spread) and odd ones score by length."""
    reward = folder / "parity.py"
    reward.write_text(
        "import re\n"
        "def parity(prompts, completions, **fields):\n"
        "    odd = [int(re.search(r'Note (\\d+)', p).group(1)) % 2 for p in prompts]\n"
        "    return [float(len(c)) if o else 0.0 for o, c in zip(odd, completions)]\n"
    )
    return reward


def test_dynamic_sampling_replaces_groups_without_spread_and_resumes_exactly(tiny_llama_chat, tiny_prompts, tmp_path):
    """Prompts of even-numbered notes all score 0 (no spread); odd ones score by length (spread). With dynamic
    sampling the batch trained on keeps B groups, swaps flat groups for fresh ones within the budget, counts the extra
    groups, and a resumed run draws the same fresh prompts."""
    reward = _parity_reward(tmp_path)
    settings = dict(rewards=(f"{reward}:parity",), max_extra_groups=3, max_new_tokens=6, log_completions=100)
    straight = train(tiny_config(tiny_llama_chat, tiny_prompts, tmp_path / "straight", max_steps=4, **settings))
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert any(r["dynamic/first_zero_spread"] > 0 for r in records)
    for r in records:
        assert 0 <= r["dynamic/extra_groups"] <= 3
        assert r["zero_spread_groups"] <= r["dynamic/first_zero_spread"]
        if r["dynamic/first_zero_spread"] == 0:
            assert r["dynamic/extra_groups"] == 0  # nothing to replace, nothing extra sampled
    rows = [json.loads(line) for line in (straight / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 2 * 3  # still B groups of G each step
    split = tmp_path / "split"
    train(tiny_config(tiny_llama_chat, tiny_prompts, split, max_steps=2, **settings))
    train(tiny_config(tiny_llama_chat, tiny_prompts, split, max_steps=4, resume=True, **settings))
    for name, tensor in weights(straight / "final").items():
        assert torch.equal(weights(split / "final")[name], tensor), name


def test_redraws_sample_the_flat_prompts_again_hotter_and_score_them_as_the_training_policy(
    tiny_llama_chat, tiny_prompts, tmp_path, monkeypatch
):
    """retry_temperature: the extra draws are the step's own prompts whose groups had no spread (even-numbered notes
    under the parity reward), drawn at the retry temperature; their log-probs are scored at the training one, and
    with tis_cap the update gets importance weights for them."""
    from policygrad.lm import rollout as rollout_module
    from policygrad.lm import trainer
    from policygrad.lm.setup import Run

    reward = _parity_reward(tmp_path)
    calls, scored_at, weighted = [], [], []
    sample, logprobs, correction = Run.sample, rollout_module.rollout_logprobs, trainer.importance_correction

    def spy_sample(self, prompts, step, numbers, temperature=None):
        calls.append((step, list(prompts), temperature))
        return sample(self, prompts, step, numbers, temperature)

    def spy_logprobs(model, rollout, temperature, *args):
        scored_at.append(temperature)
        return logprobs(model, rollout, temperature, *args)

    def spy_correction(run, rollout):
        weights, tis = correction(run, rollout)
        weighted.append(weights)
        return weights, tis

    monkeypatch.setattr(Run, "sample", spy_sample)
    monkeypatch.setattr(rollout_module, "rollout_logprobs", spy_logprobs)
    monkeypatch.setattr(trainer, "importance_correction", spy_correction)
    settings = dict(rewards=(f"{reward}:parity",), max_extra_groups=3, max_new_tokens=6, temperature=0.7, max_steps=3)
    run_dir = train(
        tiny_config(tiny_llama_chat, tiny_prompts, tmp_path / "run", retry_temperature=1.5, tis_cap=2.0, **settings)
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    redrawn = [(step, prompts, t) for step, prompts, t in calls if t is not None]
    assert redrawn and all(t == 1.5 for _, _, t in redrawn)
    for step, prompts, _ in redrawn:  # the step's own prompts (those whose groups were flat), none fresh
        assert prompts and set(prompts) <= set(next(p for s, p, t in calls if s == step and t is None))
    evens = [p for s, p, t in calls if t is None for p in p if int(p.split("Note ")[1].split(":")[0]) % 2 == 0]
    assert set(evens) <= {p for _, prompts, _ in redrawn for p in prompts}  # a flat group is always redrawn
    for r in records:
        assert 0 <= r["dynamic/extra_with_spread"] <= r["dynamic/extra_groups"] <= 3
    assert set(scored_at) == {0.7}  # every group, hot or not, scored as the training policy
    assert all(w is not None for w in weighted)
