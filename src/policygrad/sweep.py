"""``policygrad sweep``: one recipe, a grid of overrides and a list of seeds, run as separate runs; resumable.

    policygrad sweep recipes/cpu-dynamic.yaml --set entropy_weight=dynamic,constant --seeds 0 1 2 --parallel 2
    policygrad compare runs/sweep                    # curves with confidence bands and a table over seeds

Each ``--set FIELD=V1,V2,...`` is one axis of the grid; the arms are every combination (the product), each run with
every seed. A run is an ordinary ``policygrad train`` (or ``control``) run in ``OUTPUT_DIR/<arm>/seed-<s>``, started
as a child process from a recipe file written to ``OUTPUT_DIR/recipes/`` (the base recipe with the arm's values, the
seed and the folder), so every run can be read, plotted, evaluated or resumed on its own. Every recipe is loaded and
checked before the first run starts: a typo in a field or value is one line, and nothing runs.

Resumable: a finished run (``final/`` and ``eval.json`` for train, ``policy.pt`` for control) is not run again; a run
stopped half way is resumed from its newest checkpoint (``--resume``); the others start. Ctrl-C stops the running
children (each saves its checkpoint) and the sweep; the same command continues it. With ``--parallel N`` N runs go at
a time, each with one torch thread (two single-thread runs side by side use a 2-core machine best).

Standard library plus YAML: the runs import torch, the sweep does not.
"""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import tyro

from policygrad.errors import UsageError
from policygrad.errors import require as _require
from policygrad.runs import CONFIG_FILE

__all__ = ["Arm", "SweepConfig", "arms", "planned_runs", "run_sweep"]

COMMAND_CONFIGS = {
    "train": "policygrad.lm.config:load_config",
    "control": "policygrad.control.config:load_config",
}
"""The commands a sweep runs, with the loader that checks their recipes."""

RECIPES = "recipes"
LOGS = "logs"
"""Folders of ``OUTPUT_DIR`` beside the arms: the recipe file and the output of every run."""


@dataclasses.dataclass
class SweepConfig:
    """Run a recipe over a grid of overrides and a list of seeds, each as its own run; resumable. Compare the runs
    with `policygrad compare OUTPUT_DIR`."""

    recipe: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="RECIPE")]
    """the recipe every run starts from (a policygrad train or control recipe)"""
    set: tuple[str, ...] = ()
    """one axis of the grid per FIELD=V1,V2,... (values parsed as YAML); the arms are every combination"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """the seeds each arm runs with"""
    command: Literal["train", "control"] = "train"
    """the command that runs each recipe"""
    output_dir: Path = Path("runs/sweep")
    """the sweep's folder: OUTPUT_DIR/<arm>/seed-<s> per run, plus recipes/ and logs/"""
    parallel: int = 1
    """runs at a time; above 1 each run gets one torch thread"""
    dry_run: bool = False
    """check every recipe and print what would run, then stop"""

    def __post_init__(self) -> None:
        self.recipe = Path(self.recipe)
        self.output_dir = Path(self.output_dir)
        self.set = tuple(self.set)
        self.seeds = tuple(self.seeds)
        _require(self.recipe.is_file(), "RECIPE", f"no such file {self.recipe}")
        _require(bool(self.seeds), "--seeds", "give at least one seed")
        _require(len(set(self.seeds)) == len(self.seeds), "--seeds", f"repeats a seed: {list(self.seeds)}")
        _require(1 <= self.parallel <= 64, "--parallel", f"must be in [1, 64], got {self.parallel}")
        axes = [_axis(item) for item in self.set]
        names = [name for name, _ in axes]
        _require(len(set(names)) == len(names), "--set", f"names a field twice: {names}")
        for name in names:
            _require(
                name not in ("seed", "output_dir", "resume", "overwrite"),
                "--set",
                f"{name} is set by the sweep itself (use --seeds and --output-dir)",
            )


@dataclasses.dataclass(frozen=True)
class Arm:
    """One point of the grid: its overrides and the folder name made of them (``base`` without any)."""

    values: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        return ",".join(f"{field}={_text(value)}" for field, value in self.values) or "base"


def _axis(item: str) -> tuple[str, list[Any]]:
    """``"field=a,b"`` -> ``("field", [a, b])``, each value parsed as YAML (``1e-5`` as a number)."""
    import yaml

    name, sep, text = item.partition("=")
    name = name.strip().lstrip("-").replace("-", "_")
    _require(bool(sep) and bool(name) and bool(text), "--set", f"expected FIELD=V1,V2,..., got {item!r}")
    values = []
    for part in text.split(","):
        try:
            value = yaml.safe_load(part)
        except yaml.YAMLError:
            value = part
        if isinstance(value, str) and _is_number(value):  # YAML 1.1 reads "1e-5" as text
            value = float(value)
        values.append(value)
    _require(len(set(map(_text, values))) == len(values), "--set", f"{name} repeats a value: {text}")
    return name, values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _text(value: Any) -> str:
    return str(value).replace("/", "_").replace(" ", "")


def arms(config: SweepConfig) -> list[Arm]:
    """Every combination of the ``--set`` axes, in the order given (the first axis slowest)."""
    axes = [_axis(item) for item in config.set]
    names = [name for name, _ in axes]
    return [Arm(tuple(zip(names, combination))) for combination in itertools.product(*[v for _, v in axes])]


