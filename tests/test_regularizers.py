"""Exact values and enumeration checks of policygrad.regularizers."""

import math

import pytest
import torch

from policygrad.regularizers import dynamic_entropy_weight, entropy, kl

DTYPE = torch.float64  # the exact values are compared to 1e-15


def t(data, dtype=DTYPE, **kwargs) -> torch.Tensor:
    """``torch.tensor`` in float64 unless told otherwise."""
    return torch.tensor(data, dtype=dtype, **kwargs)


@pytest.mark.exact
def test_entropy_by_hand():
    assert entropy(torch.zeros(4, dtype=DTYPE)).item() == pytest.approx(math.log(4), abs=1e-15)
    p = [0.5, 0.25, 0.25]
    logits = t(p).log() + 3.0  # a shift does not change the softmax
    assert entropy(logits).item() == pytest.approx(-sum(x * math.log(x) for x in p), abs=1e-15)


@pytest.mark.exact
def test_entropy_with_impossible_actions_is_finite():
    logits = t([[0.0, float("-inf"), 0.0], [5.0, float("-inf"), float("-inf")]])
    out = entropy(logits)
    torch.testing.assert_close(out, t([math.log(2), 0.0]))


@pytest.mark.property
def test_entropy_float32_shape():
    out = entropy(torch.randn(2, 5, 7, dtype=torch.float32))
    assert out.shape == (2, 5) and out.dtype == torch.float32


@pytest.mark.exact
def test_kl_values_by_hand():
    logprobs, ref = t([math.log(0.5)]), t([math.log(0.25)])  # d = log 2
    d = math.log(2)
    assert kl(logprobs, ref, "k1").item() == pytest.approx(d, abs=1e-15)
    assert kl(logprobs, ref, "k2").item() == pytest.approx(d * d / 2, abs=1e-15)
    assert kl(logprobs, ref, "k3").item() == pytest.approx(0.5 - 1 + d, abs=1e-15)
    assert (kl(torch.randn(100, dtype=DTYPE), torch.randn(100, dtype=DTYPE), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k1"):
        kl(logprobs, ref, "k4")


def _enumerate(estimator: str):
    """Exact E_{x~pi}[k(x)] and E_{x~pi}[grad_theta k(x)] (samples held fixed) on a 5-way softmax."""
    torch.manual_seed(0)
    theta = torch.randn(5, dtype=DTYPE, requires_grad=True)
    ref_logp = torch.log_softmax(torch.randn(5, dtype=DTYPE), -1)
    logp = torch.log_softmax(theta, -1)
    pi = logp.exp().detach()
    values = kl(logp, ref_logp, estimator)  # one value per outcome x
    expected_value = (pi * values.detach()).sum()
    (expected_grad,) = torch.autograd.grad((pi * values).sum(), theta)  # sum_x pi(x) grad k(x)
    return theta, logp, ref_logp, expected_value, expected_grad


def _true(theta, ref_logp, which):
    logp = torch.log_softmax(theta, -1)
    p, q = logp.exp(), ref_logp.exp()
    divergence = (p * (logp - ref_logp)).sum() if which == "reverse" else (q * (ref_logp - logp)).sum()
    (grad,) = torch.autograd.grad(divergence, theta)
    return divergence.detach(), grad


@pytest.mark.exact
def test_kl_estimator_values_and_gradients_by_enumeration():
    # values: k1 and k3 are unbiased for KL(pi || ref)
    for name in ("k1", "k3"):
        theta, _, ref_logp, value, _ = _enumerate(name)
        reverse, _ = _true(theta, ref_logp, "reverse")
        assert value.item() == pytest.approx(reverse.item(), abs=1e-12)
    # gradients, as the docstring says: k1 -> 0, k2 -> grad KL(pi||ref), k3 -> grad KL(ref||pi)
    theta, _, ref_logp, _, grad_k1 = _enumerate("k1")
    torch.testing.assert_close(grad_k1, torch.zeros(5, dtype=DTYPE), atol=1e-12, rtol=0)
    theta, _, ref_logp, _, grad_k2 = _enumerate("k2")
    torch.testing.assert_close(grad_k2, _true(theta, ref_logp, "reverse")[1], atol=1e-12, rtol=0)
    theta, _, ref_logp, _, grad_k3 = _enumerate("k3")
    torch.testing.assert_close(grad_k3, _true(theta, ref_logp, "forward")[1], atol=1e-12, rtol=0)


@pytest.mark.exact
def test_dynamic_entropy_weight_by_hand():
    rewards = t([0.0, 1.0, 1.0, 0.0])  # sample variance 1/3
    w = dynamic_entropy_weight(rewards, coef=0.01, min_weight=0.0, max_weight=1.0, eps=1e-2)
    assert w.item() == pytest.approx(0.01 / (1 / 3 + 1e-2), abs=1e-15)
    # zero variance -> coef / eps, then the upper bound
    assert dynamic_entropy_weight(t([1.0, 1.0]), coef=0.001, eps=0.01).item() == pytest.approx(0.1)
    assert dynamic_entropy_weight(t([1.0, 1.0]), coef=1.0, max_weight=0.5).item() == 0.5
    # large variance -> lower bound
    assert dynamic_entropy_weight(t([-100.0, 100.0]), coef=1e-3, min_weight=1e-4).item() == 1e-4
    # NaN rewards are ignored
    assert dynamic_entropy_weight(t([0.0, float("nan"), 1.0, 1.0, 0.0]), 0.01).item() == pytest.approx(w.item())


@pytest.mark.property
def test_entropy_over_the_last_dimension_of_any_shape():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 4, dtype=DTYPE)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy(logits), -(p * p.log()).sum(-1), rtol=0, atol=1e-14)
    for row in range(2):  # each (3, 4) slice alone gives the same entropies
        torch.testing.assert_close(entropy(logits[row]), entropy(logits)[row], rtol=0, atol=0)


