"""policygrad.lm.rollout: completion masks, the rollout layout, log-probs against generate()."""

from __future__ import annotations

import pytest
import torch

from policygrad.lm.models import load_model
from policygrad.lm.rollout import completion_mask, join_groups, rollout_logprobs, sample, sequence_logprobs

pytestmark = pytest.mark.exact


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


def test_join_groups_rebuilds_rows_that_score_as_before(eager_eos_model):
    """Groups of two rollouts with different prompt and completion widths, joined: every row keeps its text, its
    tokens (re-padded), its truncation flag and, scored again, its log-probs."""
    model, tokenizer = eager_eos_model
    torch.manual_seed(0)
    first = sample(model, tokenizer, ["hi", "a much longer prompt"], group_size=2, max_new_tokens=12, temperature=0.7)
    second = sample(model, tokenizer, ["a prompt of middling size"], group_size=2, max_new_tokens=5, temperature=0.7)
    joined = join_groups([(second, 0), (first, 1)], tokenizer.pad_token_id)
    assert joined.prompts == second.prompts + first.prompts[2:]
    assert joined.completions == second.completions + first.completions[2:]
    assert torch.equal(joined.truncated, torch.cat([second.truncated, first.truncated[2:]]))
    assert joined.completion_start == max(first.completion_start, second.completion_start)
    assert joined.completion_ids.shape[1] == max(first.completion_ids.shape[1], second.completion_ids.shape[1])
    for row, (source, source_row) in enumerate([(second, 0), (second, 1), (first, 2), (first, 3)]):
        length = int(source.completion_lengths[source_row])
        assert joined.completion_lengths[row] == length
        assert torch.equal(joined.completion_ids[row, :length], source.completion_ids[source_row, :length])
        prompt = source.prompt_ids[source_row][source.prompt_mask[source_row].bool()]
        assert torch.equal(joined.prompt_ids[row][joined.prompt_mask[row].bool()], prompt)
    rescored = rollout_logprobs(model, joined, 0.7)
    assert torch.allclose(rescored[:2, :5], second.logprobs, atol=1e-5)
    width = first.logprobs.shape[1]
    assert torch.allclose(rescored[2:, :width], first.logprobs[2:], atol=1e-5)
    assert torch.equal(joined.logprobs[2:, :width], first.logprobs[2:])


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


@pytest.mark.exact
def test_widened_pads_completions_with_tokens_that_do_not_count():
    from policygrad.lm.rollout import Rollout

    rollout = Rollout(
        prompts=["a", "a"],
        prompt_ids=torch.tensor([[5, 6], [5, 6]]),
        prompt_mask=torch.ones(2, 2, dtype=torch.long),
        completion_ids=torch.tensor([[7], [8]]),
        completion_mask=torch.tensor([[1], [1]]),
        completions=["x", "y"],
        logprobs=torch.tensor([[-0.5], [-1.5]]),
        group_size=2,
        truncated=torch.tensor([True, True]),
        sampler_logprobs=torch.tensor([[-0.25], [-1.25]]),
    )
    wide = rollout.widened(3)
    assert wide.completion_ids.tolist() == [[7, 0, 0], [8, 0, 0]]
    assert wide.completion_mask.tolist() == [[1, 0, 0], [1, 0, 0]]
    assert wide.logprobs.tolist() == [[-0.5, 0.0, 0.0], [-1.5, 0.0, 0.0]]
    assert wide.sampler_logprobs.tolist() == [[-0.25, 0.0, 0.0], [-1.25, 0.0, 0.0]]
    assert wide.prompt_ids is rollout.prompt_ids and rollout.widened(1) is rollout
