"""Every user mistake is one UsageError naming the flag: bad hyper-parameters (at construction, without torch or
gymnasium), unknown environments and policies that cannot act in the action space (from run())."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from policygrad.control.config import ALGO_DEFAULTS, ControlConfig
from policygrad.errors import UsageError


@pytest.mark.exact
def test_config_module_imports_nothing_heavy():
    code = "import sys, policygrad.control.config; print(any(m in sys.modules for m in ('torch', 'gymnasium')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.exact
def test_none_fields_take_the_algorithm_defaults():
    for algo, preset in ALGO_DEFAULTS.items():
        cfg = ControlConfig(algo=algo)
        assert {k: getattr(cfg, k) for k in preset} == preset
    assert ControlConfig(algo="ppo", lr=0.123).lr == 0.123
    assert ControlConfig().env == "CartPole-v1"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"lr": -1.0}, "--lr"),
        ({"lr": float("nan")}, "--lr"),
        ({"gamma": 1.5}, "--gamma"),
        ({"gae_lambda": -0.1}, "--gae-lambda"),
        ({"num_envs": 0}, "--num-envs"),
        ({"total_steps": 0}, "--total-steps"),
        ({"clip_eps": 0.0}, "--clip-eps"),
        ({"minibatches": 10_000}, "--minibatches"),
        ({"max_kl": 0.0}, "--max-kl"),
        ({"hidden": ()}, "--hidden"),
        ({"entropy_coef": -0.01}, "--entropy-coef"),
        ({"entropy_weight": "adaptive"}, "--entropy-weight"),
        ({"entropy_min_weight": -0.1}, "--entropy-min-weight"),
        ({"entropy_max_weight": float("inf")}, "--entropy-max-weight"),
        ({"entropy_min_weight": 0.5, "entropy_max_weight": 0.1}, "--entropy-max-weight"),
        ({"entropy_eps": 0.0}, "--entropy-eps"),
        ({"algo": "dqn"}, "--algo"),
        ({"eval": Path("no/such/policy.pt")}, "--eval"),
        ({"max_bad_steps": 0}, "--max-bad-steps"),
        ({"save_every": -1}, "--save-every"),
        ({"output_dir": Path("a\x00b")}, "--output-dir"),
        ({"resume": True, "overwrite": True}, "--overwrite"),
    ],
)
@pytest.mark.exact
def test_bad_hyper_parameters_are_usage_errors(kwargs, field):
    with pytest.raises(UsageError) as err:
        ControlConfig(**kwargs)
    assert str(err.value).startswith(field + ":") and "\n" not in str(err.value)


@pytest.mark.exact
def test_environment_mistakes_are_usage_errors(tmp_path):
    pytest.importorskip("gymnasium")
    from policygrad.control.train import run

    out = tmp_path / "run"
    with pytest.raises(UsageError, match=r"^--env: cannot make 'NoSuchEnv-v0'"):
        run(ControlConfig(env="NoSuchEnv-v0", output_dir=out, progress=False))
    with pytest.raises(UsageError, match=r"^--policy: categorical needs Discrete actions") as err:
        run(ControlConfig(env="Pendulum-v1", policy="categorical", output_dir=out, progress=False))
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match=r"^--policy: gaussian needs Box"):
        run(ControlConfig(env="CartPole-v1", policy="gaussian", output_dir=out, progress=False))
    with pytest.raises(UsageError, match=rf"^--resume: {out} holds no run to resume$"):
        run(ControlConfig(output_dir=out, resume=True, progress=False))
    assert not any(tmp_path.iterdir())  # nothing written for a run that never started


@pytest.mark.exact
def test_a_recipe_gives_the_defaults_and_names_its_mistakes(tmp_path):
    from policygrad.control.config import load_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("algo: npg\nentropy-coef: 0.01\nhidden: [32]\noutput_dir: runs/npg\n")
    cfg = load_config(recipe, ["seed=3"])
    assert (cfg.algo, cfg.entropy_coef, cfg.hidden, cfg.output_dir, cfg.seed) == (
        "npg",
        0.01,
        (32,),
        Path("runs/npg"),
        3,
    )
    assert cfg.gamma == ALGO_DEFAULTS["npg"]["gamma"]  # presets fill what the recipe leaves out
    for text, field in [
        ("ent_coef: 0.1\n", "'ent_coef'"),
        ("gamma: 2\n", "--gamma"),
        ("max_bad_steps: x\n", "--max-bad-steps"),
    ]:
        recipe.write_text(text)
        with pytest.raises(UsageError, match=field) as err:
            load_config(recipe)
        assert "\n" not in str(err.value)


RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "control"


@pytest.mark.exact
@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_control_recipes_load(recipe):
    from policygrad.control.config import load_config

    assert isinstance(load_config(recipe), ControlConfig)


@pytest.mark.exact
def test_the_pendulum_recipe_is_the_documented_command():
    from policygrad.control.config import load_config

    cfg = load_config(RECIPES / "pendulum-ppo.yaml")
    assert (cfg.env, cfg.algo, cfg.total_steps, cfg.num_envs, cfg.num_steps) == ("Pendulum-v1", "ppo", 150_000, 4, 256)
    assert (cfg.gamma, cfg.gae_lambda, cfg.epochs, cfg.minibatches) == (0.9, 0.95, 10, 16)
    assert (cfg.lr, cfg.value_lr, cfg.anneal_lr) == (1e-3, 1e-3, True)