@pytest.mark.exact
def test_kl_estimators_by_hand_on_several_tokens_and_their_gradients():
    # d = log pi - log pi_ref per token; per-token gradients w.r.t. log pi: k1 -> 1, k2 -> d, k3 -> 1 - exp(-d)
    d = [-1.0, -0.25, 0.0, 0.5, 2.0]
    ref = t([-1.5, -0.5, -2.0, -1.0, -3.0])
    for name, value, slope in (
        ("k1", lambda x: x, lambda x: 1.0),
        ("k2", lambda x: x * x / 2, lambda x: x),
        ("k3", lambda x: math.exp(-x) - 1 + x, lambda x: 1 - math.exp(-x)),
    ):
        logprobs = (ref + t(d)).requires_grad_(True)
        out = kl(logprobs, ref, name)
        torch.testing.assert_close(out, t([value(x) for x in d]), rtol=0, atol=1e-15)
        (grad,) = torch.autograd.grad(out.sum(), logprobs)
        torch.testing.assert_close(grad, t([slope(x) for x in d]), rtol=0, atol=1e-15)
    # k2 and k3 are >= 0 and 0 only where the policies agree; k1 takes either sign
    assert kl(ref + t(d), ref, "k1").tolist()[0] < 0 and (kl(ref + t(d), ref, "k2") >= 0).all()
    # the default estimator is k3
    assert torch.equal(kl(ref + t(d), ref), kl(ref + t(d), ref, "k3"))


@pytest.mark.exact
def test_dynamic_entropy_weight_bounds_eps_and_defaults():
    # sample variance of [0, 2] is 2: w = coef / (2 + eps), inside the bounds
    assert dynamic_entropy_weight(t([0.0, 2.0]), coef=0.3, eps=0.5).item() == pytest.approx(0.3 / 2.5, abs=1e-15)
    # the default bounds are [0, 1]: a flat batch with a large coef is capped at 1
    assert dynamic_entropy_weight(t([1.0, 1.0, 1.0]), coef=5.0).item() == 1.0
    # default eps is 1e-2: a flat batch gives coef / 1e-2
    assert dynamic_entropy_weight(t([1.0, 1.0]), coef=1e-3).item() == pytest.approx(0.1, abs=1e-15)
    # a single valid reward has no variance: coef / eps, not NaN
    for rewards in (t([0.7]), t([0.7, float("nan")])):
        assert dynamic_entropy_weight(rewards, coef=0.02, eps=0.1).item() == pytest.approx(0.2, abs=1e-15)
    # min_weight binds from below, max_weight from above, exactly
    assert dynamic_entropy_weight(t([0.0, 10.0]), coef=1.0, min_weight=0.25).item() == 0.25
    assert dynamic_entropy_weight(t([0.0, 0.0]), coef=1.0, max_weight=0.75).item() == 0.75
    # the variance is over all rewards of the batch, whatever the shape; the result is detached, rewards' dtype
    rewards = t([[0.0, 1.0], [3.0, 2.0]], dtype=torch.float32, requires_grad=True)
    w = dynamic_entropy_weight(rewards, coef=0.1)
    assert w.dtype == torch.float32 and not w.requires_grad
    assert w.item() == pytest.approx(0.1 / (5 / 3 + 1e-2), rel=1e-6)
