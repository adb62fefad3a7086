"""The ``policygrad`` command: one subcommand per entry point, each parsed from its config dataclass by tyro.

Every mistake a user can make on the command line ends as ONE line on stderr naming the argument, exit status 2,
and no traceback: tyro's parse errors (boxed, several lines) are folded into one line, and a config's validation
raises :class:`policygrad.errors.UsageError`.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import sys
from collections.abc import Sequence

from policygrad.errors import UsageError

# subcommand -> (config dataclass, function running it); both "module:attribute", imported on use so that
# `policygrad --help` never imports torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "bandit": ("policygrad.bandit.config:BanditConfig", "policygrad.bandit.run:main"),
}

_BOX = re.compile(r"^[\s│╭╮╰╯─]*(.*?)[\s│╭╮╰╯─]*$")


def _load(target: str):
    module, attribute = target.split(":")
    return getattr(importlib.import_module(module), attribute)


def one_line(tyro_error: str) -> str:
    """The message of tyro's boxed error as one line: the box's first paragraph, after its title."""
    lines = [_BOX.match(line).group(1) for line in tyro_error.splitlines()]
    title_and_body: list[str] = []
    for line in lines:
        if not line and title_and_body and len(title_and_body) > 1:
            break
        if line.startswith("For full helptext") or line.startswith("Argument helptext"):
            break
        if line:
            title_and_body.append(line)
    if not title_and_body:
        return "invalid arguments (see --help)"
    title, body = title_and_body[0], " ".join(title_and_body[1:])
    # a config's own validation (UsageError in __post_init__) arrives wrapped as "Error parsing BanditConfig: --x: ..."
    return re.sub(r"^Error parsing \w+Config: (?=--)", "", body or title)


def _parse(argv: Sequence[str]):
    import tyro

    configs = {name: _load(config) for name, (config, _) in COMMANDS.items()}
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.extras.subcommand_cli_from_dict(configs, prog="policygrad", args=list(argv))
    except SystemExit as exit_:
        if exit_.code in (0, None):  # --help
            sys.stderr.write(captured.getvalue())
            raise
        raise UsageError("arguments", one_line(captured.getvalue())) from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = next((a for a in argv if a in COMMANDS), None)
    prefix = f"policygrad {command}" if command else "policygrad"
    try:
        config = _parse(argv)
        run = _load(COMMANDS[command][1])
        return int(run(config) or 0)
    except UsageError as err:
        if debug:
            raise
        message = str(err)
        if message.startswith("arguments: "):
            message = message[len("arguments: ") :]
        print(f"{prefix}: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `policygrad bandit --json | head`: the reader left, which is not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
