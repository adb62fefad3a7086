"""A run folder as ``policygrad train`` leaves one, for the export and serving tests (a module of its own name, so
``from serve_helpers import ...`` is not confused with another folder's conftest)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

RECIPE = {"model": "default", "task": "length_digits", "prompts": "pydoc", "heldout_prompts": 4, "eval_size": 4}
METRICS = [
    {"step": 0, "eval/greedy/pass_rate": 0.0, "eval/greedy/length_rate": 0.25, "eval/greedy/digits_rate": 0.0},
    {"step": 1, "loss": 0.5},
    {"step": 2, "eval/greedy/pass_rate": 0.5, "eval/greedy/length_rate": 0.75, "eval/greedy/digits_rate": 0.5},
]


def make_run(root: Path, model: Path, final: bool = True) -> Path:
    """A run folder as ``policygrad train`` leaves it after 2 steps: config.yaml, metrics.jsonl and final/ (or, with
    ``final=False``, checkpoints/step-000001 only)."""
    import yaml

    from policygrad import checkpointing

    run = root / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(RECIPE))
    (run / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in METRICS))

    def copy(tmp: Path) -> None:
        for item in model.iterdir():
            shutil.copyfile(item, tmp / item.name)

    if final:
        checkpointing.save_atomic(run / "final", copy, step=2)
    else:
        checkpointing.save_atomic(run / "checkpoints" / "step-000001", copy, step=1)
    return run
