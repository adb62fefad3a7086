"""natural_gradient.py against explicit linear algebra: Fisher-vector products against a Fisher matrix built from its
definition, conjugate gradient against a direct solve, the trust-region scale, the line search."""

from __future__ import annotations

import pytest
import torch

from policygrad.control.policies import Policy
from policygrad.natural_gradient import (
    backtracking_line_search,
    conjugate_gradient,
    fisher_vector_product,
    flat_grad,
    trust_region_step,
)

DTYPE = torch.float64  # the exact comparisons are to 1e-10 and better


def _fvp_matrix(policy: Policy, obs: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
    """(P, P) matrix whose columns are F e_i, from fisher_vector_product."""
    params = list(policy.parameters())
    with torch.no_grad():
        old = policy(obs)
    fvp = fisher_vector_product(policy.family.kl(old, policy(obs)).mean(), params, damping)
    size = sum(p.numel() for p in params)
    return torch.stack([fvp(e) for e in torch.eye(size, dtype=DTYPE)], dim=1)


@pytest.mark.exact
def test_fisher_vector_product_matches_explicit_categorical_fisher():
    torch.manual_seed(0)
    policy = Policy(obs_size=3, action_size=3, hidden=(4,), family="categorical").to(DTYPE)
    obs = torch.randn(5, 3, dtype=DTYPE)
    params = list(policy.parameters())
    # F = mean_s sum_a pi(a|s) grad log pi(a|s) grad log pi(a|s)^T, the expectation over actions by enumeration
    explicit = 0
    for s in range(obs.shape[0]):
        logp = torch.log_softmax(policy(obs[s : s + 1]), -1)[0]
        for a in range(3):
            score = flat_grad(logp[a], params, retain_graph=True)
            explicit = explicit + logp[a].exp().detach() * torch.outer(score, score)
    explicit = explicit / obs.shape[0]
    assert torch.allclose(_fvp_matrix(policy, obs), explicit, atol=1e-10)
    damped = _fvp_matrix(policy, obs, damping=0.1)
    assert torch.allclose(damped, explicit + 0.1 * torch.eye(len(explicit), dtype=DTYPE), atol=1e-10)


@pytest.mark.exact
def test_fisher_vector_product_matches_explicit_gaussian_fisher():
    torch.manual_seed(1)
    policy = Policy(obs_size=2, action_size=2, hidden=(3,), family="gaussian", log_std_init=-0.3).to(DTYPE)
    with torch.no_grad():
        policy.log_std.copy_(torch.tensor([-0.3, 0.4], dtype=DTYPE))
    obs = torch.randn(4, 2, dtype=DTYPE)
    params = list(policy.parameters())
    # Fisher of N(mu, diag sigma^2) in (mu, log sigma) is diag(1/sigma^2, 2); chain rule through the network's Jacobian
    explicit = 0
    for s in range(obs.shape[0]):
        out = policy(obs[s : s + 1])[0]  # (2D,) = [mean | log_std]
        jac = torch.stack([flat_grad(out[i], params, retain_graph=True) for i in range(4)])  # (2D, P)
        metric = torch.diag(torch.cat([(-2 * out[2:]).exp(), torch.full((2,), 2.0, dtype=DTYPE)])).detach()
        explicit = explicit + jac.T @ metric @ jac
    explicit = explicit / obs.shape[0]
    assert torch.allclose(_fvp_matrix(policy, obs), explicit, atol=1e-10)


@pytest.mark.exact
def test_conjugate_gradient_matches_direct_solve():
    torch.manual_seed(2)
    m = torch.randn(8, 8, dtype=DTYPE)
    a = m @ m.T + 0.5 * torch.eye(8, dtype=DTYPE)  # symmetric positive definite
    b = torch.randn(8, dtype=DTYPE)
    x = conjugate_gradient(lambda v: a @ v, b, iters=50, residual_tol=1e-20)
    assert torch.allclose(x, torch.linalg.solve(a, b), atol=1e-8)


@pytest.mark.exact
def test_conjugate_gradient_is_exact_in_as_many_steps_as_distinct_eigenvalues():
    # two distinct eigenvalues -> two iterations suffice
    a = torch.diag(torch.tensor([1.0, 1.0, 4.0, 4.0, 4.0], dtype=DTYPE))
    b = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=DTYPE)
    x = conjugate_gradient(lambda v: a @ v, b, iters=2)
    assert torch.allclose(x, b / a.diagonal(), atol=1e-10)


