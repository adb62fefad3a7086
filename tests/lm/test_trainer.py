"""Rollout, loss, trainer, config and recipes, on tiny random models built in conftest.py (no network)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lm_helpers import eos_boosted, tiny_config, weights  # tests/lm, on sys.path under pytest's default import mode

from policygrad.advantages import group_advantages
from policygrad.errors import UsageError
from policygrad.lm import config as config_module
from policygrad.lm.config import GRPOConfig, load_config
from policygrad.lm.models import load_model
from policygrad.lm.rollout import completion_mask, sample, sequence_logprobs
from policygrad.lm.trainer import train
from policygrad.lm.update import ADVANTAGES, ENTROPY_WEIGHTS, grpo_loss, micro_batch_share

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


# ------------------------------------------------------------------------------------------------------------------
# Rollout
# ------------------------------------------------------------------------------------------------------------------


def test_completion_mask_ends_at_and_includes_the_first_eos():
    eos, pad = 1, 0
    ids = torch.tensor(
        [
            [5, 6, eos, pad, pad],  # stops at the EOS, which counts
            [eos, pad, pad, pad, pad],  # an immediate stop is one token
            [5, 6, 7, 8, 9],  # cut off by max_new_tokens: all count
            [5, eos, 6, eos, 7],  # only the first EOS matters
        ]
    )
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    assert torch.equal(completion_mask(ids, [eos]), expected)
    two_stops = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])  # 7 also ends
    assert torch.equal(completion_mask(ids, [eos, 7]), two_stops)


@pytest.fixture
def eager_eos_model(tiny_llama_chat):
    """The tiny Llama with +2 on the EOS logit, so sampled completions end early and at different lengths."""
    return eos_boosted(tiny_llama_chat, 2.0)


def test_sample_layout_masks_and_logprobs(eager_eos_model):
    model, tokenizer = eager_eos_model
    torch.manual_seed(0)
    prompts = ["hi", "a much longer prompt"]
    rollout = sample(model, tokenizer, prompts, group_size=3, max_new_tokens=12, temperature=0.7, micro_batch_size=4)
    n, t = rollout.completion_ids.shape
    assert n == 6 and t <= 12
    assert rollout.prompts == ["hi"] * 3 + ["a much longer prompt"] * 3  # groups are consecutive rows
    assert rollout.prompt_ids.shape == rollout.prompt_mask.shape == (6, rollout.completion_start)
    assert rollout.prompt_mask[0, 0] == 0 and rollout.prompt_mask[:, -1].all()  # left padding
    assert torch.equal(rollout.completion_mask, completion_mask(rollout.completion_ids, [tokenizer.eos_token_id]))
    lengths = rollout.completion_lengths.tolist()
    assert len(set(lengths)) > 1  # some stopped early, at different places
    for row, length in enumerate(lengths):
        ids = rollout.completion_ids[row]
        if length < t:
            assert ids[length - 1] == tokenizer.eos_token_id  # the mask ends ON the EOS
        assert rollout.completions[row] == tokenizer.decode(ids[:length], skip_special_tokens=True)
    # the stored log-probs are those of the sampling distribution (temperature included), zero where masked
    logprobs, entropies = sequence_logprobs(
        model, rollout.input_ids, rollout.attention_mask, rollout.completion_start, temperature=0.7
    )
    assert logprobs.shape == entropies.shape == (6, t)
    assert torch.allclose(rollout.logprobs, logprobs * rollout.completion_mask, atol=1e-5)
    assert (rollout.logprobs[rollout.completion_mask == 0] == 0).all()


def test_sequence_logprobs_match_generate_scores_with_left_padding(tiny_qwen_base):
    model, tokenizer = load_model(str(tiny_qwen_base))
    model.eval()
    tokenizer.padding_side = "left"
    encoded = tokenizer(["x", "a longer prompt here"], return_tensors="pt", padding=True)
    out = model.generate(
        **encoded,
        max_new_tokens=6,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    start = encoded["input_ids"].shape[1]
    completion = out.sequences[:, start:]  # (2, T)
    expected = torch.stack(
        [
            torch.log_softmax(step.float(), -1).gather(1, completion[:, i : i + 1]).squeeze(1)
            for i, step in enumerate(out.logits)
        ],
        dim=1,
    )  # (2, T)
    mask = completion_mask(completion, [tokenizer.eos_token_id])
    attention = torch.cat([encoded["attention_mask"], mask], dim=1)
    with torch.no_grad():
        logprobs, _ = sequence_logprobs(model, out.sequences, attention, start)
    assert torch.allclose(logprobs * mask, expected * mask, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------------
# Loss and advantages on a fixed batch
# ------------------------------------------------------------------------------------------------------------------

LOGPROBS = [[-1.0, -2.0, -0.5], [-0.3, -9.0, -9.0], [-1.5, -0.2, -0.7], [-2.0, -1.0, -9.0]]
MASK = [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]
REWARDS = [1.0, 0.0, 0.0, 1.0]  # one group of G = 4


def test_group_advantages_by_hand():
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # mean 0.5, Bessel std sqrt(4 * 0.25 / 3)
    advantages = group_advantages(torch.tensor(REWARDS), 4)
    assert torch.allclose(advantages, torch.tensor([a, -a, -a, a]), atol=1e-6)


def test_grpo_loss_by_hand():
    logprobs = torch.tensor(LOGPROBS, requires_grad=True)
    mask = torch.tensor(MASK)
    advantages = group_advantages(torch.tensor(REWARDS), 4)
    entropies = torch.full((4, 3), 2.0)
    ref = torch.tensor(LOGPROBS) - 0.1  # d = logprobs - ref = 0.1 everywhere
    loss, metrics = grpo_loss(
        logprobs, entropies, mask, advantages, ref_logprobs=ref, entropy_weight=0.01, kl_coef=0.5, kl_estimator="k3"
    )
    tokens = sum(map(sum, MASK))
    pg = (
        -sum(advantages[i].item() * LOGPROBS[i][t] for i in range(4) for t in range(3) if MASK[i][t]) / tokens
    )  # token_mean REINFORCE
    k3 = math.expm1(-0.1) + 0.1
    assert metrics["pg_loss"] == pytest.approx(pg, rel=1e-6)
    assert metrics["entropy"] == pytest.approx(2.0)
    assert metrics["kl"] == pytest.approx(k3, rel=1e-5)
    assert loss.item() == pytest.approx(pg - 0.01 * 2.0 + 0.5 * k3, rel=1e-6)
    loss.backward()
    # d loss / d logprob_it = -A_i / tokens + beta * (1 - exp(-d)) / tokens on counted tokens, 0 elsewhere
    for i in range(4):
        for t in range(3):
            grad = (-advantages[i].item() + 0.5 * (1 - math.exp(-0.1))) / tokens if MASK[i][t] else 0.0
            assert logprobs.grad[i, t].item() == pytest.approx(grad, abs=1e-7)


def test_clipped_loss_at_ratio_one_has_the_reinforce_gradient():
    advantages = group_advantages(torch.tensor(REWARDS), 4)
    mask = torch.tensor(MASK)
    grads = []
    for old in (None, torch.tensor(LOGPROBS)):
        logprobs = torch.tensor(LOGPROBS, requires_grad=True)
        loss, _ = grpo_loss(logprobs, torch.zeros(4, 3), mask, advantages, old_logprobs=old)
        loss.backward()
        grads.append(logprobs.grad)
    assert torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "constant"])
def test_micro_batches_accumulate_to_the_full_batch_gradient(aggregation):
    torch.manual_seed(0)
    logits = torch.randn(6, 5, 7, requires_grad=True)  # (N, T, V)
    tokens = torch.randint(0, 7, (6, 5))
    mask = torch.tensor(
        [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]
    )  # one empty row
    advantages = torch.randn(6)

    def loss_of(rows):
        logprobs = torch.log_softmax(logits[rows], -1).gather(2, tokens[rows].unsqueeze(-1)).squeeze(-1)
        entropies = -(torch.softmax(logits[rows], -1) * torch.log_softmax(logits[rows], -1)).sum(-1)
        loss, _ = grpo_loss(
            logprobs, entropies, mask[rows], advantages[rows], entropy_weight=0.1, aggregation=aggregation, max_len=5
        )
        return loss

    full = torch.autograd.grad(loss_of(slice(0, 6)), logits)[0]
    accumulated = sum(
        micro_batch_share(mask[rows], mask, aggregation) * loss_of(rows) for rows in (slice(0, 4), slice(4, 6))
    )
    assert torch.allclose(torch.autograd.grad(accumulated, logits)[0], full, atol=1e-6)


def test_advantage_variants_by_name():
    config = GRPOConfig(group_size=2, baseline_decay=0.5)
    rewards = torch.tensor([1.0, 0.0, 3.0, float("nan")])
    grpo, _ = ADVANTAGES["grpo"](rewards, config, 0.0)
    assert torch.allclose(grpo, torch.tensor([0.5 / (0.5**0.5 + 1e-4), -0.5 / (0.5**0.5 + 1e-4), 0, 0]))
    # the options reach the formula: (r - group mean) / (std + eps), std over the group, the batch or nothing
    four = torch.tensor([1.0, 0.0, 3.0, 1.0])  # batch std sqrt(19/12), group stds sqrt(1/2) and sqrt(2)
    for scale, divisor in (
        ("group", [0.5**0.5 + 0.5] * 2 + [2**0.5 + 0.5] * 2),
        ("batch", [(19 / 12) ** 0.5 + 0.5] * 4),
        ("none", [1.0] * 4),
    ):
        options = GRPOConfig(group_size=2, scale_rewards=scale, advantage_eps=0.5)
        advantages, _ = ADVANTAGES["grpo"](four, options, 0.0)
        assert torch.allclose(advantages, torch.tensor([0.5, -0.5, 1.0, -1.0]) / torch.tensor(divisor)), scale
    rloo, _ = ADVANTAGES["rloo"](rewards, config, 0.0)
    assert torch.allclose(rloo, torch.tensor([1.0, -1.0, 0.0, 0.0]))  # a group with one valid reward gives 0
    reinforce, baseline = ADVANTAGES["reinforce"](rewards, config, 1.0)
    assert torch.allclose(reinforce, torch.tensor([0.0, -1.0, 2.0, 0.0]))  # against the OLD baseline
    assert baseline == pytest.approx(0.5 * 1.0 + 0.5 * (4.0 / 3))
    dynamic = GRPOConfig(entropy_weight="dynamic", entropy_coef=1e-3, entropy_max_weight=1.0)
    assert ENTROPY_WEIGHTS["dynamic"](torch.tensor([0.0, 1.0]), dynamic) == pytest.approx(1e-3 / (0.5 + 0.01))


def test_variant_names_match_the_config_choices():
    assert tuple(ADVANTAGES) == config_module.ADVANTAGES
    assert tuple(ENTROPY_WEIGHTS) == config_module.ENTROPY_WEIGHTS


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


def test_reward_error_during_training_is_one_line(tiny_llama_chat, tiny_prompts, tmp_path):
    rewards_file = tmp_path / "bad.py"
    rewards_file.write_text("def bad(prompts, completions, **fields):\n    return [1.0]\n")
    with pytest.raises(UsageError, match=r"reward .*bad.py:bad: returned 1 rewards for 6 completions"):
        train(tiny_config(tiny_llama_chat, tiny_prompts, tmp_path / "run", rewards=(f"{rewards_file}:bad",)))


# ------------------------------------------------------------------------------------------------------------------
# Config and recipes
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_load(recipe):
    config = load_config(recipe)
    assert isinstance(config, GRPOConfig)


def test_reference_recipe_says_what_the_brief_says():
    config = load_config(RECIPES / "qwen2.5-0.5b.yaml")
    assert config.model == "Qwen/Qwen2.5-0.5B-Instruct" and config.prompts_per_step == 16
    assert config.scale_rewards == "batch" and config.entropy_weight == "dynamic"
    assert (config.lr, config.weight_decay, config.max_grad_norm, config.epochs) == (1e-5, 0.01, 1.0, 5)
    assert config.micro_batch_size < config.prompts_per_step * config.group_size  # gradient accumulation
    gpt2 = load_config(RECIPES / "gpt2.yaml")
    assert (gpt2.prompts_per_step, gpt2.target_length) == (8, 32)


def test_load_config_overrides_and_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1e-5\nrewards: [binary, shaped=0.5]\nmax-steps: 3\n")  # YAML reads 1e-5 as a string
    config = load_config(recipe, ["lr=3e-6", "group_size=8"])
    assert (config.lr, config.group_size, config.max_steps, config.rewards) == (3e-6, 8, 3, ("binary", "shaped=0.5"))
    recipe.write_text("lr: 1e-5\nlearning_rate: 0.1\n")
    with pytest.raises(UsageError, match="unknown field 'learning_rate'") as info:
        load_config(recipe)
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="--group-size: must be an integer"):
        load_config(None, {"group_size": 2.5})
    with pytest.raises(UsageError, match="unknown field"):
        load_config(None, ["nope=1"])


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"advantage": "ppo"}, "--advantage: must be one of grpo, rloo, reinforce"),
        ({"scale_rewards": "std"}, "--scale-rewards"),
        ({"group_size": 1}, "--group-size"),
        ({"top_p": 0.0}, "--top-p"),
        ({"lr": float("nan")}, "--lr"),
        ({"device": "tpu"}, "--device"),
        ({"eval_decoding": ("beam",)}, "--eval-decoding"),
        ({"overwrite": True, "resume": True}, "--overwrite"),
        ({"digit_sum_min": 9, "digit_sum_max": 3}, "--digit-sum-max"),
        ({"curriculum_advance_at": 0.0}, "--curriculum-advance-at"),
        ({"curriculum_window": 0}, "--curriculum-window"),
        ({"truncated_reward": float("inf")}, "--truncated-reward"),
    ],
)
def test_validation_names_the_field(overrides, field):
    with pytest.raises(UsageError) as info:
        GRPOConfig(**overrides)
    assert str(info.value).startswith(field)


# ------------------------------------------------------------------------------------------------------------------
# Evaluation entry point
# ------------------------------------------------------------------------------------------------------------------


def test_evaluate_docstrings_run():
    import doctest

    from policygrad.lm import evaluate

    assert doctest.testmod(evaluate).failed == 0


@pytest.mark.parametrize("eos_boost, expected", [(50.0, 0.0), (-50.0, 1.0)])
def test_evaluation_counts_completions_cut_off_by_max_new_tokens(tiny_llama_chat, eos_boost, expected):
    from policygrad.lm.evaluate import evaluate
    from policygrad.lm.rewards import load_rewards

    model, tokenizer = load_model(str(tiny_llama_chat))
    boost = torch.zeros(len(tokenizer))
    boost[tokenizer.eos_token_id] = eos_boost  # +50: EOS first, nothing is cut off; -50: never EOS, all are
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + boost)
    records = [{"prompt": f"p{i}", "target_length": 4, "target_digit_sum": 0} for i in range(6)]
    result = evaluate(model.eval(), tokenizer, records, load_rewards(("binary",)), ("sampled",), max_new_tokens=4)
    assert result["sampled"]["truncated_rate"] == expected
    assert result["sampled"]["mean_length"] == (0.0 if expected == 0.0 else pytest.approx(4.0, abs=1.0))


def test_run_eval_prints_rates_for_both_decodings(tiny_llama_chat, tiny_prompts, tmp_path, capsys):
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
    assert run_eval(config) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompts"] == 3
    for decoding in ("greedy", "sampled"):
        assert set(report[decoding]) >= {"pass_rate", "length_rate", "digits_rate", "mean_reward", "examples"}
        assert len(report[decoding]["examples"]) == 3
    assert not (tmp_path / "unused").exists()  # evaluation writes no run directory


def test_update_with_micro_batches_equals_one_full_batch(eager_eos_model):
    """Gradient accumulation in the trainer's update gives the full-batch step, for every aggregation."""
    import copy

    from policygrad.lm.update import update

    model, tokenizer = eager_eos_model
    torch.manual_seed(1)
    rollout = sample(model, tokenizer, ["hi", "a longer prompt"], group_size=3, max_new_tokens=10)
    assert len(set(rollout.completion_lengths.tolist())) > 1  # unequal lengths make the weighting matter
    advantages = torch.tensor([1.0, -0.5, 0.25, -1.0, 0.5, 2.0])
    for aggregation in ("token_mean", "sequence_mean", "constant"):
        steps = []
        for micro in (2, 6):
            copy_ = copy.deepcopy(model)
            optimizer = torch.optim.SGD(copy_.parameters(), lr=1.0)
            config = GRPOConfig(
                micro_batch_size=micro,
                aggregation=aggregation,
                max_new_tokens=10,
                entropy_coef=0.01,
                max_grad_norm=0.0,
                group_size=3,
            )
            metrics = update(copy_, optimizer, rollout, advantages, None, 0.01, config)
            steps.append(([p.detach().clone() for p in copy_.parameters()], metrics))
        (params_micro, metrics_micro), (params_full, metrics_full) = steps
        for a, b in zip(params_micro, params_full):
            assert torch.allclose(a, b, atol=1e-5), aggregation
        assert metrics_micro["loss"] == pytest.approx(metrics_full["loss"], rel=1e-4, abs=1e-6)
        assert metrics_micro["grad_norm"] == pytest.approx(metrics_full["grad_norm"], rel=1e-4)


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


