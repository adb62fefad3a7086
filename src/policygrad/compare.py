"""``policygrad compare``: runs grouped into arms, each arm's curves as a mean with a 95% band over seeds, and a
table of what each arm reached, with intervals. For ``policygrad train`` and ``policygrad control`` runs alike.

    policygrad compare runs/sweep                          # a sweep's folder: every run below it
    policygrad compare runs/a-seed0 runs/a-seed1 runs/b-seed0 --threshold 0.5

Runs are grouped by their config.yaml: runs whose settings differ only in the seed (and where or how they ran: the
folder, threads, progress) are one arm, named by the settings that tell the arms apart. For each arm, over its seeds:

- language-model runs: the held-out pass rate at each evaluation (greedy where the runs evaluated greedy) and the
  training reward per step, against step and against training time (the sum of ``step_time``);
- control runs: the return of the recent episodes against environment steps and wall time.

The table gives, per arm, n (seeds), the final and the best held-out pass rate (control: evaluation return, else the
final recent return), the mean training reward over the last 10 steps, and the steps each seed took to reach
``--threshold`` (how many seeds reached it; the median over those that did). Intervals are 95% Student-t intervals of
the mean over seeds: mean +- t(0.975, n-1) * s / sqrt(n); with one seed there is no interval ("n=1: one draw").
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import tyro

from policygrad.errors import UsageError
from policygrad.errors import require as _require
from policygrad.runs import CONFIG_FILE, METRICS_FILE

__all__ = ["CompareConfig", "Series", "group_runs", "mean_interval", "run_compare", "summarise"]

IGNORED = frozenset({"seed", "output_dir", "threads", "progress", "resume", "overwrite", "allow_config_change"})
"""Config fields that do not make two runs different arms."""

T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131)
"""Student's t, 0.975 quantile, for 1..15 degrees of freedom (above: the normal's 1.96 is within 4%)."""

LAST_STEPS = 10
"""Steps averaged for the final training reward."""


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval of the mean) of finite ``values``; half-width NaN for one value.

    >>> mean_interval([1.0, 2.0, 3.0])  # s = 1, t(0.975, 2) = 4.303
    (2.0, 2.4843...)
    """
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    mean = statistics.fmean(finite)
    if len(finite) < 2:
        return mean, math.nan
    t = T_975[len(finite) - 2] if len(finite) - 1 <= len(T_975) else 1.96
    return mean, t * statistics.stdev(finite) / math.sqrt(len(finite))


@dataclasses.dataclass
class CompareConfig:
    """Compare runs over seeds: each arm's curves as a mean with a 95% band, and a table with intervals (final and
    best held-out pass rate or return, final training reward, steps to a threshold)."""

    runs: Annotated[tuple[Path, ...], tyro.conf.Positional, tyro.conf.arg(metavar="RUN_OR_SWEEP_DIR")]
    """run folders, or folders holding runs (a sweep's OUTPUT_DIR): every run below them is taken"""
    out: Annotated[
        Path | None,
        tyro.conf.arg(metavar="FILE", help_behavior_hint="(default: compare.png in the first folder given)"),
    ] = None
    """image to write, .png, .pdf or .svg"""
    threshold: float | None = None
    """report the steps each seed took to reach this held-out pass rate (control: recent return)"""
    json: bool = False
    """print the table as JSON on stdout instead"""

    def __post_init__(self) -> None:
        self.runs = tuple(Path(r) for r in self.runs)
        _require(bool(self.runs), "RUN_OR_SWEEP_DIR", "give at least one run folder or sweep folder")
        for folder in self.runs:
            _require(folder.is_dir(), "RUN_OR_SWEEP_DIR", f"no such folder {folder}")
        if self.out is not None:
            self.out = Path(self.out)
            _require(
                self.out.suffix.lower() in (".png", ".pdf", ".svg"),
                "--out",
                f"file name must end in .png, .pdf or .svg, got {self.out}",
            )
        if self.threshold is not None:
            _require(math.isfinite(self.threshold), "--threshold", f"must be a finite number, got {self.threshold}")


@dataclasses.dataclass
class Series:
    """One run's curves: ``steps`` and ``times`` (seconds) per point of ``heldout`` (the held-out metric at its
    evaluations) and of ``reward`` (the training reward or recent return per step)."""

    folder: Path
    config: dict[str, Any]
    kind: str  # "train" or "control"
    reward: list[tuple[int, float, float]]  # (step, seconds, value)
    heldout: list[tuple[int, float, float]]


