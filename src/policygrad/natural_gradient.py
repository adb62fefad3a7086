"""The natural policy gradient: Fisher-vector products, conjugate gradient and a step inside a KL trust region.

The natural gradient (Amari 1998; Kakade 2001, "A Natural Policy Gradient") preconditions the vanilla gradient ``g``
with the inverse Fisher information matrix of the policy,

    F = E_s E_{a ~ pi(.|s)} [ grad log pi(a|s) grad log pi(a|s)^T ]  =  Hessian of  E_s KL(pi_old(.|s) || pi(.|s))
                                                                         at pi = pi_old,

so that the step measures distance between *distributions* rather than between parameter vectors. F has P x P
entries for P parameters, so it is never formed: conjugate gradient solves ``F x = g`` using only products ``F v``,
and each product costs two backward passes (Pearlmutter 1994, "Fast Exact Multiplication by the Hessian"). The step
is then scaled so that the quadratic model of the KL equals ``max_kl``, and a backtracking line search checks the
true KL and the surrogate improvement (Schulman et al. 2015, "Trust Region Policy Optimization", appendix C).

Shapes: P is the number of parameters; vectors are flat (P,) tensors in the order of ``params``.
Everything here is a pure function of tensors and closures; nothing holds state between calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "flat_grad",
    "fisher_vector_product",
    "conjugate_gradient",
    "trust_region_step",
    "backtracking_line_search",
]


def flat_grad(
    output: Tensor, params: Sequence[Tensor], create_graph: bool = False, retain_graph: bool | None = None
) -> Tensor:
    """Gradient of a scalar ``output`` with respect to ``params``, concatenated into one (P,) vector.

    Parameters that ``output`` does not depend on get zeros (instead of ``None``), so the layout is always that of
    ``torch.nn.utils.parameters_to_vector(params)``.
    """
    grads = torch.autograd.grad(
        output, list(params), create_graph=create_graph, retain_graph=retain_graph, allow_unused=True
    )
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def fisher_vector_product(kl: Tensor, params: Sequence[Tensor], damping: float = 0.0) -> Callable[[Tensor], Tensor]:
    """Return the function ``v -> (F + damping * I) v`` for the Fisher matrix at the current parameters.

        F v = grad_theta ( grad_theta KL(pi_old || pi_theta) . v )        at theta = theta_old

    The KL between the sampling policy and itself has value 0 and gradient 0 at ``theta_old``, and its Hessian there
    is the Fisher information matrix, so the double-backward product above is exactly ``F v`` (Schulman et al. 2015,
    appendix C.1; Martens 2020, "New Insights and Perspectives on the Natural Gradient Method", section 9, on why
    it equals the generalised Gauss-Newton matrix here). The first gradient is built once with
    ``create_graph=True`` and reused for every product, so each call costs one extra backward pass. ``damping`` adds
    ``damping * v``, Tikhonov regularisation that keeps conjugate gradient stable when F is nearly singular.

    Args:
        kl:      () mean KL(pi_old || pi_theta) over the batch's states, with a graph to ``params``; ``pi_old`` must be
                 detached (a constant) and equal to ``pi_theta`` in value.
        params:  the P parameters (tensors with ``requires_grad``).
        damping: >= 0.
    Returns:
        a function taking a (P,) vector and returning the (P,) product.
    """
    grad_kl = flat_grad(kl, params, create_graph=True)  # (P,)

    def product(vector: Tensor) -> Tensor:
        return flat_grad(grad_kl @ vector, params, retain_graph=True) + damping * vector

    return product


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10, residual_tol: float = 1e-10
) -> Tensor:
    """Approximately solve ``A x = b`` for a symmetric positive-definite ``A`` known only through ``matvec(v) = A v``.

    The method of conjugate gradients (Hestenes and Stiefel 1952; Nocedal and Wright, "Numerical Optimization",
    algorithm 5.2), started from ``x = 0``:

        r = p = b
        repeat:  alpha = r.r / p.Ap;   x += alpha p;   r_new = r - alpha Ap
                 stop if r_new.r_new < residual_tol;   p = r_new + (r_new.r_new / r.r) p

    In exact arithmetic it solves a P x P system in at most P steps; a handful (10 in TRPO) is enough for a search
    direction. The iterate after k steps minimises the A-norm of the error over a k-dimensional Krylov space.

    Args:
        matvec:       (P,) -> (P,), the product with A.
        b:            (P,) right-hand side.
        iters:        maximum number of iterations (products with A).
        residual_tol: stop once the squared residual norm falls below this.
    Returns:
        (P,) the approximate solution x.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    r_dot_r = r @ r
    for _ in range(iters):
        if r_dot_r < residual_tol:
            break
        a_p = matvec(p)
        alpha = r_dot_r / (p @ a_p)
        x = x + alpha * p
        r = r - alpha * a_p
        new_r_dot_r = r @ r
        p = r + (new_r_dot_r / r_dot_r) * p
        r_dot_r = new_r_dot_r
    return x