# ------------------------------------------------------------------------------------------------------------------
# Tolerance curriculum
# ------------------------------------------------------------------------------------------------------------------


def test_curriculum_docstrings_run():
    import doctest

    from policygrad.lm import curriculum

    assert doctest.testmod(curriculum).failed == 0


@pytest.mark.parametrize("seed", range(20))
def test_curriculum_only_tightens_by_halves_after_a_full_window_at_the_bar(seed):
    import random

    from policygrad.lm.curriculum import ToleranceCurriculum

    rng = random.Random(seed)
    start, final, bar, window = rng.randint(1, 40), rng.randint(0, 3), rng.uniform(0.1, 0.9), rng.randint(1, 5)
    curriculum = ToleranceCurriculum(start, final, bar, window)
    history: list[float] = []  # pass rates seen at the current tolerance
    for _ in range(200):
        before, rate = curriculum.tolerance, rng.random()
        after = curriculum.observe(rate)
        history = (history + [rate])[-window:]
        if before <= final:
            assert after == before  # done: nothing changes any more
        elif len(history) == window and sum(history) / window >= bar:
            assert after == max(final, before // 2)
            history = []
        else:
            assert after == before
    assert curriculum.tolerance >= final


def test_curriculum_rewards_see_the_stage_and_a_resume_is_exact(tiny_llama_chat, tmp_path):
    from policygrad.lm.curriculum import ToleranceCurriculum

    # digit sum 0: a reply passes when it has no digit (about half of the tiny model's 8-character replies), and
    # with the staged tolerance >= 8 every length passes, so the binary reward equals the staged pass rate
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"Note {i}: no digits please.", "target_length": 8, "target_digit_sum": 0}) + "\n"
            for i in range(12)
        )
    )
    settings = dict(
        rewards=("binary",),
        curriculum_tolerance=40,
        curriculum_advance_at=0.2,
        curriculum_window=2,
        save_every=1,
        max_steps=6,
    )
    straight = train(tiny_config(tiny_llama_chat, prompts, tmp_path / "straight", **settings))
    split = tmp_path / "split"
    train(tiny_config(tiny_llama_chat, prompts, split, **{**settings, "max_steps": 3}))
    train(tiny_config(tiny_llama_chat, prompts, split, resume=True, **settings))

    logs = [
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (straight, split)
    ]
    staged = [(r["curriculum/tolerance"], r["curriculum/pass_rate"]) for r in logs[0]]
    assert staged == [(r["curriculum/tolerance"], r["curriculum/pass_rate"]) for r in logs[1]]  # resumed exactly
    replay = ToleranceCurriculum(40, 0, 0.2, 2)
    for record, (tolerance, rate) in zip(logs[0], staged):
        assert tolerance == replay.tolerance
        if tolerance >= 8:
            assert record["reward_mean"] == pytest.approx(rate)  # the reward saw the staged tolerance...
        assert record["pass_rate"] <= rate  # ...while pass_rate is the task's own (tolerance 0)
        replay.observe(rate)
    assert staged[-1][0] < 40, staged  # it did tighten


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