def find_runs(folders: Sequence[Path]) -> list[Path]:
    """Every run folder (config.yaml and metrics.jsonl) that is, or is below, one of ``folders``."""
    found: list[Path] = []
    for folder in folders:
        candidates = [folder, *sorted(p.parent for p in folder.rglob(CONFIG_FILE))]
        for candidate in candidates:
            is_run = (candidate / CONFIG_FILE).is_file() and (candidate / METRICS_FILE).is_file()
            if is_run and candidate not in found:
                found.append(candidate)
    return found


def read_series(folder: Path) -> Series:
    """The curves of the run in ``folder`` (see :class:`Series`)."""
    import yaml

    from policygrad.lm.plot import read_metrics, wall_times

    config = yaml.safe_load((folder / CONFIG_FILE).read_text()) or {}
    records = read_metrics(folder / METRICS_FILE)
    if any("return_recent" in r for r in records):  # policygrad control
        points = [(r["env_steps"], r["time"], _value(r.get("return_recent"))) for r in records if "env_steps" in r]
        return Series(folder, config, "control", points, [])
    times = wall_times(records)
    reward = [
        (r["step"], times.get(r["step"], math.nan), _value(r["reward_mean"])) for r in records if "reward_mean" in r
    ]
    key = _heldout_key(records)
    heldout = [(r["step"], times.get(r["step"], 0.0), _value(r[key])) for r in records if key and key in r]
    return Series(folder, config, "train", reward, heldout)


def _heldout_key(records: Sequence[Mapping[str, Any]]) -> str | None:
    keys = {k for r in records for k in r if k.startswith("eval/") and k.endswith("/pass_rate")}
    return "eval/greedy/pass_rate" if "eval/greedy/pass_rate" in keys else min(keys, default=None)


def _value(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def group_runs(series: Sequence[Series]) -> dict[str, list[Series]]:
    """Runs grouped into arms (same config but for :data:`IGNORED`), each named by the fields that differ between
    arms (``"all"`` when there is one arm)."""
    groups: dict[str, list[Series]] = {}
    keys: dict[str, dict[str, Any]] = {}
    for run in series:
        fields = {k: v for k, v in run.config.items() if k not in IGNORED}
        key = json.dumps(fields, sort_keys=True, default=str)
        groups.setdefault(key, []).append(run)
        keys[key] = fields
    if all(_sweep_arm(runs) for runs in groups.values()):  # a sweep's runs: its arm folders name them
        return {_sweep_arm(runs): runs for runs in groups.values()}
    if len(groups) == 1:
        return {"all": next(iter(groups.values()))}
    differing = sorted({k for f in keys.values() for k in f if len({json.dumps(g.get(k)) for g in keys.values()}) > 1})
    return {", ".join(f"{k}={keys[key].get(k)}" for k in differing): runs for key, runs in groups.items()}


def _sweep_arm(runs: Sequence[Series]) -> str:
    """The arm folder of a sweep (``OUTPUT_DIR/<arm>/seed-<s>``) holding every one of ``runs``, or ``""``."""
    parents = {s.folder.parent for s in runs}
    named = all(s.folder.name.startswith("seed-") for s in runs)
    return next(iter(parents)).name if named and len(parents) == 1 else ""


def summarise(runs: Sequence[Series], threshold: float | None) -> dict[str, Any]:
    """An arm's row: n, final and best held-out value, final training reward, steps to ``threshold``; each a
    (mean, half-width) over seeds where it is a number per seed."""
    scored = [s.heldout or s.reward for s in runs]  # control runs: the recent return per step
    final = [points[-1][2] if points else math.nan for points in scored]
    best = [max((v for *_, v in points if math.isfinite(v)), default=math.nan) for points in scored]
    last = [statistics.fmean([v for *_, v in s.reward[-LAST_STEPS:] if math.isfinite(v)] or [math.nan]) for s in runs]
    row: dict[str, Any] = {
        "n": len(runs),
        "final": mean_interval(final),
        "best": mean_interval(best),
        "reward_last": mean_interval(last),
        "steps": [max((p[0] for p in s.reward), default=0) for s in runs],
    }
    if threshold is not None:
        reached = []
        for s in runs:
            points = s.heldout or s.reward
            hit = next((step for step, _, v in points if math.isfinite(v) and v >= threshold), None)
            if hit is not None:
                reached.append(hit)
        row["reached"] = len(reached)
        row["steps_to_threshold"] = statistics.median(reached) if reached else None
    return row


def run_compare(config: CompareConfig) -> int:
    """``policygrad compare``: find the runs, group them, print the table, draw the figure."""
    folders = find_runs(config.runs)
    if not folders:
        raise UsageError("RUN_OR_SWEEP_DIR", f"no policygrad run (config.yaml and {METRICS_FILE}) in {config.runs[0]}")
    series = [read_series(folder) for folder in folders]
    kinds = {s.kind for s in series}
    _require(len(kinds) == 1, "RUN_OR_SWEEP_DIR", "mixes policygrad train and policygrad control runs")
    groups = group_runs(series)
    rows = {arm: summarise(runs, config.threshold) for arm, runs in groups.items()}
    if config.json:
        print(json.dumps({"kind": kinds.pop(), "arms": rows}, indent=2, default=_json_value))
        return 0
    _print_table(rows, series[0].kind, config.threshold)
    out = config.out or config.runs[0] / "compare.png"
    _draw(groups, out, series[0].kind)
    print(f"wrote {out}")
    return 0


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else str(value)


def _cell(pair: tuple[float, float], digits: int) -> str:
    mean, half = pair
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}" + (f" +- {half:.{digits}f}" if math.isfinite(half) else " (n=1)")


