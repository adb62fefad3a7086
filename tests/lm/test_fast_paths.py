"""The fast paths of issue 5 compute the same mathematics as a plain reference written here from the formulas.

The shared-prompt forward (:func:`completion_logprobs`), the cached decoding loop (:func:`generate`) and the update
are checked against: a full forward of each whole sequence; ``transformers``' own ``generate``; and the GRPO loss
written out by hand (group-normalised advantages, token-mean policy term, entropy bonus) with its gradient by autograd.
"""

from __future__ import annotations

import copy

import pytest
import torch
from lm_helpers import eos_boosted, whole_sequence_logprobs  # noqa: E402  (tests/lm is on sys.path under pytest)

import policygrad.lm.rollout as rollout_module
from policygrad.lm.config import GRPOConfig
from policygrad.lm.models import load_model
from policygrad.lm.rollout import (
    completion_logprobs,
    completion_mask,
    generate,
    sample,
    sequence_logprobs,
    top_p_filter,
)
from policygrad.lm.update import update


@pytest.fixture
def eos_prone(tiny_llama_chat):
    """The tiny chat Llama with +3 on the EOS logit, so sampled completions end at different lengths."""
    return eos_boosted(tiny_llama_chat, 3.0)


def _rollout(model, tokenizer, seed=0):
    torch.manual_seed(seed)
    rollout = sample(
        model,
        tokenizer,
        ["hi", "a much longer prompt"],
        group_size=3,
        max_new_tokens=12,
        temperature=0.9,
        score_tokens=False,
    )
    assert len(set(rollout.completion_lengths.tolist())) > 1
    return rollout


@pytest.mark.exact
@pytest.mark.parametrize("embed_once", [True, False])  # False: each forward looks up its embeddings (FSDP's path)
@pytest.mark.parametrize("attention", ["sdpa", "eager", "copies"])  # copies: one row per completion, cache copied
def test_shared_prompt_forward_equals_whole_sequence_forward_values_and_gradients(
    embed_once, attention, eos_prone, monkeypatch
):
    model, tokenizer = eos_prone
    if attention == "copies":  # the path of attention kernels that take no 4-D mask
        monkeypatch.setattr(rollout_module, "PACKABLE_ATTENTION", frozenset())
    else:
        model.set_attn_implementation(attention)
    rollout = _rollout(model, tokenizer)
    weights = torch.randn(rollout.completion_ids.shape)  # an arbitrary function of the log-probs and entropies
    results = []
    for fast in (True, False):
        model.zero_grad()
        if fast:
            logprobs, entropies = completion_logprobs(
                model, temperature=0.9, embed_once=embed_once, **rollout.rows(slice(0, 6))
            )
        else:
            logprobs, entropies = sequence_logprobs(
                model, rollout.input_ids, rollout.attention_mask, rollout.completion_start, temperature=0.9
            )
        mask = rollout.completion_mask
        ((weights * logprobs * mask).sum() + (entropies * mask).sum()).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((logprobs * mask, entropies * mask, grads))
    (lp_fast, ent_fast, g_fast), (lp_ref, ent_ref, g_ref) = results
    assert torch.allclose(lp_fast, lp_ref, atol=1e-5)
    assert torch.allclose(ent_fast, ent_ref, atol=1e-5)
    for a, b in zip(g_fast, g_ref):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.property