@pytest.mark.exact
def test_conjugate_gradient_of_zero_is_zero():
    assert torch.equal(conjugate_gradient(lambda v: 2 * v, torch.zeros(3, dtype=DTYPE)), torch.zeros(3, dtype=DTYPE))


@pytest.mark.property
def test_trust_region_step_puts_the_quadratic_kl_on_the_radius():
    torch.manual_seed(3)
    m = torch.randn(5, 5, dtype=DTYPE)
    fisher = m @ m.T + torch.eye(5, dtype=DTYPE)
    direction = torch.randn(5, dtype=DTYPE)
    step = trust_region_step(direction, fisher @ direction, max_kl=0.01)
    assert torch.allclose(0.5 * step @ fisher @ step, torch.tensor(0.01, dtype=DTYPE))
    assert torch.allclose(step / step.norm(), direction / direction.norm())  # same direction, only scaled
    assert torch.equal(
        trust_region_step(torch.zeros(5, dtype=DTYPE), torch.zeros(5, dtype=DTYPE), 0.01), torch.zeros(5, dtype=DTYPE)
    )


@pytest.mark.exact
def test_backtracking_line_search_shrinks_until_the_kl_fits():
    full = torch.ones(3, dtype=DTYPE)
    # KL grows like the squared step fraction: 1.0, 0.25, 0.0625, ... ; the radius 0.05 (x1.5) first admits 1/4
    evaluate = lambda step: (float(step.sum()), float((step[0]) ** 2))  # noqa: E731
    step, fraction = backtracking_line_search(evaluate, full, expected_improvement=3.0, max_kl=0.05)
    assert fraction == 0.25 and torch.allclose(step, 0.25 * full)


@pytest.mark.exact
def test_backtracking_line_search_rejects_steps_that_do_not_improve():
    step, fraction = backtracking_line_search(
        lambda s: (-1.0, 0.0), torch.ones(2, dtype=DTYPE), 1.0, 0.01, max_backtracks=4
    )
    assert fraction == 0.0 and torch.equal(step, torch.zeros(2, dtype=DTYPE))


@pytest.mark.exact
def test_flat_grad_layout_unused_parameters_and_graph():
    a = torch.tensor([1.0, 2.0], dtype=DTYPE, requires_grad=True)
    unused = torch.zeros(2, 2, dtype=DTYPE, requires_grad=True)
    b = torch.tensor(3.0, dtype=DTYPE, requires_grad=True)
    output = (a**2).sum() * b
    grad = flat_grad(output, [a, unused, b], retain_graph=True)
    assert grad.tolist() == [6.0, 12.0, 0.0, 0.0, 0.0, 0.0, 5.0]  # d/da = 2ab, zeros for the unused, d/db = |a|^2
    assert not grad.requires_grad  # no graph unless asked for
    assert flat_grad(output, [a, unused, b], create_graph=True).requires_grad


@pytest.mark.exact
def test_fisher_vector_product_has_no_damping_by_default():
    torch.manual_seed(4)
    policy = Policy(obs_size=2, action_size=3, hidden=(3,), family="categorical").to(DTYPE)
    obs = torch.randn(4, 2, dtype=DTYPE)
    params = list(policy.parameters())
    with torch.no_grad():
        old = policy(obs)
    kl = policy.family.kl(old, policy(obs)).mean()
    vector = torch.randn(sum(p.numel() for p in params), dtype=DTYPE)
    torch.testing.assert_close(
        fisher_vector_product(kl, params)(vector), _fvp_matrix(policy, obs) @ vector, rtol=0, atol=1e-12
    )


@pytest.mark.exact
def test_conjugate_gradient_defaults_ten_iterations_and_a_tolerance_of_1e_10():
    a = torch.diag(torch.arange(1.0, 13.0, dtype=DTYPE))  # twelve distinct eigenvalues: not solved exactly in ten steps
    b = torch.ones(12, dtype=DTYPE)
    x = conjugate_gradient(lambda v: a @ v, b)
    assert torch.equal(x, conjugate_gradient(lambda v: a @ v, b, iters=10, residual_tol=1e-10))
    assert not torch.equal(x, conjugate_gradient(lambda v: a @ v, b, iters=11, residual_tol=1e-10))
    # a small right-hand side (|b|^2 = 1e-4) is still solved: the default tolerance is tiny
    small = torch.tensor([0.01, 0.0], dtype=DTYPE)
    torch.testing.assert_close(conjugate_gradient(lambda v: 2 * v, small), small / 2, rtol=0, atol=1e-15)