def _print_table(rows: Mapping[str, Mapping[str, Any]], kind: str, threshold: float | None) -> None:
    from rich.console import Console
    from rich.table import Table

    digits = 3 if kind == "train" else 1
    held = "held-out pass rate" if kind == "train" else "return"
    table = Table(title=f"{len(rows)} arms, mean +- 95% interval over seeds", title_justify="left")
    for name in ("arm", "n", f"final {held}", f"best {held}", "training reward, last 10 steps"):
        table.add_column(
            name,
            justify="left" if name == "arm" else "right",
            overflow="fold",
            min_width=len(name) if name == "arm" else None,
        )
    if threshold is not None:
        table.add_column(f"steps to {threshold:g} (seeds reaching)", justify="right")
    for arm, row in rows.items():
        cells = [arm, str(row["n"]), _cell(row["final"], digits), _cell(row["best"], digits)]
        cells.append(_cell(row["reward_last"], digits))
        if threshold is not None:
            steps = row["steps_to_threshold"]
            cells.append(f"{'-' if steps is None else f'{steps:g}'} ({row['reached']}/{row['n']})")
        table.add_row(*cells)
    Console().print(table)


def _band(runs: Sequence[Series], which: str, axis: int) -> tuple[list[float], list[float], list[float]]:
    """x, mean and 95% half-width of the arm's curve ``which`` against ``axis`` (0: step, 1: seconds), the seeds
    interpolated onto the points of the shortest one."""
    import numpy as np

    curves = [getattr(s, which) for s in runs if getattr(s, which)]
    if not curves:
        return [], [], []
    grid = [p[axis] for p in min(curves, key=lambda c: c[-1][axis])]
    values = np.array([np.interp(grid, [p[axis] for p in c], [p[2] for p in c]) for c in curves])
    pairs = [mean_interval(list(column)) for column in values.T]
    return grid, [m for m, _ in pairs], [0.0 if not math.isfinite(h) else h for _, h in pairs]


def _draw(groups: Mapping[str, Sequence[Series]], out: Path, kind: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        [("heldout", "held-out pass rate"), ("reward", "training reward")]
        if kind == "train"
        else [("reward", "return (recent episodes)")]
    )
    xlabels = ("step", "training seconds") if kind == "train" else ("environment steps", "seconds")
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.6 * len(panels)), squeeze=False)
    for row, (which, label) in enumerate(panels):
        for column, xlabel in enumerate(xlabels):
            ax = axes[row][column]
            for arm, runs in groups.items():
                x, mean, half = _band(runs, which, column)
                if not x:
                    continue
                line = ax.plot(x, mean, label=f"{arm} (n={len(runs)})")[0]
                ax.fill_between(
                    x,
                    [m - h for m, h in zip(mean, half)],
                    [m + h for m, h in zip(mean, half)],
                    color=line.get_color(),
                    alpha=0.2,
                )
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("mean over seeds, band: 95% interval of the mean")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
