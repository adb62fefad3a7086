"""Shipping a trained policy: ``policygrad export`` (a checkpoint as a folder the ecosystem loads as is, optionally
8-bit, with a model card) and ``policygrad serve`` (an OpenAI-compatible HTTP server over an existing engine).

    export.py    ExportConfig, run_export: resolve a run or checkpoint, cast or quantize, save, verify, card
    card.py      the model card (README.md) from plain facts; pure
    api.py       OpenAI request checks and error bodies; pure, no web framework
    server.py    ServeConfig, run_serve: transformers' serving engine behind our limits, or vLLM on a GPU

Nothing here is imported by ``import policygrad``; torch, transformers and the web stack load inside the functions
that need them.
"""

from __future__ import annotations

from collections.abc import Sequence

BNB_CAST_LOGGER = "bitsandbytes.autograd._functions"
"""bitsandbytes logs "MatMul8bitLt: inputs will be cast ... to float16" at every 8-bit product of float32 inputs
(bitsandbytes on a CPU): export and serve quiet it."""

ENTRY_POINTS = {
    "export": ("policygrad.serve.export:ExportConfig", "policygrad.serve.export:run_export"),
    "serve": ("policygrad.serve.server:ServeConfig", "policygrad.serve.server:run_serve"),
}
"""The subcommands of this package as ``policygrad.cli.COMMANDS`` registers them: (config, function)."""


def standalone(command: str, argv: Sequence[str]) -> int:
    """``python -m policygrad.serve.export`` / ``.server``: parse ``argv`` with tyro and run, a UsageError as one
    line and exit status 2. ``policygrad COMMAND`` is the real entry point (one-line parse errors too); this one
    lets the package run before the CLI lists it, and imports nothing of the CLI (dependencies point at it)."""
    import importlib
    import sys

    import tyro

    from policygrad.errors import UsageError

    config_target, run_target = (target.split(":") for target in ENTRY_POINTS[command])
    config_type = getattr(importlib.import_module(config_target[0]), config_target[1])
    run = getattr(importlib.import_module(run_target[0]), run_target[1])
    try:
        return int(run(tyro.cli(config_type, args=list(argv), prog=f"policygrad {command}")) or 0)
    except UsageError as err:
        print(f"policygrad {command}: error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        return 2
