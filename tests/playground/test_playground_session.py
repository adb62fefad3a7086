"""What a page may send, checked (policygrad.playground.session): every mistake is one line naming the setting, and a
session takes exactly the steps of `policygrad bandit`."""

from __future__ import annotations

import pytest
import torch

from policygrad.bandit.config import BanditConfig
from policygrad.errors import UsageError
from policygrad.playground.session import LIMITS, SETTINGS, Session, Sessions, parse_settings, settings_json
from policygrad.variants import BANDIT_BASELINES

BAD_SETTINGS = [
    ({"lr": "abc"}, "lr: must be a number, got 'abc'"),
    ({"lr": "0"}, "lr: must be a finite number > 0, got 0.0"),
    ({"noise": "-1"}, "noise: must be a finite number >= 0, got -1.0"),
    ({"noise": "nan"}, "noise: must be a finite number >= 0, got nan"),
    ({"noise": True}, "noise: must be a number, got bool"),
    ({"noise": None}, "noise: must be a number, got NoneType"),
    ({"noise": "__import__('os').system('true')"}, "noise: must be a number, got \"__import__('os').system('true')\""),
    ({"noise": "9" * 100}, "noise: must be a number, got '" + "9" * 40 + "'... (100 characters)"),
    ({"means": []}, "means: give at least two arms, e.g. --means 1 0 0.5 (got 0)"),
    ({"means": ["1", "x"]}, "means[1]: must be a number, got 'x'"),
    ({"means": ["1", "inf"]}, "means: every mean must be a finite number, got inf"),
    ({"means": {"a": 1}}, "means: must be a list of numbers, got dict"),
    ({"means": ["0"] * 13}, "means: at most 12 arms, got 13"),
    ({"means": ["1", "2000"]}, "means[1]: must be between -1000 and 1000, got 2000"),
    ({"samples": "2.5"}, "samples: must be a whole number, got '2.5'"),
    ({"samples": "0"}, "samples: must be at least 1, got 0"),
    ({"samples": "1", "baseline": "loo"}, "samples: baseline 'loo' compares samples, so it needs at least 2"),
    ({"samples": "1000"}, "samples: must be at most 256 here, got 1000"),
    ({"baseline": "best"}, f"baseline: must be one of {', '.join(BANDIT_BASELINES.names)}, got 'best'"),
    ({"baseline": 3}, f"baseline: must be one of {', '.join(BANDIT_BASELINES.names)}, got 3"),
    ({"lr": "1e9"}, "lr: must be at most 100 here, got 1e+09"),
    ({"epochs": "0"}, "epochs: must be at least 1, got 0"),
    ({"clip_eps": "1.5"}, "clip_eps: must be a number in (0, 1), got 1.5"),
    ({"seed": "-1"}, "seed: must be in [0, 2**63), got -1"),
    ({"baseline_decay": "1"}, "baseline_decay: must be in [0, 1), got 1.0"),
    ({"json": True}, f"json: is not a setting; the settings are {', '.join(SETTINGS)}"),
    ({"steps": 5}, f"steps: is not a setting; the settings are {', '.join(SETTINGS)}"),
]


@pytest.mark.exact
@pytest.mark.parametrize("data, message", BAD_SETTINGS)
def test_a_bad_setting_is_one_line_naming_it(data, message):
    with pytest.raises(UsageError) as info:
        parse_settings(data)
    assert str(info.value) == message and "\n" not in message


@pytest.mark.exact
def test_settings_are_bandit_config_fields_and_keep_what_is_not_sent():
    current = parse_settings({"means": ["1", " 0.5 ", 2], "lr": "0.1", "seed": "4", "epochs": 3})
    assert current == BanditConfig(means=(1.0, 0.5, 2.0), lr=0.1, seed=4, epochs=3)
    assert parse_settings({"noise": 0}, current) == BanditConfig(
        means=(1.0, 0.5, 2.0), lr=0.1, seed=4, epochs=3, noise=0
    )
    assert parse_settings({"means": "3, 1 2"}).means == (3.0, 1.0, 2.0)  # one text field works too
    assert settings_json(current)["means"] == [1.0, 0.5, 2.0] and tuple(settings_json(current)) == SETTINGS
    assert set(SETTINGS) <= set(BanditConfig.__dataclass_fields__)  # one name per concept
    assert LIMITS["arms"] >= 2 and LIMITS["steps_per_request"] >= 50


@pytest.mark.property
def test_configure_goes_on_or_resets():
    session = Session(parse_settings({"means": [1, 0, 0.5], "baseline": "mean", "samples": 4}))
    session.advance(5)
    memory = session.estimators["mean"].state()["mean"].clone()
    assert session.configure(parse_settings({"lr": 0.5, "samples": 6}, session.settings)) is False
    assert session.steps == 5 and not session.replayable  # learning goes on; the terminal cannot replay it
    assert torch.equal(session.estimators["mean"].state()["mean"], memory)  # rebuilt for N=6, memory kept
    assert session.estimators["loo"].group_size == 6
    session.advance(2)
    assert session.configure(parse_settings({"means": [1, 0]}, session.settings)) is True  # another K
    assert (session.steps, session.generation, session.replayable, session.logits.shape) == (0, 2, True, (1, 2))
    assert session.configure(parse_settings({"seed": 9}, session.settings)) is True and session.generation == 3


@pytest.mark.exact
def test_a_diverging_step_names_lr_and_keeps_the_learner():
    session = Session(BanditConfig(means=(1e308, -1e308)))
    with pytest.raises(UsageError, match=r"^lr: the policy diverged at step 1: .*lower lr"):
        session.advance(3)
    assert session.steps == 0 and torch.equal(session.logits, torch.zeros(1, 2, dtype=torch.float64))


@pytest.mark.exact
def test_state_has_no_nan_for_json():
    session = Session(BanditConfig(means=(1.0, 1.0), baseline="group"))  # exact gradient 0: no scale
    state = session.state()
    assert state["moments"]["none"]["scale"] is None and state["exact_gradient"] == [0.0, 0.0]
    assert state["command"].startswith("policygrad bandit --means 1.0 1.0 --noise 0.5 --baseline group")


@pytest.mark.property
def test_sessions_forget_the_least_recently_used_and_the_idle():
    now = [0.0]
    sessions = Sessions(limit=2, idle_seconds=60, clock=lambda: now[0])
    a, _ = sessions.create(BanditConfig())
    b, _ = sessions.create(BanditConfig())
    sessions.get(a)  # a is now the most recently used
    c, _ = sessions.create(BanditConfig())
    assert len(sessions) == 2 and sessions.get(a) and sessions.get(c)
    with pytest.raises(KeyError):
        sessions.get(b)
    now[0] = 61.0
    with pytest.raises(KeyError):
        sessions.get(a)
    assert len(sessions) == 0 and len({a, b, c}) == 3 and len(a) >= 20  # unguessable ids
