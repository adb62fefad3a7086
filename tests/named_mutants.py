"""The wrong programs of issue 12, each run against the tests that must now fail on it.

A reviewer broke the code on purpose in a copy and found that the suite passed: the clip removed, the ratio pinned
at 1, the KL measured against the policy itself, a constant entropy weight where the dynamic one belongs, ... This
script makes each of those edits (and a few of their relatives) in a fresh copy of ``src/``, runs the named tests
against the copy, and prints whether they failed (the mutant is killed) or passed (it survived). Exit status 1 if
any survived. ``make mutation`` runs it after the mutation tool's random mutants; alone:

    .venv/bin/python tests/named_mutants.py            # all
    .venv/bin/python tests/named_mutants.py clip ratio # those whose name contains a word

Not part of the suite: each mutant costs a pytest start (about 10 s of CPU).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # under src/policygrad/
    old: str  # must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids (or files) that must fail


UPDATE_MATH = "tests/lm/test_update_math.py"
ALGORITHMS = "tests/control/test_algorithms.py"
TWO_UPDATES = f"{UPDATE_MATH}::test_two_updates_per_batch_follow_the_clipped_surrogate_where_the_clip_acts"
MUTANTS = [
    Mutant(
        "clip removed from policy_loss",
        "losses.py",
        "clipped = ratio.clamp(1.0 - clip_eps_low, 1.0 + eps_high) * advantages",
        "clipped = ratio * advantages",
        ("tests/test_losses.py", TWO_UPDATES),
    ),
    Mutant(
        "clip eps_low and eps_high swapped",
        "losses.py",
        "clipped = ratio.clamp(1.0 - clip_eps_low, 1.0 + eps_high) * advantages",
        "clipped = ratio.clamp(1.0 - eps_high, 1.0 + clip_eps_low) * advantages",
        ("tests/test_losses.py", TWO_UPDATES),
    ),
    Mutant(
        "ratio pinned at 1 in the update",
        "lm/update.py",
        "old_logprobs=rollout.logprobs[rows] if clipped else None,",
        "old_logprobs=logprobs.detach() if clipped else None,",
        (TWO_UPDATES, f"{UPDATE_MATH}::test_logged_advantages_of_a_real_run_follow_the_variant"),
    ),
    Mutant(
        "KL against the current policy instead of the frozen reference",
        "lm/scoring.py",
        "return rollout_logprobs(run.reference, rollout, config.temperature, config.micro_batch_size, run.autocast_dtype)",
        "return rollout_logprobs(run.model, rollout, config.temperature, config.micro_batch_size, run.autocast_dtype)",
        (f"{UPDATE_MATH}::test_logged_loss_is_the_policy_term_minus_the_dynamic_entropy_bonus_plus_the_kl",),
    ),
    Mutant(
        "KL term with the wrong sign",
        "lm/update.py",
        "loss = loss + kl_coef * mean_kl",
        "loss = loss - kl_coef * mean_kl",
        (f"{UPDATE_MATH}::test_one_update_with_entropy_and_kl_moves_the_weights_by_the_reference_gradient",),
    ),
    Mutant(
        "k2 and k3 swapped",
        "variants.py",
        '"k2": "policygrad.regularizers:k2", "k3": "policygrad.regularizers:k3"',
        '"k2": "policygrad.regularizers:k3", "k3": "policygrad.regularizers:k2"',
        (
            "tests/test_regularizers.py",
            f"{UPDATE_MATH}::test_one_update_with_entropy_and_kl_moves_the_weights_by_the_reference_gradient",
        ),
    ),
    Mutant(
        "update given the constant entropy_coef instead of the batch's dynamic weight",
        "lm/trainer.py",
        "run.model, run.optimizer, rollout, advantages, ref_logprobs, entropy_weight, config, run.autocast_dtype",
        "run.model, run.optimizer, rollout, advantages, ref_logprobs, config.entropy_coef, config, run.autocast_dtype",
        (f"{UPDATE_MATH}::test_logged_loss_is_the_policy_term_minus_the_dynamic_entropy_bonus_plus_the_kl",),
    ),
    Mutant(
        "entropy bonus halved",
        "lm/update.py",
        "loss = pg_loss - entropy_weight * mean_entropy if entropy_weight else pg_loss",
        "loss = pg_loss - 0.5 * entropy_weight * mean_entropy if entropy_weight else pg_loss",
        (
            f"{UPDATE_MATH}::test_one_update_with_entropy_and_kl_moves_the_weights_by_the_reference_gradient",
            "tests/lm/test_fast_paths.py::test_update_gradient_equals_the_hand_written_grpo_loss",
        ),
    ),
    Mutant(
        "GRPO advantages ignore scale_rewards and advantage_eps",
        "advantages.py",
        "return group_advantages(rewards, self.group_size, self.scale, self.eps)",
        "return group_advantages(rewards, self.group_size)",
        (
            "tests/lm/test_estimators.py::test_advantage_variants_by_name",
            f"{UPDATE_MATH}::test_logged_advantages_of_a_real_run_follow_the_variant",
        ),
    ),
    Mutant(
        "RLOO replaced by the plain group mean",
        "advantages.py",
        "return leave_one_out(rewards, self.group_size or rewards.shape[-1])",
        'return group_advantages(rewards, self.group_size or rewards.shape[-1], "none")',
        (
            "tests/lm/test_estimators.py::test_advantage_variants_by_name",
            f"{UPDATE_MATH}::test_logged_advantages_of_a_real_run_follow_the_variant",
        ),
    ),
    Mutant(
        "moving-average baseline replaced by the batch's own mean",
        "advantages.py",
        "advantages = (rewards - previous.unsqueeze(-1)).nan_to_num(0.0)",
        "advantages = (rewards - rewards.nanmean(-1, keepdim=True)).nan_to_num(0.0)",
        (
            "tests/lm/test_estimators.py::test_advantage_variants_by_name",
            f"{UPDATE_MATH}::test_logged_advantages_of_a_real_run_follow_the_variant",
        ),
    ),
    Mutant(
        "moving-average baseline updated before the advantages are taken (biased)",
        "advantages.py",
        "advantages = (rewards - previous.unsqueeze(-1)).nan_to_num(0.0)",
        "advantages = (rewards - moving_average(previous, rewards, self.decay).unsqueeze(-1)).nan_to_num(0.0)",
        (
            "tests/lm/test_estimators.py::test_advantage_variants_by_name",
            f"{UPDATE_MATH}::test_logged_advantages_of_a_real_run_follow_the_variant",
        ),
    ),
    Mutant(
        "dynamic entropy weight replaced by the constant",
        "variants.py",
        '"dynamic": "policygrad.regularizers:DynamicEntropyWeight",',
        '"dynamic": "policygrad.regularizers:ConstantEntropyWeight",',
        (
            "tests/lm/test_estimators.py::test_advantage_variants_by_name",
            f"{UPDATE_MATH}::test_logged_loss_is_the_policy_term_minus_the_dynamic_entropy_bonus_plus_the_kl",
        ),
    ),
    Mutant(
        "gradients zeroed instead of dropped before each update",
        "lm/update.py",
        "    for _ in range(config.updates_per_batch):\n        optimizer.zero_grad(set_to_none=True)",
        "    for _ in range(config.updates_per_batch):\n        optimizer.zero_grad(set_to_none=False)",
        (f"{UPDATE_MATH}::test_an_update_on_a_batch_with_no_token_that_counts_changes_nothing",),
    ),
    Mutant(
        "micro-batches weighted equally instead of by their tokens",
        "lm/update.py",
        "return rows_mask.sum().item() / max(batch_mask.sum().item(), 1)",
        "return rows_mask.shape[0] / batch_mask.shape[0]",
        (f"{UPDATE_MATH}::test_one_update_with_entropy_and_kl_moves_the_weights_by_the_reference_gradient",),
    ),
    Mutant(
        "bf16 autocast never enabled",
        "lm/rollout.py",
        "return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)",
        "return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=False)",
        (f"{UPDATE_MATH}::test_bfloat16_autocast_update_stays_within_a_stated_bound_of_float32",),
    ),
    Mutant(
        "the fused pass's entropy gradient ascends where it should descend (sign flipped)",
        "lm/logprobs.py",
        "out = log_pi.add_(entropies[part, None]).mul_(pi).mul_(-h[part, None])",
        "out = log_pi.add_(entropies[part, None]).mul_(pi).mul_(h[part, None])",
        (
            f"{UPDATE_MATH}::test_one_update_with_entropy_and_kl_moves_the_weights_by_the_reference_gradient",
            "tests/lm/test_logprobs.py",
        ),
    ),
    Mutant(
        "the fused pass's log-prob gradient without the drawn token's +1",
        "lm/logprobs.py",
        "out.scatter_add_(1, tokens[part, None], g[part, None])",
        "out.scatter_add_(1, tokens[part, None], 0 * g[part, None])",
        (
            f"{UPDATE_MATH}::test_one_update_with_entropy_and_kl_moves_the_weights_by_the_reference_gradient",
            "tests/lm/test_logprobs.py",
        ),
    ),
    # control/: the issue found PPO, NPG and REINFORCE checked only for a `value_loss` key and a saved file
    Mutant(
        "PPO without old log-probs (REINFORCE's gradient, no clip)",
        "control/algorithms.py",
        "old_logprobs=mb.old_logprobs,",
        "old_logprobs=None,",
        (f"{ALGORITHMS}::test_ppo_one_minibatch_step_clips_on_both_sides",),
    ),
    Mutant(
        "REINFORCE/A2C ascend the loss (advantage sign flipped)",
        "control/algorithms.py",
        "family.log_prob(params, batch.actions), _normalized(batch.advantages, cfg.normalize_advantages)",
        "family.log_prob(params, batch.actions), -_normalized(batch.advantages, cfg.normalize_advantages)",
        (
            f"{ALGORITHMS}::test_vanilla_step_is_the_score_function_gradient_with_entropy",
            f"{ALGORITHMS}::test_each_algorithm_learns_cartpole",
        ),
    ),
    Mutant(
        "NPG takes the full step without its line search",
        "control/algorithms.py",
        "step, fraction = backtracking_line_search(evaluate, full_step, float(gradient @ full_step), cfg.max_kl)",
        "step, fraction = full_step, 1.0",
        (f"{ALGORITHMS}::test_npg_line_search_backtracks_to_the_first_step_that_passes",),
    ),
    Mutant(
        "NPG's step twice the KL radius",
        "control/algorithms.py",
        "full_step = trust_region_step(direction, fvp(direction), cfg.max_kl)",
        "full_step = trust_region_step(direction, fvp(direction), 2 * cfg.max_kl)",
        (f"{ALGORITHMS}::test_npg_takes_the_natural_gradient_step_on_the_kl_radius",),
    ),
    Mutant(
        "vLLM engine never given the trained weights",
        "lm/setup.py",
        "            self.engine.push(vllm_engine.policy_weights(self.model, self.adapter))\n",
        "",
        ("tests/lm/test_vllm_engine.py::test_the_policy_reaches_the_engine_before_every_steps_sampling",),
    ),
    Mutant(
        "LoRA pushed to vLLM without its adapters",
        "lm/vllm_engine.py",
        "            tensor = tensor + deltas[name].to(tensor.dtype)",
        "            tensor = tensor",
        ("tests/lm/test_vllm_engine.py::test_lora_pushes_the_merged_weights",),
    ),
    Mutant(
        "vLLM's log-probs not the sampler's side of the importance ratio",
        "lm/vllm_engine.py",
        "            drawn[i, : len(ids)] = torch.tensor(logprobs)",
        "            pass",
        ("tests/lm/test_vllm_engine.py::test_the_policy_reaches_the_engine_before_every_steps_sampling",),
    ),
]


def run(mutant: Mutant, workdir: Path) -> tuple[list[str], float, str]:
    """Apply ``mutant`` to a fresh copy of src/ and run its tests there: (the tests that failed, seconds, pytest's
    last line)."""
    src = workdir / "src"
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(ROOT / "src", src)
    path = src / "policygrad" / mutant.file
    text = path.read_text()
    if mutant.old and text.count(mutant.old) != 1:
        raise SystemExit(
            f"named_mutants: {mutant.name!r}: the text to replace occurs {text.count(mutant.old)} times "
            f"in {mutant.file}, not once; update this script"
        )
    path.write_text(text.replace(mutant.old, mutant.new))
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *mutant.tests],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if result.returncode not in (0, 1) or " error" in last:  # a mutant that does not import proves nothing
        raise SystemExit(f"named_mutants: {mutant.name!r}: pytest could not run the tests: {last}")
    failed = [line.split()[1].split("::", 1)[-1] for line in lines if line.startswith("FAILED ")]
    return failed, time.perf_counter() - started, last


def main(words: list[str]) -> int:
    chosen = [m for m in MUTANTS if not words or any(w.lower() in m.name.lower() for w in words)]
    survivors = 0
    with tempfile.TemporaryDirectory(prefix="policygrad-mutant-") as tmp:
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        unchanged, seconds, last = run(Mutant("the code as it is", "losses.py", "", "", tests), Path(tmp))
        if unchanged:
            raise SystemExit(f"named_mutants: the tests fail on the code as it is ({last}); fix them first")
        print(f"passed   {seconds:5.1f}s  the code as it is  [{last}]", flush=True)
        for mutant in chosen:
            failed, seconds, last = run(mutant, Path(tmp))
            survivors += not failed
            print(f"{'killed  ' if failed else 'SURVIVED'} {seconds:5.1f}s  {mutant.name}", flush=True)
            cases = Counter(test.split("[", 1)[0] for test in failed)  # parametrised cases counted, not listed
            for test, count in cases.items():
                print(f"                 fails: {test}" + (f" ({count} cases)" if count > 1 else ""), flush=True)
    print(f"{len(chosen) - survivors} of {len(chosen)} named mutants killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
