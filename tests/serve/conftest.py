"""Tiny models and runs built on the spot, so the serving tests never touch the network or a real checkpoint.

The model is the random tiny Llama with a chat template of tests/tiny_models.py; the run is a folder laid out as ``policygrad train`` leaves
one: config.yaml, metrics.jsonl with two held-out evaluations, and final/ saved through the checkpoint code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import make_run
from tiny_models import save_tiny


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A folder with the random tiny Llama and its chat tokenizer."""
    return save_tiny(tmp_path_factory.mktemp("tiny-model"), "llama", chat=True)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model) -> Path:
    """A finished run of the tiny model (config.yaml, metrics.jsonl with evaluations at steps 0 and 2, final/)."""
    return make_run(tmp_path_factory.mktemp("tiny-run"), tiny_model)


@pytest.fixture
def policygrad_cli():
    """``run(command, argv) -> exit status``: ``policygrad COMMAND ARGV...`` through the real command line (one-line
    errors, status 2)."""
    from policygrad import cli

    return lambda command, argv: cli.main([command, *argv])