@pytest.mark.exact
def test_conjugate_gradient_stops_only_below_the_tolerance():
    b = torch.tensor([1.0, 0.0], dtype=DTYPE)  # r.r = 1 exactly
    assert conjugate_gradient(lambda v: 4 * v, b, residual_tol=1.0).tolist() == [0.25, 0.0]  # 1 < 1 is false: a step
    assert conjugate_gradient(lambda v: 4 * v, b, residual_tol=1.0 + 1e-9).tolist() == [0.0, 0.0]


@pytest.mark.exact
def test_trust_region_step_with_small_curvature_and_degenerate_cases():
    direction = torch.tensor([0.1, 0.2], dtype=DTYPE)
    fisher = torch.eye(2, dtype=DTYPE)  # x^T F x = 0.05 < 1: a small but positive curvature still gives a step
    step = trust_region_step(direction, fisher @ direction, max_kl=0.01)
    assert torch.allclose(step, (2 * 0.01 / 0.05) ** 0.5 * direction, rtol=0, atol=1e-15)
    # negative curvature
    assert torch.equal(trust_region_step(direction, -direction, 0.01), torch.zeros(2, dtype=DTYPE))
    assert torch.equal(
        trust_region_step(direction, torch.tensor([float("nan"), 0.0], dtype=DTYPE), 0.01), torch.zeros(2, dtype=DTYPE)
    )


@pytest.mark.exact
def test_backtracking_line_search_accepts_the_full_step_and_scales_it():
    full = torch.tensor([2.0, 4.0], dtype=DTYPE)
    step, fraction = backtracking_line_search(lambda s: (1.0, 0.0), full, expected_improvement=1.0, max_kl=0.01)
    assert fraction == 1.0 and torch.equal(step, full)
    calls = []

    def evaluate(step):
        calls.append(step.clone())
        return (1.0, 1.0) if len(calls) < 3 else (1.0, 0.0)  # the KL fits from the third candidate on

    step, fraction = backtracking_line_search(evaluate, full, 1.0, 0.01)
    assert fraction == 0.25 and torch.equal(step, 0.25 * full)
    assert [c.tolist() for c in calls] == [[2.0, 4.0], [1.0, 2.0], [0.5, 1.0]]


@pytest.mark.exact
def test_backtracking_line_search_kl_bound_is_one_and_a_half_radii_inclusive():
    full = torch.ones(1, dtype=DTYPE)
    assert backtracking_line_search(lambda s: (1.0, 1.5), full, 1.0, max_kl=1.0)[1] == 1.0  # on the bound
    kls = iter([2.0, 1.0])  # twice the radius is refused, the half step accepted
    assert backtracking_line_search(lambda s: (1.0, next(kls)), full, 1.0, max_kl=1.0)[1] == 0.5


@pytest.mark.exact
def test_backtracking_line_search_improvement_ratio():
    full = torch.ones(1, dtype=DTYPE)
    # the gain must be at least accept_ratio of the linear prediction fraction * expected_improvement, inclusive
    assert backtracking_line_search(lambda s: (0.25, 0.0), full, 1.0, 1.0, accept_ratio=0.25)[1] == 1.0
    # prediction 4: a gain of 0.3 is 7.5% at the full step (refused), 15% at the half step (accepted)
    assert backtracking_line_search(lambda s: (0.3, 0.0), full, 4.0, 1.0)[1] == 0.5
    # a small prediction (0.5) does not waive the check: a gain of 2% of it at every fraction is refused ten times
    calls = []
    step, fraction = backtracking_line_search(lambda s: calls.append(s) or (0.01 * s.item(), 0.0), full, 0.5, 1.0)
    # ten candidates by default
    assert fraction == 0.0 and torch.equal(step, torch.zeros(1, dtype=DTYPE)) and len(calls) == 10
    # no predicted gain (expected_improvement <= 0): any real gain is accepted, none is not
    assert backtracking_line_search(lambda s: (1e-6, 0.0), full, 0.0, 1.0)[1] == 1.0
    assert backtracking_line_search(lambda s: (0.0, 0.0), full, 0.0, 1.0)[1] == 0.0
    assert backtracking_line_search(lambda s: (0.0, 0.0), full, -1.0, 1.0)[1] == 0.0