def test_packed_completions_see_the_prompt_and_their_own_earlier_tokens_only(eos_prone):
    model, tokenizer = eos_prone
    rollout = _rollout(model, tokenizer)
    rows = rollout.rows(slice(2, 5))  # prompt 0 has one row here, prompt 1 two
    packing = rollout_module.Packing.of(model, rows["prompt_mask"], rows["completion_mask"], rows["prompt_index"])
    fed = (rows["completion_mask"].sum(-1) - 1).tolist()  # tokens each completion feeds
    width = max(fed[0], fed[1] + fed[2])  # W: prompt 1's two completions end to end
    prompt_length = rows["prompt_mask"].shape[1]
    attends = packing.attention == 0  # (U, 1, W, P + W)
    assert attends.shape == (2, 1, width, prompt_length + width)
    assert packing.valid.sum(-1).tolist() == fed
    columns = [list(range(fed[0])), list(range(fed[1])), list(range(fed[1], fed[1] + fed[2]))]
    for row, (u, cols) in enumerate(zip([0, 1, 1], columns)):
        assert packing.index[row, : fed[row]].tolist() == [u * width + c for c in cols]
        real = int(rows["prompt_mask"][u].sum())
        for t, c in enumerate(cols):
            query = attends[u, 0, c]
            assert torch.equal(query[:prompt_length], rows["prompt_mask"][u].bool())
            seen = query[prompt_length:].nonzero().squeeze(1).tolist()
            assert seen == cols[: t + 1]  # its own completion's tokens up to itself, no other's
            assert packing.positions[u, c] == real + t
        assert torch.equal(
            packing.pack(rows["completion_ids"][:, :-1])[u, cols], rows["completion_ids"][row, : fed[row]]
        )
    if fed[0] < width:  # a column no token fills sees the prompt only
        assert not attends[0, 0, width - 1, prompt_length:].any()


@pytest.mark.property
def test_a_batch_whose_packed_mask_would_be_too_large_gets_one_row_per_completion(eos_prone, monkeypatch):
    model, tokenizer = eos_prone
    rows = _rollout(model, tokenizer).rows(slice(0, 6))
    arguments = (model, rows["prompt_mask"], rows["completion_mask"], rows["prompt_index"])
    packing = rollout_module.Packing.of(*arguments)
    monkeypatch.setattr(rollout_module, "PACKED_MASK_LIMIT", packing.attention.numel() - 1)
    assert rollout_module.Packing.of(*arguments) is None
    with torch.no_grad():
        copies, _ = completion_logprobs(model, **rows)
    monkeypatch.undo()
    with torch.no_grad():
        packed, _ = completion_logprobs(model, **rows)
    mask = rows["completion_mask"]
    assert torch.allclose(copies * mask, packed * mask, atol=1e-5)


@pytest.mark.property
def test_micro_batch_that_splits_a_group_uses_the_right_prompts(eos_prone):
    model, tokenizer = eos_prone
    rollout = _rollout(model, tokenizer)
    with torch.no_grad():
        whole, _ = completion_logprobs(model, **rollout.rows(slice(0, 6)))
        pieces = [
            completion_logprobs(model, **rollout.rows(rows))[0] for rows in (slice(0, 2), slice(2, 5), slice(5, 6))
        ]
    rows = rollout.rows(slice(2, 5))
    assert rows["prompt_ids"].shape[0] == 2 and rows["prompt_index"].tolist() == [0, 1, 1]
    mask = rollout.completion_mask
    assert torch.allclose(torch.cat(pieces) * mask, whole * mask, atol=1e-5)


@pytest.mark.exact
@pytest.mark.parametrize("group_size", [1, 3])
def test_greedy_decoding_equals_transformers_generate(tiny_qwen_base, group_size):
    model, tokenizer = load_model(str(tiny_qwen_base))
    model.eval()
    tokenizer.padding_side = "left"
    encoded = tokenizer(["x", "a longer prompt here"], return_tensors="pt", padding=True)
    eos = tokenizer.eos_token_id
    ours = generate(
        model,
        encoded["input_ids"],
        encoded["attention_mask"],
        group_size,
        10,
        [eos],
        tokenizer.pad_token_id,
        greedy=True,
    )
    theirs = model.generate(
        encoded["input_ids"].repeat_interleave(group_size, 0),
        attention_mask=encoded["attention_mask"].repeat_interleave(group_size, 0),
        max_new_tokens=10,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )[:, encoded["input_ids"].shape[1] :]
    assert torch.equal(ours, theirs)


