"""``policygrad plot RUN_DIR``: a language-model run's curves, drawn from its ``metrics.jsonl`` into one figure.

The trainer's :class:`~policygrad.lm.trainer.RunLog` writes one JSON object per step (``reward_mean``,
``entropy``, ``grad_norm``, ...) and, on evaluation steps, the held-out results as ``eval/<decoding>/<metric>``;
a run that evaluates periodically also logs the untrained model's results as step 0 (a line with eval/ keys only),
and the final evaluation arrives as a second line for the last step. The figure has a panel per training metric
that the run logged, then the held-out pass rate against step and against cumulative training wall time (the sum of
``step_time``, evaluation excluded; step 0 sits at 0 s): the second is the fair axis when comparing runs whose steps
cost differently.

Imports nothing heavy at module level (matplotlib loads inside :func:`plot_run`), so ``policygrad --help`` stays
instant.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import tyro

from policygrad.errors import UsageError
from policygrad.runs import METRICS_FILE

__all__ = ["PANELS", "PlotConfig", "heldout_series", "plot_run", "read_metrics", "run_plot", "wall_times"]

SUFFIXES = (".png", ".pdf", ".svg")
"""File types the figure can be written as (matplotlib picks the format from the suffix)."""

PANELS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("reward", ("reward_mean",), "mean reward (band: ± std)"),
    ("training pass rate", ("pass_rate", "length_rate", "digits_rate"), "fraction of completions"),
    ("entropy", ("entropy",), "nats per token"),
    ("entropy weight", ("entropy_weight",), "weight"),
    ("KL to the reference", ("kl",), "nats per token"),
    ("gradient norm", ("grad_norm",), "before clipping"),
    ("completion length", ("completion_chars",), "characters"),
    ("throughput", ("tokens_per_s",), "sampled tokens per s"),
)
"""The training panels: (title, metrics drawn in it, y label). A panel whose metrics the run never logged is left
out, and so is a constant entropy weight (a flat line says nothing the config does not)."""

SMOOTHING_POINTS = 25
"""A noisy curve gets a moving average over about len / SMOOTHING_POINTS steps (none below 2 * SMOOTHING_POINTS)."""


@dataclasses.dataclass
class PlotConfig:
    """Draw a language-model run's curves (reward, pass rates, entropy, KL, gradient norm, length, throughput) and
    its held-out pass rate against step and wall time, from the run's metrics.jsonl, into an image."""

    run_dir: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
    """the run folder that `policygrad train --output-dir` made (or its metrics.jsonl)"""
    out: Annotated[Path | None, tyro.conf.arg(metavar="FILE", help_behavior_hint="(default: RUN_DIR/curves.png)")] = (
        None
    )
    """image to write, .png, .pdf or .svg"""

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        if self.out is not None:
            self.out = Path(self.out)
            if self.out.suffix.lower() not in SUFFIXES:
                raise UsageError("--out", f"file name must end in one of {', '.join(SUFFIXES)}, got {self.out}")


# --------------------------------------------------------------------------------------------------------------
# Reading the log
# --------------------------------------------------------------------------------------------------------------


