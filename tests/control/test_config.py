"""Every user mistake is one UsageError naming the flag: bad hyper-parameters (at construction, without torch or
gymnasium), unknown environments and policies that cannot act in the action space (from run())."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from policygrad.control.config import ALGO_DEFAULTS, ControlConfig
from policygrad.errors import UsageError


def test_config_module_imports_nothing_heavy():
    code = "import sys, policygrad.control.config; print(any(m in sys.modules for m in ('torch', 'gymnasium')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


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
        ({"ent_coef": -0.01}, "--ent-coef"),
        ({"algo": "dqn"}, "--algo"),
        ({"eval": Path("no/such/policy.pt")}, "--eval"),
    ],
)
def test_bad_hyper_parameters_are_usage_errors(kwargs, field):
    with pytest.raises(UsageError) as err:
        ControlConfig(**kwargs)
    assert str(err.value).startswith(field + ":") and "\n" not in str(err.value)


def test_environment_mistakes_are_usage_errors(tmp_path):
    pytest.importorskip("gymnasium")
    from policygrad.control.train import run

    with pytest.raises(UsageError, match=r"^--env: cannot make 'NoSuchEnv-v0'"):
        run(ControlConfig(env="NoSuchEnv-v0", run_dir=tmp_path, progress=False))
    with pytest.raises(UsageError, match=r"^--policy: categorical needs Discrete actions") as err:
        run(ControlConfig(env="Pendulum-v1", policy="categorical", run_dir=tmp_path, progress=False))
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match=r"^--policy: gaussian needs Box"):
        run(ControlConfig(env="CartPole-v1", policy="gaussian", run_dir=tmp_path, progress=False))
    assert not any(tmp_path.iterdir())  # nothing written for a run that never started
