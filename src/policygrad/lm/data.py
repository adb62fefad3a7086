"""Prompt sources: the embedded offline corpus, JSONL files and (when the hub answers) Hugging Face datasets.

A prompt source yields RECORDS, plain dicts with a ``"prompt"`` string and any other fields, which travel with the
prompt to the reward functions (see :mod:`policygrad.lm.rewards`). For the ``length_digits`` task the records are

    {"prompt": passage + instruction, "target_length": L, "target_digit_sum": S, "tolerance": tol}

The embedded corpus is the English reference text that ships with every CPython (``pydoc_data.topics``, the help
pages of ``help("if")`` and friends): about 450 paragraphs of plain technical prose, available offline, with a
licence that allows it (the PSF licence). It is split deterministically into training prompts and a held-out set
used by :mod:`policygrad.lm.evaluate`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from policygrad.errors import UsageError
from policygrad.lm import tasks

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "Prompts",
    "MIN_PASSAGE_CHARS",
    "SPLIT_SEED",
    "corpus_passages",
    "length_digits_records",
    "load_prompts",
    "read_jsonl",
    "split_records",
    "truncate_to_tokens",
]

MIN_PASSAGE_CHARS = 200
"""Shorter paragraphs (headings, one-line notes) are dropped: a passage should give the model something to read."""

SPLIT_SEED = 20240917
"""Fixed, so the held-out prompts are the same whatever seed a run trains with."""


@dataclass(frozen=True)
class Prompts:
    """Training records and held-out records."""

    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]


def corpus_passages() -> list[str]:
    """The embedded corpus: prose paragraphs of ``pydoc_data.topics``, in a fixed order.

    A paragraph is a block between blank lines. Indented blocks (code examples, grammar rules), heading underlines
    and paragraphs under :data:`MIN_PASSAGE_CHARS` are left out; line breaks inside a paragraph become spaces.
    """
    from pydoc_data.topics import topics

    passages = []
    for topic in sorted(topics):  # sorted: dict order is an implementation detail of the generated file
        for block in topics[topic].split("\n\n"):
            lines = block.split("\n")
            if not lines[0] or lines[0][0].isspace():
                continue
            if any(line.strip() and set(line.strip()) <= set("*=-^~") for line in lines):
                continue  # a heading with its underline
            text = " ".join(line.strip() for line in lines if line.strip())
            if len(text) >= MIN_PASSAGE_CHARS:
                passages.append(text)
    return passages


def truncate_to_tokens(text: str, tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> str:
    """``text`` cut to at most ``max_tokens`` tokens of ``tokenizer``, at a word boundary where there is one.

    Decoding the first ``max_tokens`` tokens can end mid-word; we drop that partial word, and re-encode to make sure
    the decoded text did not grow (byte-level BPE round trips are exact, but not every tokenizer's are).
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= max_tokens:
        return text
    cut = tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)
    head, space, _ = cut.rstrip().rpartition(" ")
    cut = head if space and head else cut
    while cut and len(tokenizer.encode(cut, add_special_tokens=False)) > max_tokens:
        cut = cut[: int(len(cut) * 0.9)]
    return cut.rstrip()


def length_digits_records(
    passages: Sequence[str],
    target_length: int = tasks.DEFAULT_TARGET_LENGTH,
    digit_sum_range: tuple[int, int] = tasks.DIGIT_SUM_RANGE,
    tolerance: int = 0,
) -> list[dict[str, Any]]:
    """One ``length_digits`` record per passage; the digit-sum target is drawn from the passage text.

    >>> length_digits_records(["Cats sleep a lot."], target_length=8)[0]["target_length"]
    8
    """
    records = []
    for passage in passages:
        digit_sum = tasks.draw_digit_sum(passage, *digit_sum_range)
        records.append(
            {
                "prompt": tasks.make_prompt(passage, target_length, digit_sum),
                "target_length": target_length,
                "target_digit_sum": digit_sum,
                "tolerance": tolerance,
            }
        )
    return records


