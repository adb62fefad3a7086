"""docs/reliability.md's fault table, read cell by cell, for the test files that inject its faults.

Every row of the table names, in its last cell, the one test file that injects that fault. That file declares the
rows it proves as :class:`Row` values built from the very constants its tests use (how many kills, which faults,
which steps), and :func:`check` holds the declaration against the table: the trainer, the count, every number the
fault and its outcome state (``3 of 3``, ``exit 143``, ``80 for PPO``), and what is lost. A count changed on either
side alone fails; so does a row that no test file declares. :func:`check_catches_every_change` proves the check
itself: it changes each number of a file's rows, one at a time, in a copy of the page, and expects the check to fail.
:func:`kill_inside_a_save` makes the table's "N of N landed mid-save" true by construction rather than by timing.

Not a test module (no ``test_`` prefix); the test files ``import fault_table``: pytest puts tests/ on sys.path
with tests/conftest.py.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
HEADER = ["Fault injected", "Trainer", "Times", "What happened", "Lost", "Tested in"]
TEST_FILES = (
    "lm/test_reliability_lm.py",
    "control/test_reliability_control.py",
    "test_bad_input.py",
    "lm/test_first_hour.py",
)
"""The files (under tests/) a row may name; each declares its rows and calls :func:`check`."""

NUMBER = re.compile(r"(?<![A-Za-z])\d+(?:\.\d+|e\d+)*")
"""A number as the table writes one: 3, 0.01, 1e308, 000002 (in step-000002); not the 2 of A2C or r0+r1."""


@dataclasses.dataclass(frozen=True)
class Row:
    """What one row of the fault table must say, built from a test file's constants."""

    fault: str
    """the start of the row's "Fault injected" cell, enough to pick out that one row"""
    trainer: str
    """the "Trainer" cell: train, control or shared"""
    times: str
    """the "Times" cell: how many faults the tests inject, e.g. "25", "6 (one each)", "4 x 2", "1 + 1" """
    numbers: Sequence[object]
    """every number of the "Fault injected" and then the "What happened" cells, in order (compared as text)"""
    lost: str
    """the "Lost" cell, word for word"""


def numbers(text: str) -> list[str]:
    """The numbers in ``text``, in order.

    >>> numbers("3 of 3 landed mid-save in step-000002; exit 143; 1e308 + 1e308; A2C, r0+r1, 2N")
    ['3', '3', '000002', '143', '1e308', '1e308', '2']
    """
    return NUMBER.findall(text)


def table(text: str | None = None) -> list[list[str]]:
    """The rows of the table under "## The fault table" (header and rule left out), each a list of its six cells."""
    text = DOC.read_text() if text is None else text
    section = text.split("## The fault table", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    assert cells[0] == HEADER, f"the fault table's header is {cells[0]}, expected {HEADER}"
    assert set("".join(cells[1])) <= set("-"), "the second line of the fault table is not its rule"
    return cells[2:]


def check(test_file: str, rows: Sequence[Row], text: str | None = None) -> None:
    """Every row of the table names a known test file; the rows naming ``test_file`` are exactly ``rows``, cell by
    cell. Raises AssertionError naming the row and the cell that differ."""
    assert test_file in TEST_FILES, test_file
    parsed = table(text)
    for cells in parsed:
        assert len(cells) == len(HEADER), f"fault table row with {len(cells)} cells, not {len(HEADER)}: {cells}"
        assert cells[5].strip("`") in TEST_FILES, f"fault table row {cells[0]!r} names no known test file: {cells[5]}"
    claimed = []
    for row in rows:
        matches = [cells for cells in parsed if cells[0].startswith(row.fault)]
        assert len(matches) == 1, f"{len(matches)} rows of the fault table start with {row.fault!r}, expected 1"
        cells = matches[0]
        claimed.append(cells[0])
        said = {
            "Tested in": cells[5].strip("`"),
            "Trainer": cells[1],
            "Times": cells[2],
            "numbers": numbers(cells[0] + " " + cells[3]),
            "Lost": cells[4],
        }
        meant = {
            "Tested in": test_file,
            "Trainer": row.trainer,
            "Times": row.times,
            "numbers": [str(n) for n in row.numbers],
            "Lost": row.lost,
        }
        for cell, value in said.items():
            assert value == meant[cell], f"fault table row {row.fault!r}: {cell} says {value!r}, tests {meant[cell]!r}"
    undeclared = [cells[0] for cells in parsed if cells[5].strip("`") == test_file and cells[0] not in claimed]
    assert not undeclared, f"fault table rows name {test_file} but it declares no such row: {undeclared}"


def mutants(test_file: str, text: str | None = None) -> Iterator[tuple[str, str]]:
    """(description, page) for each number in the rows that name ``test_file``: the page with that one number
    changed (3 -> 4, 0.01 -> 1.01, 000002 -> 100002)."""
    text = DOC.read_text() if text is None else text
    lines = text.split("\n")
    for index, line in enumerate(lines):
        if not (line.startswith("|") and line.rstrip().endswith(f"| `{test_file}` |")):
            continue
        for match in NUMBER.finditer(line):
            changed = str(int(match.group()[0]) + 1) + match.group()[1:]
            copy = [*lines[:index], line[: match.start()] + changed + line[match.end() :], *lines[index + 1 :]]
            yield f"{match.group()} -> {changed} at column {match.start()} of {line[:60]!r}", "\n".join(copy)


def check_catches_every_change(test_file: str, rows: Sequence[Row]) -> int:
    """:func:`check` passes on the page and fails on every copy of :func:`mutants`; returns how many were tried."""
    check(test_file, rows)
    tried = 0
    for description, page in mutants(test_file):
        tried += 1
        try:
            check(test_file, rows, page)
        except AssertionError:
            continue
        raise AssertionError(f"the fault table check missed a changed number: {description}")
    assert tried > 0, f"no row of the fault table names {test_file}"
    return tried


def kill_inside_a_save(child: subprocess.Popen, saving: Callable[[], bool]) -> bool:
    """Stop ``child`` (SIGSTOP, waited for), then SIGKILL it if ``saving()`` says one of its saves is under way, else
    let it go on (SIGCONT). True when killed: the child was frozen while ``saving()`` looked, so the kill landed
    inside that save, which is what the fault table's "N of N landed mid-save" counts."""
    os.kill(child.pid, signal.SIGSTOP)
    _, status = os.waitpid(child.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):  # it had just ended, and waitpid has reaped it: tell Popen
        child.returncode = os.waitstatus_to_exitcode(status)
        return False
    if saving():
        child.kill()
        child.wait()
        return True
    os.kill(child.pid, signal.SIGCONT)
    return False