def planned_runs(config: SweepConfig) -> list[tuple[Arm, int, Path]]:
    """(arm, seed, run folder) of every run of the sweep, arm by arm."""
    return [(arm, seed, config.output_dir / arm.name / f"seed-{seed}") for arm in arms(config) for seed in config.seeds]


def _recipe_values(config: SweepConfig, arm: Arm, seed: int, folder: Path) -> dict[str, Any]:
    import yaml

    base = yaml.safe_load(config.recipe.read_text(encoding="utf-8")) or {}
    if not isinstance(base, dict):
        raise UsageError(str(config.recipe), "a recipe is a mapping of field: value")
    values = {**base, **dict(arm.values), "seed": seed, "output_dir": str(folder)}
    values.pop("resume", None)
    values.pop("overwrite", None)
    values["progress"] = False
    if config.parallel > 1:
        values["threads"] = 1
    return values


def _write_recipes(config: SweepConfig) -> list[tuple[Arm, int, Path, Path]]:
    """Check the recipe of every run (each loaded by its command's loader, from a scratch folder), then write them
    all into ``OUTPUT_DIR/recipes``: a bad field or value is one line naming it, and nothing is written or run."""
    import importlib
    import tempfile

    import yaml

    module, attribute = COMMAND_CONFIGS[config.command].split(":")
    load = getattr(importlib.import_module(module), attribute)
    planned, texts = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        for arm, seed, run in planned_runs(config):
            text = yaml.safe_dump(_recipe_values(config, arm, seed, run), sort_keys=False)
            trial = Path(scratch) / "recipe.yaml"
            trial.write_text(text)
            try:
                load(trial)
            except UsageError as err:
                where = f"arm {arm.name}, " if arm.values else ""
                said = str(err).replace(str(trial), str(config.recipe))  # the user's recipe, not the scratch copy
                raise UsageError("--set" if arm.values else str(config.recipe), f"{where}{said}") from None
            path = config.output_dir / RECIPES / f"{arm.name}.seed-{seed}.yaml"
            texts[path] = text
            planned.append((arm, seed, run, path))
    for path, text in texts.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return planned


def finished(command: str, run: Path) -> bool:
    """Whether the run in ``run`` has finished (its final save is there)."""
    if command == "control":
        return (run / "policy.pt").is_file()
    return (run / "final").is_dir() and (run / "eval.json").is_file()


def run_sweep(config: SweepConfig) -> int:
    """``policygrad sweep``: write and check every recipe, then run what is not finished, ``parallel`` at a time."""
    planned = _write_recipes(config)
    todo = [(arm, seed, run, recipe) for arm, seed, run, recipe in planned if not finished(config.command, run)]
    print(
        f"policygrad sweep: {len(arms(config))} arms x {len(config.seeds)} seeds = {len(planned)} runs in "
        f"{config.output_dir}; {len(planned) - len(todo)} finished, {len(todo)} to run",
        flush=True,
    )
    if config.dry_run:
        for *_, run, recipe in todo:
            print(f"  {run}: {' '.join(_argv(config, run, recipe)[2:])}")
        return 0
    (config.output_dir / LOGS).mkdir(parents=True, exist_ok=True)
    failures = _run_all(config, todo)
    if failures:
        print(f"policygrad sweep: {len(failures)} of {len(todo)} runs failed: " + "; ".join(failures), file=sys.stderr)
        return 1
    print(f"policygrad sweep: done; compare with: policygrad compare {config.output_dir}", flush=True)
    return 0


def _argv(config: SweepConfig, run: Path, recipe: Path) -> list[str]:
    resume = ["--resume"] if (run / CONFIG_FILE).is_file() else []  # a stopped run goes on from its checkpoint
    return [sys.executable, "-m", "policygrad", config.command, "--recipe", str(recipe), *resume]


def _run_all(config: SweepConfig, todo: list[tuple[Arm, int, Path, Path]]) -> list[str]:
    """Run ``todo``, ``parallel`` at a time; return ``"<run>: exit N (see <log>)"`` for each run that failed."""
    waiting, running, failures = list(todo), [], []
    try:
        while waiting or running:
            while waiting and len(running) < config.parallel:
                arm, seed, run, recipe = waiting.pop(0)
                log = config.output_dir / LOGS / f"{arm.name}.seed-{seed}.log"
                handle = log.open("a")
                child = subprocess.Popen(_argv(config, run, recipe), stdout=handle, stderr=subprocess.STDOUT)
                running.append((child, run, log, handle, time.perf_counter()))
                print(f"policygrad sweep: started {run}", flush=True)
            time.sleep(0.2)
            for entry in [entry for entry in running if entry[0].poll() is not None]:
                child, run, log, handle, started = entry
                running.remove(entry)
                handle.close()
                if child.returncode != 0:
                    failures.append(f"{run}: exit {child.returncode} (see {log})")
                seconds = time.perf_counter() - started
                print(
                    f"policygrad sweep: {'finished' if child.returncode == 0 else 'FAILED'} {run} in {seconds:.0f} s",
                    flush=True,
                )
    except KeyboardInterrupt:  # the children got the same SIGINT: each finishes its step, saves and stops
        for child, *_ in running:
            child.wait()
        raise
    return failures
