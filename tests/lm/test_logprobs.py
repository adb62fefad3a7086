"""policygrad.lm.logprobs: the fused log-prob and entropy pass equals the plain log-softmax path, values and
gradients, whatever the dtype, temperature, slicing and which of the two outputs the loss uses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import policygrad.lm.logprobs as fused
from policygrad.regularizers import entropy

pytestmark = pytest.mark.exact

V = 97


def plain(logits, tokens, temperature):
    """The reference: a float32 log-softmax, a gather, and the regularizers' entropy."""
    s = logits.float() / temperature
    return F.log_softmax(s, -1).gather(-1, tokens[..., None]).squeeze(-1), entropy(s)


def both(fn, logits, tokens, temperature, uses):
    z = logits.clone().requires_grad_()
    logprobs, entropies = fn(z, tokens, temperature)
    g, h = torch.linspace(-1.0, 2.0, logprobs.numel()).view_as(logprobs), torch.full_like(entropies, 0.3)
    loss = (g * logprobs).sum() * ("logprob" in uses) + (h * entropies).sum() * ("entropy" in uses)
    loss.backward()
    return logprobs.detach(), entropies.detach(), z.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("slice_elements", [1 << 22, 2 * V, 1])  # one slice; two rows a slice; one row a slice
@pytest.mark.parametrize("uses", [("logprob", "entropy"), ("logprob",), ("entropy",)])
def test_values_and_gradients_equal_the_log_softmax_path(monkeypatch, dtype, temperature, slice_elements, uses):
    monkeypatch.setattr(fused, "SLICE_ELEMENTS", slice_elements)
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 5, V)).to(dtype)
    logits[0, 0, 3] = float("-inf")  # a token of probability 0: contributes 0, not NaN
    tokens = torch.randint(0, V, (3, 5))
    tokens[0, 0] = 4
    ours = both(fused.token_logprobs, logits, tokens, temperature, uses)
    reference = both(plain, logits, tokens, temperature, uses)
    assert ours[2].dtype == dtype  # the gradient comes back in the logits' dtype, as the plain path's cast gives
    for got, want in zip(ours, reference):
        assert got.shape == want.shape and not got.isnan().any()
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)  # float32 rounding apart (summation order)
    assert ours[2][0, 0, 3] == 0  # no gradient reaches a logit of -inf


def test_exact_values_by_hand():
    # two tokens of logits (0, log 3): pi = (1/4, 3/4); log pi(1) = log 3/4; H = -(1/4 log 1/4 + 3/4 log 3/4)
    logits = torch.tensor([[0.0, torch.log(torch.tensor(3.0)).item()]])
    logprobs, entropies = fused.token_logprobs(logits, torch.tensor([1]))
    torch.testing.assert_close(logprobs, torch.log(torch.tensor([0.75])))
    h = -(0.25 * torch.log(torch.tensor(0.25)) + 0.75 * torch.log(torch.tensor(0.75)))
    torch.testing.assert_close(entropies, h[None])
    # gradient of log pi(1): [j = 1] - pi_j = (-1/4, 1/4)
    z = logits.clone().requires_grad_()
    fused.token_logprobs(z, torch.tensor([1]))[0].sum().backward()
    torch.testing.assert_close(z.grad, torch.tensor([[-0.25, 0.25]]))


def test_a_temperature_that_is_not_positive_is_refused():
    with pytest.raises(ValueError, match="temperature must be positive"):
        fused.token_logprobs(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), 0.0)
