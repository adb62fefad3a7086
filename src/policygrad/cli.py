"""The ``policygrad`` command: one subcommand per entry point, each parsed from its config dataclass by tyro.

Every mistake a user can make on the command line ends as ONE line on stderr naming the argument, exit status 2,
and no traceback: tyro's parse errors (boxed, several lines) are folded into one line, and a config's validation
raises :class:`policygrad.errors.UsageError`.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import io
import re
import sys
from collections.abc import Sequence
from typing import NamedTuple

from policygrad.errors import UsageError
from policygrad.runs import RunComplete
from policygrad.threads import quiet_waits


class Command(NamedTuple):
    """A subcommand: its config dataclass and the function running it, and for a command that takes ``--recipe
    FILE.yaml`` (whose values become the defaults that the other flags override) the recipe loader; ``implied`` reads
    a recipe from the arguments themselves (``eval --model RUN/final``: the run's own config.yaml). All
    "module:attribute", imported on use, so that ``policygrad --help`` never imports torch."""

    config: str
    run: str
    recipe: str | None = None
    implied: str | None = None


COMMANDS: dict[str, Command] = {
    "bandit": Command("policygrad.bandit.config:BanditConfig", "policygrad.bandit.run:main"),
    "control": Command(
        "policygrad.control.config:ControlConfig",
        "policygrad.control.train:run",
        "policygrad.control.config:load_config",
    ),
    "train": Command(
        "policygrad.lm.config:GRPOConfig", "policygrad.lm.trainer:run_train", "policygrad.lm.config:load_config"
    ),
    "eval": Command(
        "policygrad.lm.config:EvalConfig",
        "policygrad.lm.evaluate:run_eval",
        "policygrad.lm.config:load_eval_config",
        "policygrad.lm.evaluate:run_recipe",
    ),
    "sample": Command("policygrad.lm.sample:SampleConfig", "policygrad.lm.sample:run_sample"),
    "plot": Command("policygrad.lm.plot:PlotConfig", "policygrad.lm.plot:run_plot"),
    "playground": Command(
        "policygrad.playground.config:PlaygroundConfig", "policygrad.playground.server:run_playground"
    ),
    "export": Command("policygrad.serve.export:ExportConfig", "policygrad.serve.export:run_export"),
    "serve": Command("policygrad.serve.server:ServeConfig", "policygrad.serve.server:run_serve"),
    "sweep": Command("policygrad.sweep:SweepConfig", "policygrad.sweep:run_sweep"),
    "compare": Command("policygrad.compare:CompareConfig", "policygrad.compare:run_compare"),
}

RECIPE_HELP = (
    "--recipe FILE.yaml: start from a recipe (e.g. recipes/default-cpu.yaml, or a run's own config.yaml to resume "
    "it); the flags below override its values."
)

_BOX = re.compile(r"^[\s│╭╮╰╯─|]*(.*?)[\s│╭╮╰╯─|]*$")
_RULE = re.compile(r"^[\s│╭╮╰╯─|+=-]*$")  # a box's border or divider; rich draws them in ASCII (-, +, |) where the
# terminal's encoding is not UTF-8 or the output is not a terminal


def _load(target: str):
    module, attribute = target.split(":")
    return getattr(importlib.import_module(module), attribute)


def one_line(tyro_error: str) -> str:
    """The message of tyro's boxed error as one line: the box's first paragraph, after its title."""
    lines = ["" if _RULE.match(line) else _BOX.match(line).group(1) for line in tyro_error.splitlines()]
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
    if body.startswith(title):  # "Unrecognized options" then "Unrecognized options: --x": say it once
        title = ""
    # a config's own validation (UsageError in __post_init__) arrives wrapped as "Error parsing BanditConfig: --x: ..."
    return re.sub(r"^Error parsing \w+Config: (?=--)", "", body or title)


def _recipe(command: str, args: list[str]) -> tuple[list[str], object]:
    """Take ``--recipe FILE`` out of ``args``; return the rest and the recipe's config (None without one)."""
    if "--recipe" not in args:
        implied = COMMANDS[command].implied
        return args, _load(implied)(args) if implied else None
    loader = COMMANDS[command].recipe
    if loader is None:
        raise UsageError("--recipe", f"`policygrad {command}` takes no recipe")
    at = args.index("--recipe")
    if at + 1 >= len(args):
        raise UsageError("--recipe", "give the path of a recipe file, e.g. --recipe recipes/default-cpu.yaml")
    return args[:at] + args[at + 2 :], _load(loader)(args[at + 1])


def _refuse_old_resume(command: str, args: list[str]) -> None:
    """``--resume DIR`` (policygrad control before issue 13) is a flag now: say how to resume instead of tyro's
    "unrecognized option"."""
    if "--resume" in args:
        at = args.index("--resume")
        if at + 1 < len(args) and not args[at + 1].startswith("-"):
            folder = args[at + 1].rstrip("/")
            raise UsageError(
                "--resume",
                f"is a flag and takes no folder; continue the run in {folder} with: policygrad {command} --recipe "
                f"{folder}/config.yaml --resume",
            )


def _refuse_unknown_command(argv: list[str]) -> None:
    """``policygrad trian``: name the unknown command and the known ones (tyro would say "Unrecognized options")."""
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UsageError(repr(argv[0][:40]), f"unknown command{hint} (commands: {', '.join(COMMANDS)})")


def _parse(argv: Sequence[str]):
    import tyro

    argv = list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    _refuse_unknown_command(argv)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            if command is None:  # `policygrad --help`, or no/unknown command: tyro lists the commands
                configs = {name: _load(entry.config) for name, entry in COMMANDS.items()}
                return tyro.extras.subcommand_cli_from_dict(configs, prog="policygrad", args=argv)
            _refuse_old_resume(command, argv[1:])
            args, default = _recipe(command, argv[1:])
            entry = COMMANDS[command]
            config = _load(entry.config)
            description = inspect.cleandoc(config.__doc__ or "") + ("\n\n" + RECIPE_HELP if entry.recipe else "")
            parsed = tyro.cli(config, args=args, default=default, prog=f"policygrad {command}", description=description)
        sys.stderr.write(captured.getvalue())  # what the recipe loader said (eval: which run's task it took)
        return parsed
    except SystemExit as exit_:
        if exit_.code in (0, None):  # --help
            sys.stderr.write(captured.getvalue())
            raise
        raise UsageError("arguments", one_line(captured.getvalue())) from None


def main(argv: Sequence[str] | None = None) -> int:
    quiet_waits()  # before anything imports torch (policygrad.threads)
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = argv[0] if argv and argv[0] in COMMANDS else None
    prefix = f"policygrad {command}" if command else "policygrad"
    try:
        config = _parse(argv)
        run = _load(COMMANDS[command].run)
        return int(run(config) or 0)
    except UsageError as err:
        if debug:
            raise
        message = str(err)
        if message.startswith("arguments: "):
            message = message[len("arguments: ") :]
        message = " ".join(message.splitlines())  # a value or path the user typed may hold a line break
        print(f"{prefix}: error: {message}", file=sys.stderr)
        return 2
    except RunComplete as complete:  # --resume of a finished run: say so, change nothing
        print(f"{prefix}: {complete}", file=sys.stderr)
        return 0
    except BrokenPipeError:  # `policygrad bandit --json | head`: the reader left, which is not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
