"""The shape of the code, checked (issue 13): dependencies point one way, the trainer is the loop and nothing else.

Static: every ``import`` and ``from ... import`` of every module under src/policygrad, at module level or inside a
function, is an edge of the import graph (a lazy import inside a function still couples the modules)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.property

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "policygrad"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The policygrad modules that ``path`` imports (``from policygrad.x import y`` counts y if it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in modules:
                found.add(node.module)
            found.update(
                f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in modules
            )
    name = _module_name(path)
    return {target for target in found if target != name and not name.startswith(target + ".")}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    for name in modules:  # importing a.b runs a/__init__.py first
        parent = name.rsplit(".", 1)[0]
        if parent != name and parent in modules and parent != "policygrad":
            graph[name].add(parent)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_of_src_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and graph["policygrad.lm.trainer"]  # the scan sees the package
    assert find_cycle(graph) is None


def test_nothing_imports_from_a_trainer():
    """The CLI names the entry points as strings; no module imports the loop (it would become a hub again)."""
    trainers = {"policygrad.lm.trainer", "policygrad.control.train"}
    for module, targets in import_graph().items():
        assert not (targets & trainers), f"{module} imports {targets & trainers}"


def _functions(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    return [
        (node.end_lineno - node.lineno + 1, node.name)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]


def test_the_trainer_is_the_loop():
    path = PACKAGE / "lm" / "trainer.py"
    assert len(path.read_text().splitlines()) <= 250
    lengths = {name: length for length, name in _functions(path)}
    assert lengths["train"] <= 60


def test_only_lm_imports_transformers_and_only_control_imports_gymnasium():
    """transformers: the language-model trainer (lm/) and what serves its checkpoints (serve/: export and the
    server are transformers' own loading, quantisation and serving)."""
    for name, path in _modules().items():
        text = path.read_text()
        if not name.startswith(("policygrad.lm", "policygrad.serve")):
            assert "import transformers" not in text and "from transformers" not in text, name
        if not name.startswith("policygrad.control"):
            assert "import gymnasium" not in text and "from gymnasium" not in text, name


def longest_functions(count: int = 5) -> list[tuple[int, str]]:
    """The longest functions of src/ as (lines, module:function), longest first (docs/architecture.md)."""
    rows = [
        (length, f"{name}:{function}") for name, path in _modules().items() for length, function in _functions(path)
    ]
    return sorted(rows, reverse=True)[:count]


if __name__ == "__main__":  # python tests/test_architecture.py: the numbers docs/architecture.md quotes
    for length, where in longest_functions(10):
        print(f"{length:4d}  {where}")
    print("cycle:", find_cycle(import_graph()))
