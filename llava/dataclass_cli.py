"""Command-line flags derived from a dataclass, so a config and its CLI cannot drift apart.

Each field becomes `--field-name` (underscores as dashes) with the field's default and type;
`field(metadata={"help": ..., "flags": [...], "choices": [...]})` adds help text, aliases and
choices. bool fields become on/off switches (`--x` / `--no-x`). `from_args` builds the
dataclass back from the parsed namespace. Only what our configs use is supported: str, int,
float, bool and their `| None` forms.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    for f in dataclasses.fields(cls):
        kind = _scalar_type(hints.get(f.name, f.type))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flags = [f"--{f.name.replace('_', '-')}", *f.metadata.get("flags", [])]
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(*flags, dest=f.name, default=default, action=argparse.BooleanOptionalAction,
                                help=help_text)
            continue
        shown = f" (default: {default})" if default not in (None, "") else ""
        parser.add_argument(*flags, dest=f.name, type=kind, default=default, choices=f.metadata.get("choices"),
                            metavar=f.metadata.get("metavar"), help=help_text + shown)


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The dataclass from parsed flags (fields missing from the namespace keep their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})
