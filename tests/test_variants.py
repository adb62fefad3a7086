"""policygrad.variants: one registry per kind of variant, the single source of the names."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from policygrad import variants
from policygrad.errors import UsageError
from policygrad.variants import ADVANTAGES, AGGREGATIONS, Registry, build

pytestmark = pytest.mark.exact

REGISTRIES = [value for value in vars(variants).values() if isinstance(value, Registry)]  # every one, new ones too


def test_the_scan_finds_every_kind():
    assert [r.kind for r in REGISTRIES] == [
        "advantage",
        "baseline",
        "scale_rewards",
        "aggregation",
        "kl_estimator",
        "entropy_weight",
        "kl_weight",
        "reward mode",
        "task",
    ]


@pytest.mark.parametrize("registry", REGISTRIES, ids=lambda r: r.kind)
def test_every_entry_imports(registry):
    assert len(registry) == len(registry.names) >= 1
    for name in registry:
        assert callable(registry[name]) or hasattr(registry[name], "rates"), name


def test_the_registries_and_the_configs_import_no_torch():
    code = (
        "import sys, policygrad.variants, policygrad.lm.config, policygrad.bandit.config; print('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_an_unknown_name_is_one_line_naming_the_field_and_the_choices():
    with pytest.raises(UsageError) as info:
        ADVANTAGES.check("--advantage", "ppo")
    assert str(info.value) == "--advantage: must be one of grpo, rloo, reinforce, got 'ppo'"
    with pytest.raises(KeyError, match="aggregation must be one of token_mean, sequence_mean, constant"):
        AGGREGATIONS["mean"]


def test_build_passes_the_settings_named_like_the_constructor_arguments():
    registry = Registry("demo", {"pair": "fractions:Fraction"})
    assert build(registry, "pair", SimpleNamespace(numerator=3, denominator=4, unrelated=1)) == 0.75
    estimator = build(ADVANTAGES, "grpo", SimpleNamespace(group_size=4, scale_rewards="none", advantage_eps=0.5))
    assert (estimator.group_size, estimator.scale, estimator.eps) == (4, "none", 0.5)


def test_the_config_choices_are_the_registry_names():
    from policygrad.bandit.config import BanditConfig
    from policygrad.lm.config import GRPOConfig

    with pytest.raises(UsageError, match="--kl-estimator: must be one of k1, k2, k3"):
        GRPOConfig(kl_estimator="k4")
    with pytest.raises(UsageError, match="--task: must be one of length_digits"):
        GRPOConfig(task="chess")
    assert BanditConfig(baseline="mean").baseline == "mean"
