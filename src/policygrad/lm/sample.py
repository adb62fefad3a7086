"""``policygrad sample``: read what a model writes, before and after training.

Generation goes through :func:`policygrad.lm.rollout.sample`, the very function training and evaluation use, so what
you read here is what the trainer scored (same chat formatting, same EOS handling, same temperature and top-p).
Where the prompts carry ``length_digits`` targets (``target_length``, ``target_digit_sum``), every completion also
gets the task's verdict from :func:`policygrad.lm.tasks.check`: its length, its digit sum, and whether it passes.

Which prompts:

    --prompt TEXT (repeatable)     exactly these
    --prompts FILE.jsonl           the first ``num_prompts`` lines of the file (a "prompt" per line, any fields)
    --prompts pydoc | hf:NAME      the first ``num_prompts`` held-out prompts of that source
    neither                        the held-out prompts of the run that saved ``--model`` (its config.yaml says which
                                   source and task settings), else those of the embedded pydoc task

Only this module's functions import torch and transformers, so ``policygrad --help`` stays instant.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import tyro

from policygrad import runs
from policygrad.configs import default_hint
from policygrad.errors import UsageError
from policygrad.errors import require as _require
from policygrad.lm import tasks
from policygrad.lm.config import PRECISIONS
from policygrad.runs import CONFIG_FILE

if TYPE_CHECKING:  # pragma: no cover
    from policygrad.lm.config import GRPOConfig

__all__ = ["SampleConfig", "generate", "run_sample", "verdicts"]


@dataclasses.dataclass
class SampleConfig:
    """Generate completions from a model or checkpoint and show them; on length_digits prompts, with the task's
    verdict for each (characters, digit sum, pass)."""

    model: str = "default"
    """a run's final/ or checkpoints/step-N/ folder (or the run folder: its latest save), a model folder, a Hugging
    Face id, or "default" (the embedded SmolLM2-135M-Instruct)"""
    prompt: tyro.conf.UseAppendAction[tuple[str, ...]] = ()
    """a prompt to complete; repeat the flag for several"""
    prompts: Annotated[
        str | None, default_hint("the held-out prompts of the run that saved --model, else of pydoc")
    ] = None
    """a .jsonl file (its first num_prompts lines), or "pydoc" / hf:<dataset>[:split] (their held-out prompts)"""
    num_prompts: int = 4
    """prompts taken from --prompts or the held-out set (ignored with --prompt)"""
    num_samples: int = 3
    """completions per prompt (greedy decoding gives one: every greedy completion of a prompt is the same)"""
    max_new_tokens: int = 48
    """longest completion in tokens"""
    temperature: float = 1.0
    """sampling temperature (> 0)"""
    top_p: float = 1.0
    """nucleus sampling: keep the smallest set of tokens with this much probability, in (0, 1]"""
    greedy: bool = False
    """decode the most likely token at every step instead of sampling"""
    seed: int = 0
    """seeds the sampling: the same seed, model and prompts give the same completions"""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda or cuda:<index>"""
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    """bfloat16: bfloat16 autocast; auto: bfloat16 where the GPU or CPU has fast bfloat16 matrix products"""
    micro_batch_size: int = 32
    """sequences generated at once (prompts x completions per prompt); lower it if memory runs out"""
    threads: Annotated[int | None, default_hint("one per idle core")] = None
    """CPU threads for torch"""
    json: bool = False
    """print the completions as one JSON object on stdout instead of tables"""

    def __post_init__(self) -> None:
        self.prompt = tuple(self.prompt)
        _require(bool(self.model), "--model", "give a checkpoint or model folder, a Hugging Face id or 'default'")
        _require(all(p.strip() for p in self.prompt), "--prompt", "a prompt must not be empty")
        _require(not (self.prompt and self.prompts), "--prompt", "give --prompt or --prompts, not both")
        _require(self.num_prompts >= 1, "--num-prompts", f"must be at least 1, got {self.num_prompts}")
        _require(self.num_samples >= 1, "--num-samples", f"must be at least 1, got {self.num_samples}")
        _require(self.max_new_tokens >= 1, "--max-new-tokens", f"must be at least 1, got {self.max_new_tokens}")
        _require(
            math.isfinite(self.temperature) and self.temperature > 0,
            "--temperature",
            f"must be a finite number > 0, got {self.temperature}",
        )
        _require(0 < self.top_p <= 1, "--top-p", f"must be in (0, 1], got {self.top_p}")
        _require(0 <= self.seed < 2**63, "--seed", f"must be in [0, 2**63), got {self.seed}")
        _require(
            self.device == "auto" or self.device == "cpu" or self.device.split(":")[0] == "cuda",
            "--device",
            f"must be auto, cpu, cuda or cuda:<index>, got {self.device!r}",
        )
        _require(self.precision in PRECISIONS, "--precision", f"must be one of {', '.join(PRECISIONS)}")
        _require(self.micro_batch_size >= 1, "--micro-batch-size", f"must be at least 1, got {self.micro_batch_size}")
        if self.threads is not None:
            _require(self.threads >= 1, "--threads", f"must be at least 1, got {self.threads}")

    @property
    def group_size(self) -> int:
        """G, completions per prompt: ``num_samples``, or 1 when greedy (the rest would be copies)."""
        return 1 if self.greedy else self.num_samples