def split_records(records: Sequence[dict[str, Any]], heldout: int, seed: int = SPLIT_SEED) -> Prompts:
    """Shuffle with a fixed seed and hold out the last ``heldout`` records (fewer if there are not twice as many).

    >>> split = split_records([{"prompt": str(i)} for i in range(10)], heldout=3)
    >>> len(split.train), len(split.heldout)
    (7, 3)
    """
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    count = min(heldout, len(shuffled) // 2)
    if count == 0:
        return Prompts(shuffled, [])
    return Prompts(shuffled[:-count], shuffled[-count:])


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records from a JSONL file: one JSON object per line with a string ``"prompt"``; blank lines are skipped.

    Any other keys become fields passed to the reward functions. A bad line is a one-line :class:`UsageError`
    naming the file and line number.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError("--prompts", f"no such file {path}") from None
    except OSError as exc:  # a folder, no permission
        raise UsageError("--prompts", f"cannot read {path}: {exc.strerror or exc}") from None
    records = []
    # split on "\n" alone: str.splitlines() also breaks at U+2028 and friends, which JSON strings may hold as is
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a byte-order mark opens some files
        except UnicodeDecodeError as exc:
            raise UsageError(where, f"not UTF-8 text (byte {exc.start + 1} of the line)") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(where, f"not valid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})") from None
        except ValueError as exc:  # JSON, but Python cannot hold it: an integer of more than 4300 digits
            raise UsageError(where, f"not usable JSON ({' '.join(str(exc).split())[:80]})") from None
        except RecursionError:
            raise UsageError(where, "JSON nested too deeply") from None
        if not isinstance(record, dict):
            raise UsageError(where, f"expected a JSON object, got {type(record).__name__}")
        if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise UsageError(where, 'every line needs a non-empty string "prompt"')
        _check_task_fields(record, where)
        records.append((where, record))
    if not records:
        raise UsageError("--prompts", f"{path} holds no prompts")
    for name in TASK_FIELDS:  # on some lines and not others, the built-in rewards would fail mid-run
        having = [where for where, record in records if name in record]
        if having and len(having) < len(records):
            missing = next(where for where, record in records if name not in record)
            raise UsageError(missing, f'no "{name}", which {having[0]} has: give it on every line or on none')
    return [record for _, record in records]


TASK_FIELDS = {"target_length": 1, "target_digit_sum": 0, "tolerance": 0}
"""The ``length_digits`` fields of a prompt record, each with its smallest allowed value."""


def _check_task_fields(record: dict[str, Any], where: str) -> None:
    """The ``length_digits`` fields, where a record has them, are whole numbers in range (the rewards need them so)."""
    for name, low in TASK_FIELDS.items():
        if name not in record:
            continue
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(where, f'"{name}" must be a whole number >= {low}, got {json.dumps(value)[:40]}')


def load_hf_dataset(name: str, split: str = "train", prompt_field: str = "prompt") -> list[dict[str, Any]]:
    """Records from a Hugging Face dataset (``datasets`` is imported only here, and need not be installed).

    Every column travels as a field; ``prompt_field`` is renamed to ``"prompt"``.
    """
    try:
        import datasets
    except ImportError:
        raise UsageError("--prompts", f"hf:{name} needs the datasets package (pip install datasets)") from None
    try:
        table = datasets.load_dataset(name, split=split)
    except Exception as exc:  # hub unreachable, unknown name, bad split: all reported as one line
        first = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UsageError("--prompts", f"cannot load dataset {name!r} split {split!r}: {first}") from None
    if prompt_field not in table.column_names:
        raise UsageError("--prompts", f"dataset {name!r} has no column {prompt_field!r} (has {table.column_names})")
    records = []
    for row in table:
        record = dict(row)
        record["prompt"] = str(record.pop(prompt_field))
        records.append(record)
    return records


def check_prompt_source(source: str) -> None:
    """Cheap checks of a prompt source before anything heavy loads: a JSONL file is read and validated line by line
    (:func:`read_jsonl` names the line at fault); an unknown kind of source is refused."""
    if source.endswith(".jsonl"):
        read_jsonl(source)
    elif source.startswith("hf:"):
        if not source[3:].partition(":")[0].strip():
            raise UsageError("--prompts", f"give a dataset name after hf:, e.g. hf:org/name[:split], got {source!r}")
    elif source != "pydoc":
        raise UsageError("--prompts", f"expected 'pydoc', a .jsonl file or hf:<dataset>, got {source!r}")


def load_prompts(
    source: str,
    tokenizer: PreTrainedTokenizerBase | None,
    heldout: int = 100,
    max_passage_tokens: int = 128,
    target_length: int = tasks.DEFAULT_TARGET_LENGTH,
    digit_sum_range: tuple[int, int] = tasks.DIGIT_SUM_RANGE,
    tolerance: int = 0,
) -> Prompts:
    """Training and held-out records from a source name.

        "pydoc"                   the embedded corpus as ``length_digits`` prompts, passages cut to
                                  ``max_passage_tokens`` tokens of ``tokenizer`` (no cut without a tokenizer)
        "path/to/file.jsonl"      records as written (see :func:`read_jsonl`)
        "hf:name" / "hf:name:split"  a Hugging Face dataset with a "prompt" column

    The held-out set is the same for every run on the same source: a fixed-seed shuffle, then the last ``heldout``.
    """
    if source == "pydoc":
        passages = corpus_passages()
        if tokenizer is not None:
            passages = [truncate_to_tokens(p, tokenizer, max_passage_tokens) for p in passages]
            # paragraphs that open alike become the same passage once cut; keep one, or the held-out prompts leak
            passages = list(dict.fromkeys(passages))
        records = length_digits_records(passages, target_length, digit_sum_range, tolerance)
    elif source.startswith("hf:"):
        name, _, split = source[3:].partition(":")
        records = load_hf_dataset(name, split or "train")
    elif source.endswith(".jsonl"):
        records = read_jsonl(source)
    else:
        raise UsageError("--prompts", f"expected 'pydoc', a .jsonl file or hf:<dataset>, got {source!r}")
    return split_records(records, heldout)


def prompts_for(config: Any, tokenizer: PreTrainedTokenizerBase | None, source: str | None = None) -> Prompts:
    """The prompts of a training or evaluation config: ``source`` (default ``config.prompts``) with the config's
    held-out split and length_digits settings, so training, evaluation and sampling see the same records."""
    return load_prompts(
        config.prompts if source is None else source,
        tokenizer,
        config.heldout_prompts,
        config.max_passage_tokens,
        config.target_length,
        (config.digit_sum_min, config.digit_sum_max),
        config.length_tolerance,
    )
