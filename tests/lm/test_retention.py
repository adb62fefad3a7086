"""policygrad.lm.retention: the KL of a policy to the model it started from, and the factual probe (study 2)."""

from __future__ import annotations

import math

import pytest
import torch
from lm_helpers import add_noise, eos_boosted  # noqa: E402  (tests/lm is on sys.path under pytest)

from policygrad.lm.retention import FACTS, answers_fact, factual_answers, sequence_kl
from policygrad.lm.rollout import encode_prompts


@pytest.fixture
def policy_and_reference(tiny_llama_chat):
    """The tiny chat Llama with +3 on the EOS logit (the reference) and a copy with noise of std 0.3 on every
    weight (the policy)."""
    reference, tokenizer = eos_boosted(tiny_llama_chat, 3.0)
    return add_noise(eos_boosted(tiny_llama_chat, 3.0)[0], 0.3, seed=3), reference, tokenizer


@pytest.mark.exact
def test_sequence_kl_of_a_model_to_itself_is_zero(policy_and_reference):
    policy, _, tokenizer = policy_and_reference
    kl = sequence_kl(policy, policy, tokenizer, ["hi", "a longer prompt"], samples=3, max_new_tokens=6)
    assert kl.shape == (2,) and kl.dtype == torch.float64
    assert kl.tolist() == [0.0, 0.0]


@pytest.mark.exact
def test_sequence_kl_of_one_token_matches_the_exact_sum_over_the_vocabulary(policy_and_reference):
    """With one new token the completion is one draw from pi(. | x), so the exact KL is

        KL = sum_v pi(v | x) (log pi(v | x) - log pi_0(v | x))

    from the two models' next-token logits; the estimate over K = 800 samples must lie within 4 standard errors
    of it (the per-sample log-ratios' spread over sqrt(K)), and the exact value is far from 0 in those units. Fails
    on: log-probs at a temperature other than 1, the sum taken over masked positions, a sign flipped, or an average
    over samples of the wrong prompt."""
    policy, reference, tokenizer = policy_and_reference
    prompt = "hi"
    ids, _ = encode_prompts(tokenizer, [prompt], torch.device("cpu"))  # (1, P), as sampling encodes it
    with torch.no_grad():
        logp = torch.log_softmax(policy(ids).logits[0, -1].double(), -1)
        ref = torch.log_softmax(reference(ids).logits[0, -1].double(), -1)
    exact = float((logp.exp() * (logp - ref)).sum())
    spread = float((logp.exp() * (logp - ref - exact) ** 2).sum().sqrt())
    samples = 800
    estimate = float(sequence_kl(policy, reference, tokenizer, [prompt], samples=samples, max_new_tokens=1)[0])
    assert abs(estimate - exact) < 4 * spread / math.sqrt(samples)
    assert exact > 8 * spread / math.sqrt(samples)  # so an estimate of 0 or of -KL would fail


@pytest.mark.exact
def test_sequence_kl_repeats_for_a_seed(policy_and_reference):
    policy, reference, tokenizer = policy_and_reference
    prompts = ["hi", "a longer prompt"]
    first = sequence_kl(policy, reference, tokenizer, prompts, samples=4, max_new_tokens=5, seed=1)
    assert torch.equal(first, sequence_kl(policy, reference, tokenizer, prompts, samples=4, max_new_tokens=5, seed=1))
    assert (first > -10).all() and first.abs().sum() > 0


@pytest.mark.exact
def test_answers_fact_is_a_case_insensitive_search_for_any_accepted_answer():
    assert answers_fact("PARIS, of course", ("paris",))
    assert answers_fact("It has 8 legs.", ("eight", "8"))
    assert not answers_fact("Lyon", ("paris",))
    assert len(FACTS) == 30 and all(accepted == tuple(a.lower() for a in accepted) for _, accepted in FACTS)


@pytest.mark.property
def test_factual_answers_give_one_greedy_reply_per_question(policy_and_reference):
    policy, _, tokenizer = policy_and_reference
    facts = [("What is 2 + 2?", ("4",)), ("Name a colour.", ("red",))]
    first = factual_answers(policy, tokenizer, facts, max_new_tokens=4)
    assert [row["question"] for row in first] == [q for q, _ in facts]
    assert all(row["correct"] == answers_fact(row["reply"], accepted) for row, (_, accepted) in zip(first, facts))
    assert first == factual_answers(policy, tokenizer, facts, max_new_tokens=4)  # greedy: the same replies
