"""The mutation score per module, and every mutant that no test killed, from the results of ``mutmut run``.

``make mutation`` runs it after mutmut; alone, from the repository root, once ``mutants/`` holds results:

    .venv/bin/python tests/mutation_report.py            # table and survivors
    .venv/bin/python tests/mutation_report.py --diffs    # each survivor's full diff as well

The score is mutmut's own (its ``badge`` command): (killed + timeout) / (all - skipped), over the mutants that were run
(``unrun``: left out by a ``MUTANTS=`` filter). A mutant with no test that reaches its function counts against the
score; ``other`` is suspicious, segfault or interrupted. Not a test file (pytest does not collect it).
"""

from __future__ import annotations

import ast
import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code

ROOT = Path(__file__).resolve().parents[1]


def _function_lines(source: Path) -> dict[str, int]:
    """mutmut's mangled function name (``x_name``, ``xǁClassǁname``) -> the line of its ``def`` in ``source``."""
    lines: dict[str, int] = {}
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines[f"x_{node.name}"] = node.lineno
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines[f"xǁ{node.name}ǁ{item.name}"] = item.lineno
    return lines


def _changed_line(diff: str, def_line: int) -> tuple[int, str, str]:
    """(line in the source file, old line, new line) of a one-hunk function diff."""
    old: list[str] = []
    new: list[str] = []
    first = None
    offset = 0
    for line in diff.splitlines()[2:]:
        if line.startswith("@@"):
            offset = int(line.split()[1].split(",")[0][1:])  # "-12,7" -> 12, 1-based inside the function
            position = offset
            continue
        if line.startswith("-"):
            first = position if first is None else first
            old.append(line[1:].strip())
            position += 1
        elif line.startswith("+"):
            first = position if first is None else first
            new.append(line[1:].strip())
        else:
            position += 1
    return def_line + (first or 1) - 1, " / ".join(old), " / ".join(new)


def _source_line(source_lines: list[str], def_line: int, old: str, guess: int) -> int:
    """The line of ``source_lines`` (1-based) at or after ``def_line`` that reads ``old`` (the first line the mutant
    removed): mutmut renders a function in its own layout (a signature on one line, say), so the offset inside its
    diff can be a few lines off the source's. ``guess`` when no line matches."""
    first = old.split(" / ")[0]
    for number in range(def_line, len(source_lines) + 1):
        if source_lines[number - 1].strip() == first:
            return number
    return guess


def main(argv: list[str]) -> int:
    metas = sorted((ROOT / "mutants" / "src").rglob("*.py.meta"))
    if not metas:
        print("no results in mutants/: run `make mutation` (or `mutmut run`) first")
        return 1
    rows, survivors = [], []
    for meta in metas:
        source = Path(str(meta.relative_to(ROOT / "mutants"))[: -len(".meta")])
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        counts = Counter(status_by_exit_code[code] for code in codes.values())
        tested = len(codes) - counts["skipped"] - counts["not checked"]
        caught = counts["killed"] + counts["timeout"]
        rows.append((str(source), len(codes), caught, counts, 100.0 * caught / tested if tested else float("nan")))
        def_lines = _function_lines(ROOT / source)
        source_lines = (ROOT / source).read_text().splitlines()
        for name, code in codes.items():
            if status_by_exit_code[code] in ("killed", "timeout", "skipped", "not checked"):
                continue
            diff = get_diff_for_mutant(name, path=source)
            function = name.rpartition(".")[2].partition("__mutmut_")[0]
            guess, old, new = _changed_line(diff, def_lines[function])
            line = _source_line(source_lines, def_lines[function], old, guess)
            survivors.append((str(source), name, status_by_exit_code[code], line, old, new, diff))

    header = (
        f"{'module':36} {'mutants':>7} {'killed':>6} {'survived':>8} {'no tests':>8} {'other':>5} {'unrun':>5}  score"
    )
    print("\n" + header)
    for path, total, caught, counts, score in rows:
        unrun = counts["not checked"]
        other = total - caught - counts["survived"] - counts["no tests"] - unrun
        shown = f"{score:5.1f}%" if unrun < total else "    -"
        print(
            f"{path:36} {total:7} {caught:6} {counts['survived']:8} {counts['no tests']:8} {other:5} {unrun:5}  {shown}"
        )
    if survivors:
        print("\nnot killed (module:line  mutant  status: old -> new):")
    for path, name, status, line, old, new, diff in sorted(survivors, key=lambda s: (s[0], s[3], s[1])):
        print(f"  {path}:{line}  {name.rpartition('.')[2]}  {status}: {old}  ->  {new}")
        if "--diffs" in argv:
            print("    " + diff.replace("\n", "\n    "))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
