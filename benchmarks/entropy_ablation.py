"""The seed's entropy-scaling hypothesis on a sparse-reward bandit (issue 19, study 1): an entropy bonus whose weight
is scaled by the inverse of the batch reward variance (``entropy_weight: dynamic``) against a constant bonus of the
same mean weight, and against none.

The bandit: K arms, arm k pays 1 with probability p_k and 0 otherwise (sparse: most batches score all zeros, so their
reward variance is 0 and the leave-one-out advantages vanish). The policy is softmax(theta) from theta = 0; each
update samples N arms, takes RLOO advantages (``policygrad.advantages.LeaveOneOut``), the entropy weight
(``policygrad.regularizers``: dynamic ``w = clip(c / (Var(r) + eps), 0, w_max)`` or constant ``w = c``), and one
step of ``policygrad.bandit.core.policy_update``. Every number is computed by the library's functions; the loop is
this script's.

The constant arm is matched to the dynamic one: its weight is the dynamic arm's mean realised weight (over all seeds
and steps of a first pass), so the two differ in *when* they explore, not how much. Reported per arm, over seeds:
the steps to reach J >= threshold (J = sum_k pi_k p_k, exact), the fraction of seeds that reached it, J at the end,
the batch reward variance and the policy entropy over training (means over steps), each with a 95% interval.

    python benchmarks/entropy_ablation.py --json benchmarks/results/entropy_ablation.json    # 400 seeds per arm
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from policygrad.bandit.core import policy_update
from policygrad.compare import mean_interval
from policygrad.regularizers import entropy
from policygrad.variants import BANDIT_BASELINES, ENTROPY_WEIGHTS, build


def runs(args: argparse.Namespace, weight: str, coef: float) -> list[dict[str, float]]:
    """``args.seeds`` runs side by side (row s of every tensor is run s, seeded by the one generator): per run the
    steps to the threshold (inf if never), J at the end, the mean reward variance, entropy and entropy weight."""
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor(args.probs, dtype=torch.float64)
    S = args.seeds
    logits = torch.zeros(S, len(p), dtype=torch.float64)  # (S, K)
    estimator = build(BANDIT_BASELINES, "loo", SimpleNamespace(baseline_decay=0.9, group_size=args.samples))
    settings = SimpleNamespace(
        entropy_coef=coef, entropy_min_weight=0.0, entropy_max_weight=args.max_weight, entropy_eps=args.eps
    )
    entropy_weight = build(ENTROPY_WEIGHTS, weight, settings)  # each run's weight from its own batch's rewards
    reached = torch.full((S,), math.inf, dtype=torch.float64)
    variance = torch.zeros(S, dtype=torch.float64)
    entropy_sum = torch.zeros(S, dtype=torch.float64)
    weight_sum = torch.zeros(S, dtype=torch.float64)
    for step in range(args.steps):
        pi = logits.softmax(-1)  # (S, K)
        expected = pi @ p  # (S,) J, exact
        now = (expected >= args.threshold) & reached.isinf()  # noqa: SIM300 (a tensor on the left)
        reached = torch.where(now, torch.full_like(expected, step), reached)
        actions = torch.multinomial(pi, args.samples, replacement=True, generator=generator)  # (S, N)
        rewards = (torch.rand(actions.shape, generator=generator, dtype=p.dtype) < p[actions]).to(p.dtype)  # (S, N)
        w = torch.tensor([entropy_weight(row) for row in rewards], dtype=p.dtype)  # (S,)
        logits, _, _ = policy_update(logits, actions, estimator(rewards), args.lr, entropy_coef=w)
        variance += rewards.var(dim=-1)
        entropy_sum += entropy(logits)
        weight_sum += w
    final = logits.softmax(-1) @ p
    return [
        {
            "steps": float(reached[s]),
            "final_J": float(final[s]),
            "reward_var": float(variance[s]) / args.steps,
            "entropy": float(entropy_sum[s]) / args.steps,
            "weight": float(weight_sum[s]) / args.steps,
        }
        for s in range(S)
    ]


def summary_row(
    name: str, weight: str, coef: float, results: list[dict], keys: tuple[str, ...], budget: float, started: float
) -> dict:
    """An arm's row: the fraction of seeds that reached the threshold, the median steps of those that did, the mean
    steps with a run that never reached it counted at the budget (a lower bound on its true steps), and the mean of
    each of ``keys``, each mean with its 95% interval over seeds."""
    reached = [r["steps"] for r in results if math.isfinite(r["steps"])]
    row = {
        "arm": name,
        "entropy_weight": weight,
        "coef": coef,
        "seeds": len(results),
        "reached": len(reached) / len(results),
        "median_steps_reached": statistics.median(reached) if reached else None,
        "seconds": time.perf_counter() - started,
        "steps_capped": mean_interval([min(r["steps"], budget) for r in results]),
    }
    for key in keys:
        row[key] = mean_interval([r[key] for r in results])
    return row


def arm(name: str, weight: str, coef: float, args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    results = runs(args, weight, coef)
    return summary_row(name, weight, coef, results, ("final_J", "reward_var", "entropy", "weight"), args.steps, started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probs", type=float, nargs="+", default=[0.1, 0.06, 0.06, 0.06, 0.06, 0.03, 0.03, 0.03])
    parser.add_argument("--samples", type=int, default=8, help="N, arms sampled per update")
    parser.add_argument("--lr", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=400)
    parser.add_argument("--coefs", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3], help="c of c / (Var(r) + eps)")
    parser.add_argument("--eps", type=float, default=0.01)
    parser.add_argument("--max-weight", type=float, default=0.2)
    parser.add_argument("--threshold", type=float, default=0.09, help="J to reach (the best arm pays 0.1)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [arm("none", "constant", 0.0, args)]
    for coef in args.coefs:
        rows.append(arm(f"dynamic, c = {coef:g}", "dynamic", coef, args))
        matched = rows[-1]["weight"][0]  # the dynamic arm's mean realised weight
        rows.append(arm(f"constant, matched to c = {coef:g}", "constant", matched, args))
    print(
        f"{len(args.probs)} arms paying 1 with probabilities {args.probs}; N = {args.samples}, lr = {args.lr}, "
        f"{args.steps} steps, {args.seeds} seeds per arm; threshold J >= {args.threshold}"
    )
    print(
        "| arm | mean weight | seeds reaching the threshold | median steps (those that did) | steps (unreached: the "
        "budget) | J at the end | reward variance | entropy (nats) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:

        def cell(pair, digits=3):
            return f"{pair[0]:.{digits}f} +- {pair[1]:.{digits}f}"

        print(
            f"| {row['arm']} | {row['weight'][0]:.2g} | {row['reached']:.3f} | {row['median_steps_reached']} | "
            f"{cell(row['steps_capped'], 0)} | {cell(row['final_J'], 4)} | {cell(row['reward_var'], 4)} | "
            f"{cell(row['entropy'])} |"
        )
    if args.json is not None:
        settings = {**vars(args), "json": str(args.json)}
        args.json.write_text(json.dumps({"settings": settings, "arms": rows}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
