"""Lazy package exports: `from llava.train import train` works, but `import llava.train.cli` stays light.

A command line imports its subcommands' parsers at start-up; if each package's `__init__`
imported torch and transformers, `llava run --image missing.png` would wait seconds for an
error it can give at once.
"""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` that imports `exports[name]` (a module path) on first use of `name`."""

    def __getattr__(name: str) -> object:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
