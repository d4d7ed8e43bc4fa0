"""Command-line flags derived from a dataclass, so a config and its CLI cannot drift apart.

Each field becomes `--field-name` (underscores as dashes) with the field's default and type;
a field without a default is a required flag. `field(metadata=...)` adds:

- "help", "flags" (aliases), "choices", "metavar";
- "group": the title of the argument group the flag is listed under;
- "parse": a function from the flag's text to the value, for fields that are not a scalar
  (comma-separated tuples, JSON-ish lists);
- "nargs" and "const" (e.g. `--resume` alone meaning "auto");
- "hidden": left out of --help.

bool fields become on/off switches (`--x` / `--no-x`). `from_args` builds the dataclass back from
the parsed namespace. Scalars are str, int, float, bool and their `| None` forms.

`to_argv` goes the other way: the flags that rebuild a given instance (for commands written out,
such as a model card's).

`saved_value` reads a field back from a dataclass saved as a dict by an older version, which may
lack fields added since: those read as their defaults, so old runs still compare equal.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any, TypeVar

T = TypeVar("T")

_SCALARS = {"str": str, "int": int, "float": float, "bool": bool}


def _scalar_type(annotation: Any) -> type:
    """str / int / float / bool from a field's annotation (a string under `from __future__ import annotations`)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    names = [part.strip() for part in text.split("|") if part.strip() != "None"]
    if len(names) != 1 or names[0] not in _SCALARS:
        raise TypeError(f"dataclass_cli supports str, int, float, bool (or | None), not {text!r}")
    return _SCALARS[names[0]]


def add_dataclass_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """One flag per field of `cls` (see the module docstring)."""
    hints = typing.get_type_hints(cls) if not any(isinstance(f.type, str) for f in dataclasses.fields(cls)) else {}
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        title = meta.get("group")
        if title and title not in groups and isinstance(parser, argparse.ArgumentParser):
            groups[title] = parser.add_argument_group(title)
        target = groups.get(title, parser)
        kind = meta.get("parse") or _scalar_type(hints.get(f.name, f.type))
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flags = [f"--{f.name.replace('_', '-')}", *meta.get("flags", [])]
        help_text = argparse.SUPPRESS if meta.get("hidden") else meta.get("help", "")
        if kind is bool:
            target.add_argument(*flags, dest=f.name, default=default, action=argparse.BooleanOptionalAction,
                                help=help_text)
            continue
        if help_text is not argparse.SUPPRESS and default not in (None, "", ()):
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            help_text += f" (default: {shown})"
        extra = {k: meta[k] for k in ("nargs", "const") if k in meta}
        target.add_argument(*flags, dest=f.name, type=kind, default=default, required=required,
                            choices=meta.get("choices"), metavar=meta.get("metavar"), help=help_text, **extra)


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The dataclass from parsed flags (fields missing from the namespace keep their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def saved_value(cls: type, saved: dict[str, Any], key: str, nested: type | None = None) -> Any:
    """Field `key` of `cls` as saved in `saved`, or its default where the dict predates the field
    (None for a field without a default, or a key that is no field). Where the field holds a
    dataclass of type `nested` saved as a dict, its missing fields are filled the same way."""
    field = {f.name: f for f in dataclasses.fields(cls)}.get(key)
    value = saved[key] if key in saved else (None if field is None else _field_default(field))
    if nested is not None and isinstance(value, dict):
        value = {**{f.name: _field_default(f) for f in dataclasses.fields(nested)}, **value}
    return value


def _flag_text(value: Any) -> str:
    """A value as its flag's parser reads it back: pairs as JSON, tuples of scalars comma-joined."""
    if isinstance(value, (list, tuple)):
        if any(isinstance(v, (list, tuple)) for v in value):
            return json.dumps([list(v) if isinstance(v, (list, tuple)) else v for v in value], separators=(",", ":"))
        return ",".join(map(str, value))
    return str(value)


def to_argv(obj: Any, skip: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """The flags that rebuild `obj` through `add_dataclass_args` + `from_args`: one per field whose
    value differs from its default, in field order (`skip`: field names left out)."""
    argv: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in skip or value == _field_default(f):
            continue
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{f.name.replace('_', '-')}")
        elif value is None:
            raise ValueError(f"{f.name}=None has no flag (its default is {_field_default(f)!r})")
        else:
            argv += [flag, _flag_text(value)]
    return argv
