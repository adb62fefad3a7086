"""The stored run: two steps of a tiny deterministic float32 GRPO training on the length_digits task, compared with
the numbers it gave when it was recorded (reproducibility.json, beside this file).

A dependency that changes what a run computes (torch's kernels or sampling, transformers' model code or weight
initialisation, the tokenizers library, our own code) shows up here as a named difference: the test fails with the
list of what moved, stored -> now, and the installed versions that differ from the recording. Bit-equal results across
CPUs are out of reach (vector widths and kernel choices reorder float sums), so floats are compared to a relative
1e-4, far above that reordering (~1e-7 in float32 on a model this size) and far below any change of behaviour;
completions, token counts and pass rates must be equal.

After a deliberate change of the numbers (an upgrade made on purpose, a change of the math), record them again:

    python tests/lm/test_reproducibility.py --record     # rewrites tests/lm/reproducibility.json
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.exact

RECORD = Path(__file__).with_name("reproducibility.json")
RTOL = 1e-4
PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "huggingface-hub", "jinja2")
STEP_KEYS = (
    "reward_mean",
    "reward_std",
    "zero_spread_groups",
    "advantage_std",
    "loss",
    "entropy",
    "grad_norm",
    "completion_tokens",
    "pass_rate",
    "digits_rate",
    "length_rate",
)
EVAL_KEYS = ("eval/greedy/pass_rate", "eval/greedy/mean_reward", "eval/greedy/mean_length")


def reference_run(folder: Path) -> dict:
    """Train the tiny chat model 2 steps on 12 length_digits prompts (rewards shaped + sharp, 2 prompts x 3
    completions of at most 8 tokens, float32, one thread) and return what the record holds."""
    sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]  # run as a script: tests/lm, tests/
    from lm_helpers import tiny_config, write_tiny_prompts
    from tiny_models import save_tiny

    from policygrad.lm.trainer import train

    model = save_tiny(folder / "model", "llama", chat=True)
    prompts = write_tiny_prompts(folder / "prompts.jsonl")
    initial = _weights_norm(model)
    config = tiny_config(
        model,
        prompts,
        folder / "run",
        rewards=("shaped", "sharp"),
        eval_every=2,
        eval_decoding=("greedy",),
        log_completions=6,
        lr=1e-2,
    )
    threads = torch.get_num_threads()
    try:
        run = train(config)
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [{key: row[key] for key in STEP_KEYS} for row in rows if "loss" in row]
    final = {key: rows[-1][key] for key in EVAL_KEYS}
    completions = [json.loads(line)["completion"] for line in (run / "completions.jsonl").read_text().splitlines()]
    return {
        "initial_weights_norm": initial,
        "steps": steps,
        "completions": completions,
        "final_eval": final,
        "final_weights_norm": _weights_norm(run / "final"),
    }


def _weights_norm(folder: Path) -> float:
    from safetensors.torch import load_file

    tensors = load_file(str(next(Path(folder).glob("*.safetensors"))))
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors.values()))


def versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in PACKAGES}


def differences(stored, now, path: str = "") -> list[str]:
    """Every leaf of ``now`` that differs from ``stored`` (floats beyond RTOL), as ``path: stored -> now``."""
    if isinstance(stored, dict) and isinstance(now, dict):
        return [
            d
            for key in sorted(set(stored) | set(now))
            for d in differences(stored.get(key), now.get(key), _join(path, key))
        ]
    if isinstance(stored, list) and isinstance(now, list) and len(stored) == len(now):
        return [d for i, (a, b) in enumerate(zip(stored, now)) for d in differences(a, b, f"{path}[{i}]")]
    if isinstance(stored, float) and isinstance(now, float) and math.isclose(stored, now, rel_tol=RTOL, abs_tol=1e-7):
        return []
    return [] if stored == now else [f"{path}: {stored!r} -> {now!r}"]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def test_two_tiny_steps_give_the_stored_numbers():
    record = json.loads(RECORD.read_text())
    with tempfile.TemporaryDirectory() as folder:
        now = reference_run(Path(folder))
    moved = differences(record["run"], now)
    changed = [
        f"{name} {was} -> {versions()[name]}" for name, was in record["versions"].items() if versions()[name] != was
    ]
    assert not moved, (
        f"the stored tiny run moved ({len(moved)} numbers): "
        + "; ".join(moved[:12])
        + f". Installed versions that differ from the recording: {', '.join(changed) or 'none'}."
        + " If the change is intended: python tests/lm/test_reproducibility.py --record"
    )


def test_the_comparison_names_what_moved():
    stored = {"steps": [{"loss": 0.5, "pass_rate": 0.0}], "completions": ["12 cats"]}
    now = {"steps": [{"loss": 0.5 * (1 + 2 * RTOL), "pass_rate": 0.0}], "completions": ["13 cats"]}
    assert differences(stored, now) == [
        "completions[0]: '12 cats' -> '13 cats'",
        f"steps[0].loss: 0.5 -> {0.5 * (1 + 2 * RTOL)!r}",
    ]
    assert (
        differences(stored, {"steps": [{"loss": 0.5 * (1 + RTOL / 10), "pass_rate": 0.0}], "completions": ["12 cats"]})
        == []
    )


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/lm/test_reproducibility.py --record")
    with tempfile.TemporaryDirectory() as folder:
        run = reference_run(Path(folder))
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    RECORD.write_text(json.dumps({"versions": versions(), "recorded_on": cpu, "run": run}, indent=1) + "\n")
    print(f"wrote {RECORD}")
