"""Shared by every test: the tiers of the house style as markers (and a check that every test names one), the
``figures`` fixture of the plot tests, and the skip policy of ``make test``. No global state: a test that needs
float64 makes its tensors and models float64 itself. The folder holds helpers the tests import by name
(``fault_table``): pytest puts it on ``sys.path`` with this file."""

import os

import pytest

# The three tiers of tests (../shared/DESIGN.md, docs/testing.md), registered in pyproject.toml; each test carries one:
#   exact     one input against a value worked out by hand or by an independent brute-force reference (enumeration,
#             an explicit matrix, a plain forward pass), including the exact error a given bad input raises
#   property  a relation that holds over many inputs: Hypothesis tests, invariances (a shift of the rewards, the
#             dtype of a mask), limits (lambda 0 and 1), leading dimensions as independent rows, dtypes and devices kept
#   smoke     the real CLI, or a training loop, run end to end with tiny settings
TIERS = ("exact", "property", "smoke")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects anything, so `-m exact` cannot hide an untagged test
def pytest_collection_modifyitems(config, items):
    """With POLICYGRAD_TIERS_REQUIRED=1, a test that carries no tier marker, or more than one, fails collection,
    named with the markers it has."""
    if os.environ.get("POLICYGRAD_TIERS_REQUIRED") != "1":
        return
    wrong = []
    for item in items:
        tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIERS})
        if len(tiers) != 1:
            wrong.append(f"  {item.nodeid}: {', '.join(tiers) if tiers else 'no tier marker'}")
    if wrong:
        raise pytest.UsageError(
            f"POLICYGRAD_TIERS_REQUIRED: every test needs exactly one of the markers {', '.join(TIERS)} "
            f"(tests/conftest.py says which is which); {len(wrong)} do not:\n" + "\n".join(wrong)
        )


@pytest.fixture
def figures(monkeypatch) -> list:
    """Every matplotlib figure saved while the test runs, kept for inspection (the file is still written)."""
    from matplotlib.figure import Figure

    saved, original = [], Figure.savefig

    def spy(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return saved


# `make test` (and so CI) sets POLICYGRAD_NO_SKIPS=1: there every optional dependency is installed, so a test may skip
# only for a reason named here and checked where it skips; any other skip (a dependency that failed to install, say)
# fails the run instead of reading as a pass.
ALLOWED_SKIPS = (
    "package registry not reachable",  # tests/lm/test_models.py, checked by connecting to the index
    "no CUDA device",  # tests/lm/test_cuda.py, checked with torch.cuda.is_available(); benchmarks/gpu_check.sh runs them
    "vllm is not installed",  # tests/lm/test_cuda.py on a GPU: checked with find_spec; the GPU check installs vllm
)


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if os.environ.get("POLICYGRAD_NO_SKIPS") != "1" or reporter is None:
        return
    reasons = [
        str(r.longrepr[2]) if isinstance(r.longrepr, tuple) else str(r.longrepr)
        for r in reporter.stats.get("skipped", [])
    ]
    unexpected = [r for r in reasons if not any(allowed in r for allowed in ALLOWED_SKIPS)]
    if unexpected:
        reporter.ensure_newline()
        reporter.write_line(
            f"POLICYGRAD_NO_SKIPS: {len(unexpected)} tests skipped without an allowed reason, e.g. {unexpected[0]}",
            red=True,
        )
        session.exitstatus = 1
