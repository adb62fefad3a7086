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
