"""Reading the JSON and JSONL files scorers take, with errors that name the file and line.

A scorer fed a truncated or hand-edited file should say where it broke, in one line, instead
of a `json.JSONDecodeError` traceback. Kept small and stable: other scorers import it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llava.errors import DataError, InputError


def _open_text(path: str | Path, what: str = "file"):
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such {what}" if not path.exists() else f"{path}: not a file")
    return path.open(encoding="utf-8")


def iter_jsonl(path: str | Path, what: str = "") -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; every line must be one JSON object.

    `what` ("question file", ...) is put before the path in error messages."""
    name = f"{what} {path}" if what else f"{path}"
    with _open_text(path, what or "file") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{name}, line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{name}, line {number}: expected a JSON object, got {type(row).__name__}")
            yield number, row


def read_jsonl(path: str | Path) -> list[dict]:
    """All objects of a JSONL file (blank lines skipped)."""
    return [row for _, row in iter_jsonl(path)]


def read_json(path: str | Path) -> Any:
    """One JSON document."""
    with _open_text(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})") from None


def field(row: dict, key: str, where: str) -> Any:
    """`row[key]`, or a DataError saying which file/line lacks it (`where` is e.g. "a.jsonl, line 3")."""
    try:
        return row[key]
    except KeyError:
        raise DataError(f"{where}: missing field {key!r}") from None