@pytest.mark.exact
def test_finished_rows_leave_the_batch_without_changing_the_others(tiny_llama_chat):
    """Rows are dropped from the cache when they end; the rows that go on must decode exactly as ``generate`` does
    with every row kept to the end."""
    model, tokenizer = eos_boosted(tiny_llama_chat, 0.5)  # with this boost greedy rows end after 1 to 8 tokens
    texts = ["<|user|>" + t + "<|assistant|>" for t in ("hi", "a b", "zz top", "what is it", "7", "longer one here")]
    tokenizer.padding_side = "left"
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    ours = generate(
        model, encoded["input_ids"], encoded["attention_mask"], 1, 12, [eos], tokenizer.pad_token_id, greedy=True
    )
    lengths = completion_mask(ours, [eos]).sum(-1)
    assert len(set(lengths.tolist())) > 1 and lengths.min() < ours.shape[1]  # rows ended at different steps
    theirs = model.generate(
        **encoded, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
    )[:, encoded["input_ids"].shape[1] :]
    assert torch.equal(ours, theirs)


@pytest.mark.exact
def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    kept = top_p_filter(probs, 0.8)  # 0.5 + 0.3 reaches 0.8: the two largest
    assert torch.allclose(kept, torch.tensor([[0.625, 0.375, 0, 0], [0, 0, 0.375, 0.625]]))
    assert torch.allclose(top_p_filter(probs, 1.0), probs)
    assert torch.equal(top_p_filter(probs, 0.1) > 0, probs == probs.max(-1, keepdim=True).values)  # argmax always


@pytest.mark.exact
def test_update_gradient_equals_the_hand_written_grpo_loss(eos_prone):
    """One optimiser step of ``update`` (SGD, lr 1) moves the weights by minus the gradient of

        L = - sum_{i,t} A_i * m_it * log pi(y_it) / sum m  -  w_H * sum_{i,t} m_it * H_it / sum m,
        A_i = (r_i - mean_group(r)) / (std_group(r) + eps)

    computed here from a plain whole-sequence forward pass."""
    model, tokenizer = eos_prone
    rollout = _rollout(model, tokenizer)
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, -1.0])
    groups = rewards.view(2, 3)
    advantages = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1)
    w_h = 0.05

    reference = copy.deepcopy(model)
    logp, ent = whole_sequence_logprobs(reference, rollout, 0.9)  # (N, T) each
    m = rollout.completion_mask.float()
    loss = -(advantages[:, None] * logp * m).sum() / m.sum() - w_h * (ent * m).sum() / m.sum()
    loss.backward()
    expected = [p.detach() - p.grad for p in reference.parameters()]

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    config = GRPOConfig(group_size=3, temperature=0.9, max_grad_norm=0.0, micro_batch_size=4, advantage_eps=1e-4)
    from policygrad.advantages import group_advantages

    ours = group_advantages(rewards, 3, "group", 1e-4)
    assert torch.allclose(ours, advantages)
    metrics = update(model, optimizer, rollout, ours, None, w_h, config)
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
    for a, b in zip(model.parameters(), expected):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.property
def test_draw_follows_the_categorical_distribution():
    from policygrad.lm.rollout import draw

    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 1.0, 0.0]]).repeat(20_000, 1)  # (40000, 4)
    torch.manual_seed(0)
    tokens = draw(probs)
    first = torch.bincount(tokens[0::2], minlength=4).double() / 20_000
    assert (tokens[1::2] == 2).all() and first[1] == 0  # zero-probability tokens are never drawn
    # within 4 standard errors of 0.5 / 0.3 / 0.2 (se <= 0.0036 at n = 20000)
    assert torch.allclose(first, torch.tensor([0.5, 0.0, 0.3, 0.2], dtype=torch.float64), atol=4 * 0.0036)


@pytest.mark.exact
@pytest.mark.parametrize("family", ["qwen2", "gpt2"])  # rotary positions without a chat template; learned positions
def test_packed_completions_equal_whole_sequences_in_other_model_families(family, tmp_path):
    from tiny_models import save_tiny, save_tiny_gpt2

    folder = save_tiny_gpt2(tmp_path) if family == "gpt2" else save_tiny(tmp_path, family, chat=False)
    model, tokenizer = eos_boosted(folder, 3.0)
    rollout = _rollout(model, tokenizer)
    with torch.no_grad():
        packed, _ = completion_logprobs(model, **rollout.rows(slice(0, 6)))
        whole, _ = sequence_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.completion_start)
    mask = rollout.completion_mask
    assert torch.allclose(packed * mask, whole * mask, atol=1e-5)
