"""policygrad.lm.curriculum: the tolerance schedule, and a run that uses it (resumed exactly)."""

from __future__ import annotations

import json

import pytest
from lm_helpers import tiny_config  # tests/lm, on sys.path under pytest's default import mode

from policygrad.lm.trainer import train


@pytest.mark.exact
def test_curriculum_docstrings_run():
    import doctest

    from policygrad.lm import curriculum

    assert doctest.testmod(curriculum).failed == 0


@pytest.mark.property
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


@pytest.mark.smoke
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
