"""Exact values and properties of policygrad.losses."""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from policygrad.losses import aggregate, policy_loss, truncated_importance_weights, value_loss

DTYPE = torch.float64  # the exact values are compared to 1e-15


def t(data, dtype=DTYPE, **kwargs) -> torch.Tensor:
    """``torch.tensor`` in float64 unless told otherwise."""
    return torch.tensor(data, dtype=dtype, **kwargs)


VALUES = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = t([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


@pytest.mark.exact
def test_aggregate_by_hand():
    assert aggregate(VALUES, MASK, "token_mean").item() == pytest.approx((1 + 2 + 4) / 3, abs=1e-15)
    assert aggregate(VALUES, MASK, "sequence_mean").item() == pytest.approx((1.5 + 4) / 2, abs=1e-15)
    assert aggregate(VALUES, MASK, "constant").item() == pytest.approx(7 / (2 * 3), abs=1e-15)
    assert aggregate(VALUES, MASK, "constant", max_len=10).item() == pytest.approx(7 / 20, abs=1e-15)
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(VALUES, MASK, "mean")


@pytest.mark.exact
def test_sequence_mean_skips_empty_rows():
    mask = t([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert aggregate(VALUES, mask, "sequence_mean").item() == 1.5


@pytest.mark.exact
def test_reinforce_loss_by_hand():
    logprobs = t([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    loss, metrics = policy_loss(logprobs, t([2.0, -1.0]), MASK)
    # per token -A*logprob: [2, 4, 6], [-0.5, -.5, -.5]; unmasked: 2, 4, -0.5
    assert loss.item() == pytest.approx((2 + 4 - 0.5) / 3, abs=1e-15)
    assert metrics == {}


@pytest.mark.exact
def test_clipped_surrogate_by_hand():
    old = torch.zeros(1, 4, dtype=DTYPE)
    ratios = t([[0.5, 0.9, 1.1, 1.5]])
    logprobs = ratios.log()
    advantages = t([[1.0, -1.0, 1.0, -1.0]])
    loss, m = policy_loss(logprobs, advantages, old_logprobs=old, clip_eps_low=0.2, clip_eps_high=0.28)
    # min(r A, clip(r) A): 1*0.5 vs .8 -> .5 ; -0.9 vs -0.9 ; 1.1 vs 1.1 ; -1.5 vs -1.28 -> -1.5
    assert loss.item() == pytest.approx(-(0.5 - 0.9 + 1.1 - 1.5) / 4, abs=1e-15)
    # gradient removed: token 0? r<0.8 but A>0 -> not clipped (min keeps r A). token 3: r>1.28 but A<0 -> not clipped
    assert m["clip_fraction"] == 0.0
    loss, m = policy_loss(logprobs, -advantages, old_logprobs=old, clip_eps_low=0.2, clip_eps_high=0.28)
    assert m["clip_fraction_low"] == 0.25 and m["clip_fraction_high"] == 0.25 and m["clip_fraction"] == 0.5
    assert m["ratio_mean"] == pytest.approx(0.75 + 0.25, abs=1e-15) and m["ratio_max"] == pytest.approx(1.5)
    expected_kl = sum(r - 1 - torch.log(t(r)).item() for r in [0.5, 0.9, 1.1, 1.5]) / 4
    assert m["approx_kl"] == pytest.approx(expected_kl, abs=1e-12)


@pytest.mark.property
@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 10_000))
def test_ratio_one_makes_clipped_gradient_equal_reinforce(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(B, T, generator=g, dtype=DTYPE) * 3).requires_grad_(True)
    advantages = torch.randn(B, generator=g, dtype=DTYPE)
    mask = (torch.rand(B, T, generator=g, dtype=DTYPE) > 0.3).double()
    mask[:, 0] = 1
    reinforce, _ = policy_loss(logprobs, advantages, mask)
    clipped, m = policy_loss(logprobs, advantages, mask, old_logprobs=logprobs.detach())
    (g1,) = torch.autograd.grad(reinforce, logprobs)
    (g2,) = torch.autograd.grad(clipped, logprobs)
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-15)
    assert m["clip_fraction"] == 0.0 and m["approx_kl"] == 0.0


@pytest.mark.exact
def test_value_loss_by_hand():
    values, returns = t([1.0, 2.0, 4.0]), t([2.0, 2.0, 1.0])
    loss, m = value_loss(values, returns)
    assert loss.item() == pytest.approx(0.5 * (1 + 0 + 9) / 3, abs=1e-15)
    # clipped around old = [1.5, 2, 2] with eps 0.5: clipped values [1, 2, 2.5] -> max(sq, clipped sq)
    loss, m = value_loss(values, returns, old_values=t([1.5, 2.0, 2.0]), clip_eps=0.5)
    assert loss.item() == pytest.approx(0.5 * (1 + 0 + 9) / 3, abs=1e-15)
    loss, m = value_loss(t([3.0]), t([0.0]), old_values=t([1.0]), clip_eps=0.5)
    assert loss.item() == pytest.approx(0.5 * 9) and m["value_clip_fraction"] == 0.0
    # moved from 0 to 2.9 toward a target of 3: the clipped prediction 0.5 is worse, so it is kept (no gradient)
    v = t([2.9], requires_grad=True)
    loss, m = value_loss(v, t([3.0]), old_values=t([0.0]), clip_eps=0.5)
    assert loss.item() == pytest.approx(0.5 * 2.5**2, abs=1e-15) and m["value_clip_fraction"] == 1.0
    assert torch.autograd.grad(loss, v)[0].item() == 0.0
    _, m = value_loss(t([1.0, 2.0, 3.0]), t([1.0, 2.0, 3.0]))
    assert m["explained_variance"] == 1.0


# --- the clipped surrogate where the clip acts ---------------------------------------------------------------------
def _surrogate_reference(r: float, a: float, eps_low: float, eps_high: float) -> tuple[float, float, str]:
    """One token of PPO's clipped surrogate from its definition (Schulman et al. 2017, eq. 7, with DAPO's two ranges):
    (loss, d loss / d log pi, which clip removed the gradient: "low", "high" or "")."""
    clipped_r = min(max(r, 1 - eps_low), 1 + eps_high)
    loss = -min(r * a, clipped_r * a)
    if clipped_r * a < r * a:  # the clipped term is the smaller one: a constant, no gradient
        return loss, 0.0, "low" if r < 1 - eps_low else "high"
    return loss, -r * a, ""  # d(r A)/d log pi = r A


# ratios on both sides of both bounds; 0.75 lies inside [1 - eps_high, 1 - eps_low] and 1.25 inside
# [1 + eps_low, 1 + eps_high], so swapping or merging the two ranges changes the answer
RATIOS = [0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5]
EPS_LOW, EPS_HIGH = 0.2, 0.3


@pytest.mark.exact
@pytest.mark.parametrize("advantage", [1.5, -2.0])
def test_clipped_surrogate_values_gradients_and_clip_fractions_where_the_clip_acts(advantage):
    ratios = t([RATIOS])
    logprobs = ratios.log().requires_grad_(True)
    advantages = torch.full_like(ratios, advantage)
    loss, m = policy_loss(
        logprobs, advantages, old_logprobs=torch.zeros_like(ratios), clip_eps_low=EPS_LOW, clip_eps_high=EPS_HIGH
    )
    reference = [_surrogate_reference(r, advantage, EPS_LOW, EPS_HIGH) for r in RATIOS]
    n = len(RATIOS)
    assert loss.item() == pytest.approx(sum(value for value, _, _ in reference) / n, abs=1e-15)
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(grad, t([[g / n for _, g, _ in reference]]), rtol=0, atol=1e-15)
    # A > 0: only the top clips (r > 1.3: 1.5); A < 0: only the bottom (r < 0.8: 0.5, 0.75)
    expected_zero = [1.5] if advantage > 0 else [0.5, 0.75]
    assert [r for r, g in zip(RATIOS, grad[0].tolist()) if g == 0.0] == expected_zero
    low = sum(side == "low" for _, _, side in reference) / n
    high = sum(side == "high" for _, _, side in reference) / n
    assert (low, high) == ((0.0, 1 / n) if advantage > 0 else (2 / n, 0.0))
    assert m["clip_fraction_low"] == pytest.approx(low, abs=1e-15)
    assert m["clip_fraction_high"] == pytest.approx(high, abs=1e-15)
    assert m["clip_fraction"] == pytest.approx(low + high, abs=1e-15)
    assert m["ratio_mean"] == pytest.approx(sum(RATIOS) / n, abs=1e-15) and m["ratio_max"] == pytest.approx(1.5)


@pytest.mark.exact
def test_clip_fraction_counts_only_tokens_whose_gradient_was_removed():
    # (ratio, advantage): outside the range with the "wrong" sign (the min keeps r A), A = 0 (nothing to remove),
    # exactly on a bound (clamp passes the gradient there), and one token of each side that is clipped
    cases = [(0.5, 0.5), (1.5, -0.5), (0.5, 0.0), (1.5, 0.0), (0.8, -1.0), (1.3, 1.0), (0.5, -1.0), (1.5, 1.0)]
    logprobs = t([[r for r, _ in cases]]).log().requires_grad_(True)
    advantages = t([[a for _, a in cases]])
    loss, m = policy_loss(
        logprobs,
        advantages,
        old_logprobs=torch.zeros(1, len(cases), dtype=DTYPE),
        clip_eps_low=EPS_LOW,
        clip_eps_high=EPS_HIGH,
    )
    assert m["clip_fraction_low"] == 1 / 8 and m["clip_fraction_high"] == 1 / 8 and m["clip_fraction"] == 2 / 8
    (grad,) = torch.autograd.grad(loss, logprobs)
    # on the bounds the gradient is the unclipped r A / n; only the last two tokens lose theirs
    torch.testing.assert_close(grad[0, 4:], t([0.8 / 8, -1.3 / 8, 0.0, 0.0]), rtol=0, atol=1e-15)


@pytest.mark.exact
def test_clip_default_range_is_symmetric_0_2():
    logprobs = t([[0.75, 1.25, 0.85, 1.15]]).log()
    old = torch.zeros(1, 4, dtype=DTYPE)
    _, m = policy_loss(logprobs, t([[-1.0, 1.0, -1.0, 1.0]]), old_logprobs=old)
    assert m["clip_fraction_low"] == 0.25 and m["clip_fraction_high"] == 0.25
    # eps_high defaults to eps_low
    _, m = policy_loss(logprobs, t([[-1.0, 1.0, -1.0, 1.0]]), old_logprobs=old, clip_eps_low=0.1)
    assert m["clip_fraction_low"] == 0.5 and m["clip_fraction_high"] == 0.5


@pytest.mark.property
@settings(max_examples=100, deadline=None)
@given(
    # no subnormal advantages: at 5e-324, r * A and clip(r) * A round to the same few representable values
    # (5e-324 * 1.25 == 5e-324 * 1.375), so rounding, not the clip, decides which term is the smaller
    st.lists(
        st.tuples(st.floats(0.3, 2.0), st.floats(-3, 3, allow_subnormal=False), st.booleans()),
        min_size=1,
        max_size=8,
    ),
    st.floats(0.05, 0.5),
    st.floats(0.05, 0.5),
)
def test_clipped_surrogate_matches_the_definition(tokens, eps_low, eps_high):
    ratios = t([[r for r, _, _ in tokens]])
    logprobs = ratios.log().requires_grad_(True)
    mask = t([[float(keep) for _, _, keep in tokens]])
    advantages = t([[a for _, a, _ in tokens]])
    loss, m = policy_loss(logprobs, advantages, mask, torch.zeros_like(ratios), eps_low, eps_high)
    reference = [_surrogate_reference(r.item(), a, eps_low, eps_high) for r, (_, a, _) in zip(ratios[0], tokens)]
    kept = [keep for _, _, keep in tokens]
    n = max(sum(kept), 1)
    assert loss.item() == pytest.approx(sum(v for (v, _, _), k in zip(reference, kept) if k) / n, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, logprobs)
    torch.testing.assert_close(
        grad[0], t([g / n if k else 0.0 for (_, g, _), k in zip(reference, kept)]), rtol=0, atol=1e-12
    )
    for side in ("low", "high"):
        assert m[f"clip_fraction_{side}"] == pytest.approx(
            sum(s == side and k for (_, _, s), k in zip(reference, kept)) / n, abs=1e-15
        )


@pytest.mark.exact
def test_clipped_surrogate_with_sequence_advantages_mask_and_constant_aggregation():
    ratios = t([[0.5, 1.0, 1.5], [1.2, 0.6, 2.0]])
    mask = t([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    advantages = t([1.0, -1.0])  # (B,): one per sequence
    logprobs = ratios.log()
    loss, m = policy_loss(logprobs, advantages, mask, torch.zeros(2, 3, dtype=DTYPE), 0.2, 0.3, "constant", max_len=4)
    # row 0 (A=1): -min(.5, .8) = -.5, -1 ; row 1 (A=-1): -min(-1.2, -1.2) = 1.2, -min(-.6, -.8) = .8, -min(-2, -1.3) = 2
    assert loss.item() == pytest.approx((-0.5 - 1.0 + 1.2 + 0.8 + 2.0) / (2 * 4), abs=1e-15)
    assert m["clip_fraction_low"] == pytest.approx(1 / 5) and m["clip_fraction_high"] == 0.0
    assert m["ratio_max"] == 2.0  # the masked 1.5 of row 0 is left out only if ratio_max honours the mask
    loss, _ = policy_loss(logprobs, advantages, mask, aggregation="constant", max_len=4)  # REINFORCE
    assert loss.item() == pytest.approx(-(logprobs * mask * t([[1.0], [-1.0]])).sum().item() / 8, abs=1e-15)


@pytest.mark.exact
def test_policy_loss_metrics_with_one_token_and_with_none():
    logprobs = t([[0.5, 3.0]]).log()
    _, m = policy_loss(logprobs, t([[-1.0, 1.0]]), t([[1.0, 0.0]]), torch.zeros(1, 2, dtype=DTYPE))
    assert m["clip_fraction_low"] == 1.0 and m["ratio_mean"] == 0.5 and m["ratio_max"] == 0.5
    loss, m = policy_loss(logprobs, t([[-1.0, 1.0]]), torch.zeros(1, 2, dtype=DTYPE), torch.zeros(1, 2, dtype=DTYPE))
    assert loss.item() == 0.0 and m["clip_fraction"] == 0.0 and m["ratio_mean"] == 0.0 and m["ratio_max"] == 1.0


@pytest.mark.property
def test_policy_loss_leading_dimensions_are_rows():
    torch.manual_seed(0)
    logprobs, old = -torch.rand(2, 3, 5, dtype=DTYPE), -torch.rand(2, 3, 5, dtype=DTYPE)
    advantages, mask = torch.randn(2, 3, dtype=DTYPE), (torch.rand(2, 3, 5, dtype=DTYPE) > 0.3).double()
    for old_logprobs in (None, old):
        for aggregation in ("token_mean", "sequence_mean", "constant"):
            loss, m = policy_loss(logprobs, advantages, mask, old_logprobs, aggregation=aggregation)
            flat, m_flat = policy_loss(
                logprobs.reshape(6, 5),
                advantages.reshape(6),
                mask.reshape(6, 5),
                None if old_logprobs is None else old.reshape(6, 5),
                aggregation=aggregation,
            )
            assert loss.item() == pytest.approx(flat.item(), abs=1e-14)
            assert m == pytest.approx(m_flat, abs=1e-14)


@pytest.mark.property
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float64])
def test_results_do_not_depend_on_the_mask_dtype(mask_dtype):
    torch.manual_seed(1)
    logprobs, old = -torch.rand(3, 7, dtype=torch.float32), -torch.rand(3, 7, dtype=torch.float32)
    advantages, keep = torch.randn(3, dtype=torch.float32), torch.rand(3, 7, dtype=DTYPE) > 0.4
    mask = keep.to(mask_dtype)
    loss, m = policy_loss(logprobs, advantages, mask, old)
    loss32, m32 = policy_loss(logprobs, advantages, keep.float(), old)
    assert loss.dtype == torch.float32 and loss.item() == loss32.item() and m == m32
    values, returns = torch.randn(3, 7, dtype=torch.float32), torch.randn(3, 7, dtype=torch.float32)
    loss, m = value_loss(values, returns, mask, old_values=torch.zeros_like(values), clip_eps=0.5)
    loss32, m32 = value_loss(values, returns, keep.float(), old_values=torch.zeros_like(values), clip_eps=0.5)
    assert loss.dtype == torch.float32 and loss.item() == loss32.item() and m == m32
    for mode in ("token_mean", "sequence_mean", "constant"):
        out = aggregate(values, mask, mode)
        assert out.dtype == torch.float32 and out.item() == aggregate(values, keep.float(), mode).item()


# --- aggregate -----------------------------------------------------------------------------------------------------
@pytest.mark.property
def test_aggregate_default_is_token_mean_and_leading_dimensions_are_rows():
    assert aggregate(VALUES, MASK).item() == aggregate(VALUES, MASK, "token_mean").item()
    torch.manual_seed(2)
    values, mask = torch.randn(2, 3, 4, dtype=DTYPE), (torch.rand(2, 3, 4, dtype=DTYPE) > 0.5).double()
    mask[0, 1] = 0.0  # an empty row
    for mode in ("token_mean", "sequence_mean", "constant"):
        flat = aggregate(values.reshape(6, 4), mask.reshape(6, 4), mode, max_len=5)
        assert aggregate(values, mask, mode, max_len=5).item() == pytest.approx(flat.item(), abs=1e-15)
    # by hand: constant divides by rows * T whatever the leading shape
    assert aggregate(torch.ones(2, 3, 4, dtype=DTYPE), torch.ones(2, 3, 4, dtype=DTYPE), "constant").item() == 1.0


# --- value_loss ----------------------------------------------------------------------------------------------------
@pytest.mark.exact
def test_value_loss_clip_on_both_sides_and_its_fraction():
    # old = 0, eps = 0.5: values 2 (target 3, moved up past the range: clipped prediction .5 is worse -> kept),
    # -2 (target -3, moved down past the range -> kept), 0.3 (inside the range: both terms equal, not counted)
    values = t([2.0, -2.0, 0.3], requires_grad=True)
    returns = t([3.0, -3.0, 1.0])
    loss, m = value_loss(values, returns, old_values=torch.zeros(3, dtype=DTYPE), clip_eps=0.5)
    assert loss.item() == pytest.approx(0.5 * (2.5**2 + 2.5**2 + 0.7**2) / 3, abs=1e-15)
    assert m["value_clip_fraction"] == pytest.approx(2 / 3, abs=1e-15)
    (grad,) = torch.autograd.grad(loss, values)
    torch.testing.assert_close(grad, t([0.0, 0.0, (0.3 - 1.0) / 3]), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="^value_loss: clip_eps needs old_values$"):
        value_loss(values, returns, clip_eps=0.5)


@pytest.mark.exact
def test_value_loss_one_dimensional_mask_and_aggregation():
    values, returns, mask = t([1.0, 2.0, 4.0, 0.0]), t([2.0, 2.0, 1.0, 9.0]), t([1.0, 1.0, 1.0, 0.0])
    loss, m = value_loss(values, returns, mask)
    assert loss.item() == pytest.approx(0.5 * (1 + 0 + 9) / 3, abs=1e-15)
    # explained variance over the three tokens that count: Var(R) = 1/3, Var(R - V) = Var([1, 0, -3]) = 13/3
    assert m["explained_variance"] == pytest.approx(1 - 13, abs=1e-12)
    loss, _ = value_loss(
        t([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]]),
        t([[2.0, 2.0, 0.0], [1.0, 0.0, 0.0]]),
        t([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),
        aggregation="sequence_mean",
    )
    assert loss.item() == pytest.approx((0.5 * (1 + 0) / 2 + 0.5 * 9) / 2, abs=1e-15)


@pytest.mark.exact
def test_explained_variance_edge_cases():
    # two tokens (sample variances): Var(R) = Var([1, 2]) = .5, Var(R - V) = Var([1, -1]) = 2 -> 1 - 4
    _, m = value_loss(t([0.0, 3.0]), t([1.0, 2.0]))
    assert m["explained_variance"] == pytest.approx(-3.0, abs=1e-15)
    _, m = value_loss(t([0.5, 1.0]), t([1.0, 2.0]))  # Var(R) = .5, Var([.5, 1]) = .125
    assert m["explained_variance"] == pytest.approx(0.75, abs=1e-15)
    # constant targets: undefined, whatever the error
    _, m = value_loss(t([0.0, 3.0, 1.0]), t([1.0, 1.0, 1.0]))
    assert math.isnan(m["explained_variance"])
    # one token: NaN too, and quietly (no degrees-of-freedom warning from a variance of one value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, m = value_loss(t([0.0, 5.0]), t([1.0, 7.0]), t([1.0, 0.0]))
    assert math.isnan(m["explained_variance"])


@pytest.mark.exact
def test_truncated_importance_weights_by_hand():
    trainer = torch.tensor([[0.0, -1.0], [-2.0, 0.5]])
    sampler = torch.tensor([[0.0, -2.0], [-1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # the last token does not count in the metrics
    weights, metrics = truncated_importance_weights(trainer, sampler, cap=2.0, mask=mask)
    # min(exp(trainer - sampler), 2): exp(0) = 1, exp(1) = 2.718 -> 2, exp(-1) = 0.368, exp(0.5) = 1.649
    expected = torch.tensor([[1.0, 2.0], [math.exp(-1.0), math.exp(0.5)]])
    assert torch.allclose(weights, expected, rtol=0, atol=1e-7)
    assert not weights.requires_grad
    assert metrics["tis_weight_mean"] == pytest.approx((1.0 + 2.0 + math.exp(-1.0)) / 3, abs=1e-7)
    assert metrics["tis_capped_fraction"] == pytest.approx(1 / 3, abs=1e-7)
    assert metrics["tis_logprob_gap"] == pytest.approx((0.0 + 1.0 + 1.0) / 3, abs=1e-7)


@pytest.mark.property
@pytest.mark.parametrize("clipped", [False, True])
def test_importance_weights_scale_each_tokens_gradient(clipped):
    # the weighted loss's gradient is each token's unweighted gradient times its weight; weights of 1 change nothing
    torch.manual_seed(0)
    logprobs = torch.randn(3, 4, requires_grad=True)
    old = logprobs.detach() + 0.05 * torch.randn(3, 4) if clipped else None
    advantages, mask = torch.randn(3), torch.ones(3, 4)
    weights = torch.rand(3, 4) * 2

    def gradient(is_weights):
        logprobs.grad = None
        loss, _ = policy_loss(logprobs, advantages, mask, old, aggregation="token_mean", is_weights=is_weights)
        loss.backward()
        return loss.detach(), logprobs.grad.clone()

    plain_loss, plain = gradient(None)
    ones_loss, ones = gradient(torch.ones(3, 4))
    assert torch.equal(ones_loss, plain_loss) and torch.equal(ones, plain)
    _, weighted = gradient(weights)
    assert torch.allclose(weighted, plain * weights, rtol=1e-6, atol=1e-7)
