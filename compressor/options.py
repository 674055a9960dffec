"""Plug-in options: a criterion or schedule declares its own, typed, and validates what it is given.

A plug-in class declares ``Options``, a frozen dataclass: one field a line, each with a default and a
one-line docstring, checked in ``__post_init__``. The pipeline builds it from ``KEY=VALUE`` pairs
(``--criterion-opt`` / ``--schedule-opt``, or the config's ``criterion_options`` / ``schedule_options``),
converting each value to its field's type, and makes the plug-in with the fields as keyword
arguments: ``cls(**options)``. A plug-in without ``Options`` takes none.

A field may name a ``CompressConfig`` field as its shorthand (``field(metadata={"shorthand":
"prune_steps"})``): a shorthand flag the user changed from its default (``--prune-steps 3``) sets the
option, unless the option is also given, which is an error.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

SHORTHAND = "shorthand"
"""The key of a field's metadata that names the ``CompressConfig`` field it is a shorthand for."""


@dataclass(frozen=True)
class OptionInfo:
    """One option of a plug-in, for listings."""

    name: str
    type: str
    default: Any
    doc: str
    shorthand: str | None = None
    """The ``compress`` flag that sets it too (``--prune-steps``), if any."""


def options_class(plugin: type) -> type | None:
    """The plug-in's ``Options`` dataclass, or None where it declares none."""
    options = getattr(plugin, "Options", None)
    if options is None:
        return None
    if not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        raise ConfigError(f"{plugin.__name__}.Options must be a dataclass, got {options!r}")
    return options


def describe(plugin: type) -> list[OptionInfo]:
    """Every option of ``plugin``: name, type, default and docstring, in declaration order."""
    options = options_class(plugin)
    if options is None:
        return []
    hints, docs = _hints(options), _field_docs(options)
    return [OptionInfo(f.name, _type_name(hints.get(f.name, Any)), _default(f), docs.get(f.name, ""),
                       "--" + f.metadata[SHORTHAND].replace("_", "-") if SHORTHAND in f.metadata else None)
            for f in dataclasses.fields(options)]


def parse_pairs(pairs: Iterable[str], *, flag: str) -> dict[str, str]:
    """``["steps=3", "span=0.5"]`` -> ``{"steps": "3", "span": "0.5"}``; a pair without ``=`` or given twice is an error."""
    found: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{flag} takes KEY=VALUE, got {pair!r}", hint=f"e.g. {flag} steps=3")
        if key in found:
            raise ConfigError(f"{flag} {key} is given twice")
        found[key] = value.strip()
    return found


def build(plugin: type, given: Mapping[str, Any], *, flag: str, what: str, config: Any = None) -> dict[str, Any]:
    """The keyword arguments that make ``plugin``: its ``Options`` built from ``given`` (strings from
    the command line or JSON values) and the shorthands ``config`` sets, validated by the plug-in.

    Errors name ``flag`` and the key: an unknown key lists the known ones, a value that does not
    convert names the type, and the plug-in's own checks say what is wrong.
    """
    options = options_class(plugin)
    if options is None:
        if given:
            raise ConfigError(f"{flag} {', '.join(given)}: {what} takes no options")
        return {}
    fields = {f.name: f for f in dataclasses.fields(options)}
    unknown = [key for key in given if key not in fields]
    if unknown:
        raise ConfigError(f"{flag} {unknown[0]}: {what} has no such option; known: {', '.join(fields) or 'none'}",
                          hint=f"`compressor {'schedules' if 'schedule' in flag else 'criteria'}` lists each one's options")
    hints = _hints(options)
    values = {key: _convert(value, hints.get(key, Any), flag=flag, key=key) for key, value in given.items()}
    for name, f in fields.items():
        shorthand = f.metadata.get(SHORTHAND)
        if shorthand is None or config is None or not _changed(config, shorthand):
            continue
        if name in values:
            raise ConfigError(f"{flag} {name} and --{shorthand.replace('_', '-')} both set {what}'s {name}",
                              hint="give one of them")
        values[name] = getattr(config, shorthand)
    try:
        made = options(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{flag}: {what}: {exc}") from exc
    return {name: getattr(made, name) for name in fields}


def _changed(config: Any, name: str) -> bool:
    """Whether ``config.name`` differs from the field's default (a shorthand the user set)."""
    for f in dataclasses.fields(config):
        if f.name == name:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            return getattr(config, name) != default
    raise ConfigError(f"shorthand {name!r} is not a field of {type(config).__name__}")


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _convert(value: Any, hint: Any, *, flag: str, key: str) -> Any:
    """``value`` as the field's type: strings are parsed, JSON values are checked."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else Any
    if hint is Any:
        return value
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{flag} {key}={value}: must be one of {', '.join(map(str, choices))}")
        return value
    bad = ConfigError(f"{flag} {key}={value}: expected {_type_name(hint)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise bad
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise bad
        try:
            return int(value)
        except ValueError:
            raise bad from None
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad
        try:
            return float(value)
        except ValueError:
            raise bad from None
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    return value


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else _type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is typing.Literal:
        return " | ".join(map(str, typing.get_args(hint)))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _hints(options: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(options)
    except (NameError, TypeError):  # an annotation that does not resolve: values go through unconverted
        return {}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _field_docs(options: type) -> dict[str, str]:
    """The one-line docstrings under each field of the class body (``field: int = 3`` then ``\"\"\"doc\"\"\"``)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(options)))
    except (OSError, TypeError, SyntaxError):  # no source (built in C, a REPL): no docs
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for stmt, after in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[stmt.target.id] = " ".join(after.value.value.split())
    return docs