def metrics_path(run_dir: Path) -> Path:
    """``run_dir/metrics.jsonl`` (or ``run_dir`` itself when it is that file); a one-line UsageError when there is
    none, naming the path."""
    if run_dir.is_file() and run_dir.suffix == ".jsonl":
        return run_dir
    if not run_dir.exists():
        raise UsageError("RUN_DIR", f"no such folder {run_dir}")
    if not run_dir.is_dir():
        raise UsageError("RUN_DIR", f"{run_dir} is a file; give a run folder (or its {METRICS_FILE})")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise UsageError("RUN_DIR", f"{run_dir} has no {METRICS_FILE}, so it is not a policygrad run folder")
    return path


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, one per step in step order.

    Lines for the same step are merged, later values winning: the final evaluation is logged as a second line for
    the last step, and a resumed run logs again the steps after its last checkpoint. A last line without its
    newline is skipped (a run still writing it), any other malformed line is a UsageError naming ``path:line``.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(str(path), f"cannot read it: {exc}") from None
    lines = text.split("\n")
    by_step: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # no newline after it: still being written
                continue
            raise UsageError(
                f"{path}:{number}", f"not valid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UsageError(f"{path}:{number}", 'expected a JSON object with an integer "step"')
        by_step.setdefault(record["step"], {}).update(record)
    if not by_step:
        raise UsageError(str(path), "holds no steps yet (the run has not logged one)")
    return [by_step[step] for step in sorted(by_step)]


def _number(value: Any) -> float:
    """A logged value as a float for plotting; NaN (a gap in the line) for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


def series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that logged ``key``.

    >>> series([{"step": 1, "kl": 0.5}, {"step": 2}, {"step": 3, "kl": 0.25}], "kl")
    ([1, 3], [0.5, 0.25])
    """
    rows = [(r["step"], _number(r[key])) for r in records if key in r]
    return [s for s, _ in rows], [v for _, v in rows]


def wall_times(records: Sequence[Mapping[str, Any]]) -> dict[int, float]:
    """Step -> seconds of training up to the end of that step: the running sum of ``step_time`` (a step that did
    not log one adds nothing).

    >>> wall_times([{"step": 1, "step_time": 2.0}, {"step": 2, "step_time": 3.0}, {"step": 3}])
    {1: 2.0, 2: 5.0, 3: 5.0}
    """
    total, out = 0.0, {}
    for record in records:
        step_time = _number(record.get("step_time"))
        total += step_time if math.isfinite(step_time) else 0.0
        out[record["step"]] = total
    return out


def heldout_series(records: Sequence[Mapping[str, Any]]) -> tuple[str, dict[str, str]]:
    """The held-out metric to draw and its key per decoding: ``pass_rate`` where the run evaluated
    ``length_digits`` prompts, else ``mean_reward`` (prompts with other rewards have no pass rate).

    >>> heldout_series([{"step": 4, "eval/greedy/pass_rate": 0.1, "eval/greedy/mean_reward": 0.6}])
    ('pass_rate', {'greedy': 'eval/greedy/pass_rate'})
    >>> heldout_series([{"step": 1, "reward_mean": 0.2}])
    ('pass_rate', {})
    """
    keys = sorted({key for record in records for key in record if key.startswith("eval/")})
    for metric in ("pass_rate", "mean_reward"):
        found = {key.split("/")[1]: key for key in keys if key.count("/") == 2 and key.endswith("/" + metric)}
        if found:
            return metric, found
    return "pass_rate", {}


# --------------------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------------------


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` finite values (fewer at the start).

    >>> _moving_average([1.0, 3.0, float("nan"), 5.0], 2)
    [1.0, 2.0, 2.0, 4.0]
    """
    out, recent = [], []
    for value in values:
        if math.isfinite(value):
            recent = (recent + [value])[-window:]
        out.append(sum(recent) / len(recent) if recent else math.nan)
    return out


def _draw(ax: Any, steps: list[int], values: list[float], label: str, color: str) -> None:
    """The raw curve, with a moving average on top when there are many points."""
    if len(values) >= 2 * SMOOTHING_POINTS:
        window = max(2, len(values) // SMOOTHING_POINTS)
        ax.plot(steps, values, color=color, alpha=0.25, lw=0.8)
        ax.plot(steps, _moving_average(values, window), color=color, lw=1.5, label=f"{label} ({window}-step mean)")
    else:
        ax.plot(steps, values, color=color, lw=1.2, marker="o" if len(values) < 20 else None, ms=3, label=label)


def _constant(values: Sequence[float]) -> bool:
    finite = [v for v in values if math.isfinite(v)]
    return not finite or max(finite) == min(finite)


def plot_run(records: Sequence[Mapping[str, Any]], path: Path, title: str) -> list[str]:
    """Draw the figure for ``records`` (from :func:`read_metrics`) into ``path``; return the panels' titles.

    Raises UsageError when the records hold none of the metrics of :data:`PANELS` and no held-out results (the
    log of something other than ``policygrad train``).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panels: list[tuple[str, str, Any]] = []  # (title, y label, function drawing into an axis)

    for panel_title, keys, ylabel in PANELS:
        drawn = [(key, *series(records, key)) for key in keys]
        drawn = [(key, s, v) for key, s, v in drawn if s]
        if not drawn or (keys == ("entropy_weight",) and _constant(drawn[0][2])):
            continue

        def training(ax, drawn=drawn):
            for (key, steps, values), color in zip(drawn, colors):
                _draw(ax, steps, values, key, color)
                if key == "reward_mean":
                    std = dict(zip(*series(records, "reward_std")))
                    low = [v - std.get(s, math.nan) for s, v in zip(steps, values)]
                    high = [v + std.get(s, math.nan) for s, v in zip(steps, values)]
                    ax.fill_between(steps, low, high, color=color, alpha=0.15, lw=0)
            ax.set_xlabel("step")
            if len(drawn) > 1:
                ax.legend(fontsize="small")

        panels.append((panel_title, ylabel, training))

    metric, heldout = heldout_series(records)
    if heldout:
        times = wall_times(records)
        unit, unit_name = (60.0, "min") if max(times.values(), default=0.0) > 600 else (1.0, "s")
        has_time = any("step_time" in r for r in records)
        for against in ("step", "wall time") if has_time else ("step",):

            def evaluation(ax, against=against):
                for (decoding, key), color in zip(heldout.items(), colors):
                    steps, values = series(records, key)
                    xs = steps if against == "step" else [times[s] / unit for s in steps]
                    ax.plot(xs, values, color=color, marker="o", ms=3, lw=1.2, label=decoding)
                ax.set_xlabel("step" if against == "step" else f"training wall time ({unit_name})")
                if metric == "pass_rate":
                    ax.set_ylim(-0.02, 1.02)
                ax.legend(fontsize="small", title="decoding", title_fontsize="small")

            # right after the reward panel: the curves a reader looks for first
            panels.insert(
                min(len(panels), 1 + (against == "wall time")),
                (f"held-out {metric.replace('_', ' ')} vs {against}", metric.replace("_", " "), evaluation),
            )

    if not panels:
        known = ", ".join(keys[0] for _, keys, _ in PANELS)
        raise UsageError("RUN_DIR", f"its {METRICS_FILE} has none of the training metrics ({known}), nor eval/ ones")

    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.3 * rows), squeeze=False, constrained_layout=True)
    for ax, (panel_title, ylabel, draw) in zip(axes.flat, panels):
        draw(ax)
        if ax.get_xlabel() == "step":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(panel_title)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.remove()
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [panel_title for panel_title, _, _ in panels]


def _title(run_dir: Path, records: Sequence[Mapping[str, Any]]) -> str:
    """The run folder, with the model and advantage its config.yaml names when it has one."""
    from policygrad.runs import CONFIG_FILE

    title = f"{run_dir}  ({records[-1]['step']} steps)"
    config = run_dir / CONFIG_FILE
    if config.is_file():
        import yaml

        try:
            values = yaml.safe_load(config.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return title
        if isinstance(values, dict) and "model" in values:
            title += f"\nmodel {values['model']}, advantage {values.get('advantage', '?')}"
    return title


def run_plot(config: PlotConfig) -> int:
    """``policygrad plot``: read the run's metrics, draw, say where the image went. Returns the exit code."""
    path = metrics_path(config.run_dir)
    run_dir = path.parent
    out = config.out or run_dir / "curves.png"
    if not out.parent.is_dir():
        raise UsageError("--out", f"folder {out.parent} does not exist")
    records = read_metrics(path)
    panels = plot_run(records, out, _title(run_dir, records))
    steps = sum(record["step"] > 0 for record in records)  # step 0, when logged, is the evaluation before training
    print(f"wrote {out} ({len(panels)} panels from {steps} steps)")
    return 0
