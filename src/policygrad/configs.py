"""Configuration files shared by every command: dataclass configs read from YAML recipes with overrides, written
back as plain values, and the field checks every config's ``__post_init__`` uses.

A recipe is a YAML file of field values (``recipes/*.yaml``, or a run folder's own ``config.yaml``). :func:`load_config`
reads one for any config dataclass, applies ``field=value`` overrides and lets the dataclass validate the result; every
mistake is a one-line :class:`~policygrad.errors.UsageError` naming the field or the file and line. Imports nothing
heavy (no torch), so ``--help`` and argument errors stay instant.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from policygrad.errors import UsageError, require

__all__ = ["choice", "config_to_dict", "default_hint", "flag", "load_config", "positive", "short"]

C = TypeVar("C")


def flag(name: str) -> str:
    """A field's command-line flag: ``max_steps`` -> ``--max-steps``."""
    return "--" + name.replace("_", "-")


def default_hint(text: str) -> Any:
    """A field's ``--help`` default, said in words (``"per algorithm"``) where the value itself (None) means
    nothing to a reader: ``field: Annotated[int | None, default_hint("per algorithm")] = None``."""
    import tyro

    return tyro.conf.arg(help_behavior_hint=f"(default: {text})")


def choice(field: str, value: Any, allowed: Sequence[str]) -> None:
    """Refuse ``value`` unless it is one of ``allowed``, naming them."""
    if value not in allowed:
        raise UsageError(field, f"must be one of {', '.join(allowed)}, got {short(value)}")


def positive(field: str, value: float, allow_zero: bool = False) -> None:
    """Refuse a non-finite ``value``, or one below (or at, unless ``allow_zero``) zero."""
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    require(ok, field, f"must be a finite number {'>=' if allow_zero else '>'} 0, got {value}")


def short(value: Any, width: int = 60) -> str:
    """``repr(value)`` cut to ``width`` characters: an error message quotes a value, it does not dump it."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def load_config(cls: type[C], path: str | Path | None = None, overrides: Mapping[str, Any] | Sequence[str] = ()) -> C:
    """A ``cls`` (a config dataclass) from a YAML recipe, then ``overrides`` on top, then validated.

    ``overrides`` is a mapping of field -> value or a list of ``"field=value"`` strings (the value parsed as YAML,
    so ``lr=3e-6`` or ``rewards=[binary, shaped=0.5]``). Dashes and underscores in names are interchangeable. An
    unknown field, in the file or the overrides, is a one-line :class:`UsageError` naming it.
    """
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_recipe(cls, Path(path)))
    if isinstance(overrides, Mapping):
        pairs = list(overrides.items())
    else:
        pairs = [_parse_override(item) for item in overrides]
    for name, value in pairs:
        values[_field_name(cls, name, "override")] = value
    hints = typing.get_type_hints(cls)
    coerced = {name: _coerce(name, value, hints[name]) for name, value in values.items()}
    return cls(**coerced)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain YAML/JSON-safe values (paths as strings, tuples as lists), in field order."""
    out = {}
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[item.name] = value
    return out


def _read_recipe(cls: type, path: Path) -> dict[str, Any]:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError("--recipe", f"no such file {path}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(str(path), f"not a text file (byte {exc.start} is not UTF-8)") from None
    except OSError as exc:  # a folder, no permission
        raise UsageError("--recipe", f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.reader.ReaderError as exc:  # a control character: no problem_mark, but a position in the text
        line = text.count("\n", 0, exc.position) + 1
        code = ord(str(exc.character)[:1] or " ")
        raise UsageError(f"{path}:{line}", f"{exc.reason} (character #x{code:04x})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UsageError(where, problem) from None
    except RecursionError:
        raise UsageError(str(path), "nested too deeply to be a recipe") from None
    except (ValueError, OverflowError) as exc:  # a scalar YAML parsed but could not build: 2020-13-45, a 5000-digit int
        raise UsageError(str(path), f"invalid value: {' '.join(str(exc).split())[:120]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(str(path), f"a recipe is a mapping of field: value, got {type(data).__name__}")
    return {_field_name(cls, str(key), str(path)): value for key, value in data.items()}


def _parse_override(item: str) -> tuple[str, Any]:
    import yaml

    name, sep, text = item.partition("=")
    if not sep:
        raise UsageError("override", f"expected field=value, got {item!r}")
    try:
        return name.strip(), yaml.safe_load(text)
    except yaml.YAMLError:
        return name.strip(), text


def _field_name(cls: type, name: str, where: str) -> str:
    known = [item.name for item in dataclasses.fields(cls)]
    normal = name.strip().lstrip("-").replace("-", "_")
    if normal not in known:
        raise UsageError(where, f"unknown field {name!r}")
    return normal


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """YAML's types -> the field's: "1e-5" and 1 to float, lists to tuples, strings to paths; anything else is a
    one-line UsageError naming the field. (YAML 1.1 reads ``1e-5`` as a string, a classic recipe bug.)"""
    flag_ = flag(name)
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if value is None:
        if type(None) in args:
            return None
        raise UsageError(flag_, "must not be empty (null)")
    if type(None) in args:  # Optional[X]: coerce to X
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0] if len(inner) == 1 else typing.Union[tuple(inner)])  # noqa: UP007 (a Union built at run time)
    if origin is Literal:
        return value
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        if args and args[0] is int:  # tuple[int, ...]: widths, sizes
            for item in items:
                if isinstance(item, bool) or not isinstance(item, int):
                    raise UsageError(flag_, f"must be a list of integers, got {short(item)}")
            return tuple(items)
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (str, int, float)):
                raise UsageError(flag_, f"must be a list of names, got {short(item)}")
        return tuple(str(item) for item in items)
    if hint is bool:
        if not isinstance(value, bool):
            raise UsageError(flag_, f"must be true or false, got {short(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(flag_, f"must be an integer, got {short(value)}")
        return value
    if hint is float:
        if isinstance(value, bool):
            raise UsageError(flag_, f"must be a number, got {short(value)}")
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an integer beyond float's range
            raise UsageError(flag_, f"must be a number, got {short(value)}") from None
    if hint is Path:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UsageError(flag_, f"must be a path, got {short(value)}")
        return Path(str(value))
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UsageError(flag_, f"must be a string, got {short(value)}")
        return str(value)
    return value
