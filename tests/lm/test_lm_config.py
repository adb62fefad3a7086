"""policygrad.lm.config: the recipes, overrides, validation naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from policygrad.errors import UsageError
from policygrad.lm.config import GRPOConfig, load_config

pytestmark = pytest.mark.exact

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


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