# --------------------------------------------------------------------------------------------------------------
# Where the model and the prompts come from
# --------------------------------------------------------------------------------------------------------------


def _task_config(run: Path | None) -> GRPOConfig:
    """The prompt and task settings of the run (its config.yaml), else the training defaults."""
    from policygrad.lm.config import GRPOConfig, load_config

    return load_config(run / CONFIG_FILE) if run is not None else GRPOConfig()


def _records(config: SampleConfig, source: str, task: GRPOConfig, tokenizer: Any) -> list[dict[str, Any]]:
    """The prompt records to complete (see the module docstring for which)."""
    from policygrad.lm.data import prompts_for, read_jsonl

    if config.prompt:
        return [{"prompt": p} for p in config.prompt]
    if config.prompts is not None and config.prompts.endswith(".jsonl"):
        return read_jsonl(config.prompts)[: config.num_prompts]
    prompts = prompts_for(task, tokenizer, source)
    if not prompts.heldout:
        raise UsageError("--prompts", f"{source} has no held-out prompts; give --prompt TEXT or --prompts FILE.jsonl")
    return prompts.heldout[: config.num_prompts]


# --------------------------------------------------------------------------------------------------------------
# Generation and the task's verdict
# --------------------------------------------------------------------------------------------------------------


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    config: SampleConfig,
    autocast_dtype: Any = None,
) -> tuple[list[str], list[bool]]:
    """``config.group_size`` completions of each prompt, prompt by prompt (G consecutive entries per prompt), and
    whether each was cut off by ``max_new_tokens`` (no EOS) rather than ended by the model.

    The prompts go to :func:`~policygrad.lm.rollout.sample` in chunks of at most ``micro_batch_size`` sequences;
    the torch RNG is seeded once with ``config.seed`` before the first chunk.
    """
    import torch

    from policygrad.lm.rollout import sample

    torch.manual_seed(config.seed)
    per_call = max(1, config.micro_batch_size // config.group_size)
    completions: list[str] = []
    truncated: list[bool] = []
    model.eval()
    for start in range(0, len(prompts), per_call):
        rollout = sample(
            model,
            tokenizer,
            list(prompts[start : start + per_call]),
            config.group_size,
            config.max_new_tokens,
            config.temperature,
            config.top_p,
            greedy=config.greedy,
            autocast_dtype=autocast_dtype,
            score_tokens=False,
        )
        completions.extend(rollout.completions)
        truncated.extend(bool(t) for t in rollout.truncated.tolist())
    return completions, truncated


def verdicts(record: Mapping[str, Any], completions: Sequence[str]) -> list[dict[str, Any]] | None:
    """The ``length_digits`` verdict of each completion of ``record``'s prompt, or None when the record has no
    targets (a free-form prompt).

    >>> first, second = verdicts({"prompt": "p", "target_length": 2, "target_digit_sum": 10}, ["55", "5x5"])
    >>> first
    {'length': 2, 'digit_sum': 10, 'length_ok': True, 'digits_ok': True, 'passed': True}
    >>> second["length"], second["passed"]
    (3, False)
    >>> verdicts({"prompt": "p"}, ["55"]) is None
    True
    """
    length, digit_sum = record.get("target_length"), record.get("target_digit_sum")
    if length is None or digit_sum is None:
        return None
    tolerance = int(record.get("tolerance") or 0)
    out = []
    for completion in completions:
        found = tasks.check(completion, int(length), int(digit_sum), tolerance)
        out.append({**dataclasses.asdict(found), "passed": found.passed})
    return out


def _results(
    records: Sequence[Mapping[str, Any]], completions: Sequence[str], truncated: Sequence[bool], group_size: int
) -> list[dict[str, Any]]:
    """One entry per prompt: its record's fields and its completions, each with whether it was cut off and the
    task's verdict where there is one."""
    results = []
    for i, record in enumerate(records):
        rows = slice(i * group_size, (i + 1) * group_size)
        texts = list(completions[rows])
        checks = verdicts(record, texts)
        entry = {**record, "completions": []}
        for j, (text, cut) in enumerate(zip(texts, truncated[rows])):
            entry["completions"].append({"completion": text, "truncated": cut, **(checks[j] if checks else {})})
        results.append(entry)
    return results


def _pass_counts(results: Sequence[Mapping[str, Any]]) -> dict[str, int] | None:
    """How many checked completions passed each rule, or None when no prompt has targets."""
    checked = [c for r in results for c in r["completions"] if "passed" in c]
    if not checked:
        return None
    return {
        "checked": len(checked),
        "passed": sum(c["passed"] for c in checked),
        "length_ok": sum(c["length_ok"] for c in checked),
        "digits_ok": sum(c["digits_ok"] for c in checked),
    }


# --------------------------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------------------------


def _decoding(config: SampleConfig) -> str:
    if config.greedy:
        return "greedy"
    return f"sampled, temperature {config.temperature:g}, top-p {config.top_p:g}, seed {config.seed}"


def _print_tables(model: str, config: SampleConfig, results: Sequence[Mapping[str, Any]]) -> None:
    """A panel per prompt: the prompt, then a table of its completions (with the verdict on task prompts)."""
    from rich.console import Console, Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    console = Console()
    console.print(Text.assemble(("model ", "bold"), model, "  ", (_decoding(config), "dim")))
    for i, result in enumerate(results, start=1):
        checked = "target_length" in result and "target_digit_sum" in result
        table = Table(expand=True, show_edge=False, pad_edge=False)
        table.add_column("#", justify="right", width=2)
        table.add_column("completion", ratio=1, overflow="fold")
        if checked:
            table.add_column(f"chars ({result['target_length']})", justify="right", no_wrap=True)
            table.add_column(f"digit sum ({result['target_digit_sum']})", justify="right", no_wrap=True)
            table.add_column("pass", justify="center", no_wrap=True)
        for j, item in enumerate(result["completions"], start=1):
            text = Text(item["completion"].strip()) if item["completion"].strip() else Text("(empty)", style="dim")
            if item["truncated"]:
                text.append(" [cut off]", style="dim")
            row: list[Any] = [str(j), text]
            if checked:
                row += [
                    Text(str(item["length"]), style="green" if item["length_ok"] else "red"),
                    Text(str(item["digit_sum"]), style="green" if item["digits_ok"] else "red"),
                    Text("yes", style="bold green") if item["passed"] else Text("no", style="red"),
                ]
            table.add_row(*row)
        prompt = Text(result["prompt"], style="dim")
        console.print(Panel(Group(prompt, Text(""), table), title=f"prompt {i}/{len(results)}", title_align="left"))
    counts = _pass_counts(results)
    if counts:
        n = counts["checked"]
        console.print(
            f"passed {counts['passed']}/{n} ({counts['passed'] / n:.0%}); "
            f"length rule {counts['length_ok']}/{n}, digit rule {counts['digits_ok']}/{n}"
        )


def to_json(model: str, config: SampleConfig, results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``--json`` document: the settings, one entry per prompt with its completions, and the pass counts."""
    return {
        "model": model,
        "greedy": config.greedy,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "seed": config.seed,
        "max_new_tokens": config.max_new_tokens,
        "num_samples": config.group_size,
        "prompts": list(results),
        "pass_counts": _pass_counts(results),
    }


def run_sample(config: SampleConfig) -> int:
    """``policygrad sample``: load the model, pick the prompts, generate, print. Returns the exit code."""

    from policygrad.lm.data import check_prompt_source
    from policygrad.lm.device import resolve_device, use_threads
    from policygrad.lm.models import load_model

    run = runs.checkpoint_run(config.model)
    model_folder = runs.model_folder(config.model)
    task = _task_config(run)
    source = config.prompts or task.prompts
    if not config.prompt:
        check_prompt_source(source)  # a bad prompts file is reported before a model is loaded
    device, autocast_dtype = resolve_device(config)  # reads only .device and .precision
    use_threads(config)
    model, tokenizer = load_model(model_folder, dtype="float32", device=device)
    records = _records(config, source, task, tokenizer)
    completions, truncated = generate(model, tokenizer, [r["prompt"] for r in records], config, autocast_dtype)
    results = _results(records, completions, truncated, config.group_size)
    if config.json:
        json.dump(to_json(model_folder, config, results), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_tables(model_folder, config, results)
    return 0