def trust_region_step(direction: Tensor, fisher_direction: Tensor, max_kl: float) -> Tensor:
    """Scale a search direction so that the quadratic model of the KL reaches the trust-region radius.

        KL(theta_old || theta_old + s)  ~=  1/2 s^T F s  =  max_kl     with  s = beta x
        =>  beta = sqrt( 2 max_kl / (x^T F x) )

    ``x`` is the natural-gradient direction ``F^-1 g`` (from :func:`conjugate_gradient`). Source: Schulman et al. 2015
    (TRPO), appendix C; with a fixed step size instead of a KL radius this is Kakade's natural policy gradient.

    Args:
        direction:        (P,) the search direction x.
        fisher_direction: (P,) the product F x.
        max_kl:           trust-region radius delta > 0 (in nats).
    Returns:
        (P,) the full step s; a zero direction (or a non-positive curvature) gives a zero step.
    """
    curvature = direction @ fisher_direction  # x^T F x
    if not torch.isfinite(curvature) or curvature <= 0:
        return torch.zeros_like(direction)
    return torch.sqrt(2.0 * max_kl / curvature) * direction


def backtracking_line_search(
    evaluate: Callable[[Tensor], tuple[float, float]],
    full_step: Tensor,
    expected_improvement: float,
    max_kl: float,
    backtrack_ratio: float = 0.5,
    max_backtracks: int = 10,
    accept_ratio: float = 0.1,
) -> tuple[Tensor, float]:
    """Shrink a step until it improves the surrogate and keeps the true KL inside the trust region.

    For ``f = 1, r, r^2, ...`` (r = ``backtrack_ratio``), accept the first step ``f * full_step`` with

        KL <= 1.5 * max_kl    and    improvement > 0    and    improvement / (f * expected_improvement) >= accept_ratio

    where ``improvement`` is the actual gain of the objective and ``expected_improvement = g . full_step`` its
    first-order prediction. The quadratic model behind :func:`trust_region_step` can be far off, which is why TRPO
    checks the real values (Schulman et al. 2015, section 6 and appendix C; the 1.5 slack on the KL is the one of
    OpenAI Baselines' ``trpo_mpi``).

    Args:
        evaluate:             maps a candidate step (P,) to ``(improvement, kl)`` as floats; it must leave the
                              parameters where it found them.
        full_step:            (P,) the step of :func:`trust_region_step`.
        expected_improvement: g . full_step, the linear prediction of the gain of the full step.
        max_kl:               the trust-region radius.
        backtrack_ratio:      shrink factor in (0, 1).
        max_backtracks:       the number of candidate steps tried.
        accept_ratio:         the smallest acceptable fraction of the predicted gain.
    Returns:
        (step, fraction): the accepted step and its fraction of ``full_step``; a zero step and 0.0 if none passed.
    """
    fraction = 1.0
    for _ in range(max_backtracks):
        step = fraction * full_step
        improvement, kl = evaluate(step)
        predicted = fraction * expected_improvement
        if kl <= 1.5 * max_kl and improvement > 0 and (predicted <= 0 or improvement / predicted >= accept_ratio):
            return step, fraction
        fraction *= backtrack_ratio
    return torch.zeros_like(full_step), 0.0
