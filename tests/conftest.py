"""Shared by every test: float64 as the default dtype, and the ``figures`` fixture of the plot tests. The folder
holds helpers the tests import by name (``fault_table``): pytest puts it on ``sys.path`` with this file."""

import pytest
import torch

torch.set_default_dtype(torch.float64)  # exact-value tests compare to 1e-10 and better


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
ALLOWED_SKIPS = ("package registry not reachable",)  # tests/lm/test_models.py, checked by connecting to the index


def pytest_sessionfinish(session, exitstatus):
    import os

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
