"""Command-line flags generated from a config dataclass, so that a setting is declared once.

A field declared with `flag(default, help, ...)` becomes `--kebab-case-name`: its type comes from
the annotation (`int`, `float`, `str`, or one of those `| None`; a `bool` defaulting to False is a
switch; a `tuple[str, ...]` is a repeatable flag), its default and help from the declaration, plus
what a None default means (`none_means`, for the help), `choices`, a `parse` function for values
argparse cannot convert by type (a mapping, say), a `metavar`, and an `exclusive` group name for
flags that cannot be given together, and `aliases`: other option strings for the same flag (SGLang's
names, e.g. `--model-path` for `--model`); a tuple flag with `many` takes several values per
occurrence (`--worker-urls A B`, sgl-router's form). Fields declared otherwise are not flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

_FLAG = "flag"


@dataclasses.dataclass(frozen=True)
class _Flag:
    help: str
    none_means: str | None
    choices: Sequence[Any] | None
    parse: Callable[[str], Any] | None
    metavar: str | None
    exclusive: str | None
    aliases: tuple[str, ...]
    many: bool = False


def flag(default: T, help: str, *, none_means: str | None = None, choices: Sequence[Any] | None = None,
         parse: Callable[[str], Any] | None = None, metavar: str | None = None, exclusive: str | None = None,
         aliases: Sequence[str] = (), many: bool = False) -> T:
    """A dataclass field that is also a command-line flag. A dict default is copied per instance."""
    if bad := [a for a in aliases if not a.startswith("-")]:
        raise TypeError(f"flag aliases must be option strings (--name), got {bad}")
    meta = {_FLAG: _Flag(help, none_means, choices, parse, metavar, exclusive, tuple(aliases), many)}
    if isinstance(default, dict):
        # the type checker sees the default; the dataclass gets a field that copies it
        return typing.cast(T, dataclasses.field(default_factory=lambda: dict(default), metadata=meta))
    return typing.cast(T, dataclasses.field(default=default, metadata=meta))


class _Container(Protocol):
    def add_argument(self, *name_or_flags: str, **kwargs: Any) -> argparse.Action: ...

    def add_mutually_exclusive_group(self, *, required: bool = False) -> argparse._MutuallyExclusiveGroup: ...


def _flag_fields(cls: type) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if _FLAG in f.metadata]


def add_flags(parser: _Container, cls: type, *, only: Iterable[str] | None = None,
              defaults: Mapping[str, Any] | None = None) -> None:
    """Add `cls`'s flags (those named in `only`, in declaration order) to `parser`; `defaults`
    replaces the declared default of some, for a command that needs other values."""
    fields = _selected(cls, only)
    overrides = dict(defaults or {})
    if stray := set(overrides) - {f.name for f in fields}:
        raise TypeError(f"defaults for flags not added: {', '.join(sorted(stray))}")
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in fields:
        spec: _Flag = f.metadata[_FLAG]
        default = overrides[f.name] if f.name in overrides else _default(f)
        kwargs: dict[str, Any] = {"default": default, "help": _help(spec, default)}
        kind = _base_type(hints[f.name], f.name)
        if kind is bool:
            if default is not False:
                raise TypeError(f"flag {f.name!r}: a switch must default to False")
            kwargs["action"] = "store_true"
        elif kind is tuple:
            # repeatable: each occurrence adds one value; flag_values turns them into a tuple
            kwargs.update(action="append", type=spec.parse or str, default=None,
                          help=f"{spec.help} (repeatable)")
            if spec.many:
                kwargs.update(action="extend", nargs="+", help=f"{spec.help} (one or more, repeatable)")
            if spec.metavar is not None:
                kwargs["metavar"] = spec.metavar
        else:
            if spec.parse is None and kind not in (int, float, str):
                raise TypeError(f"flag {f.name!r}: a {kind.__name__} needs a parse function")
            kwargs["type"] = spec.parse or kind
            if spec.choices is not None:
                kwargs["choices"] = list(spec.choices)
            if spec.metavar is not None:
                kwargs["metavar"] = spec.metavar
        target = parser
        if spec.exclusive is not None:
            if spec.exclusive not in groups:
                groups[spec.exclusive] = parser.add_mutually_exclusive_group()
            target = groups[spec.exclusive]
        # dest stays the field's name whichever option string is given
        target.add_argument("--" + f.name.replace("_", "-"), *spec.aliases, dest=f.name, **kwargs)


def flag_values(cls: type, ns: argparse.Namespace, *, only: Iterable[str] | None = None) -> dict[str, Any]:
    """The parsed values of `cls`'s flags (those in `only`), by field name: `cls(**values)` or
    `Engine(**values)` takes them."""
    out = {}
    for f in _selected(cls, only):
        value = getattr(ns, f.name)
        if isinstance(value, list):  # a repeatable flag's values
            value = tuple(value)
        elif value is None and isinstance(_default(f), tuple):
            value = _default(f)
        out[f.name] = value
    return out


def _selected(cls: type, only: Iterable[str] | None) -> list[dataclasses.Field[Any]]:
    fields = _flag_fields(cls)
    if only is None:
        return fields
    wanted = set(only)
    if missing := wanted - {f.name for f in fields}:
        raise TypeError(f"{cls.__name__} has no flag(s) {', '.join(sorted(missing))}")
    return [f for f in fields if f.name in wanted]


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _help(spec: _Flag, default: Any) -> str:
    if default is argparse.SUPPRESS:  # a copy of a flag whose default lives on another parser
        return spec.help
    if default is None:
        return spec.help if spec.none_means is None else f"{spec.help} (default: {spec.none_means})"
    if isinstance(default, bool) or (isinstance(default, Mapping) and not default):
        return spec.help
    return f"{spec.help} (default: %(default)s)"


def _base_type(annotation: Any, name: str) -> type:
    """The class an annotation names, without `| None` and type arguments (`dict[str, float]`: dict)."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"flag {name!r}: cannot derive a type from {annotation!r}")
        annotation = rest[0]
    origin = typing.get_origin(annotation)
    kind = origin if origin is not None else annotation
    if not isinstance(kind, type):
        raise TypeError(f"flag {name!r}: cannot derive a type from {annotation!r}")
    return kind
