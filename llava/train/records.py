"""Reading LLaVA conversation records and putting each in normal form (re-exported by `llava.train.data`).

A data file is a JSON list of records or JSON lines (one record per line).  Anything else (an
object, a number, an empty file, text that is not UTF-8, broken JSON) is a `DataError` naming the
file and, where there is one, the line, column or byte.  Rows that are not usable records are not
file errors: `parse_record` lists each row's problems, so `llava data check` can report every bad
row by id and training can refuse them all at once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from llava.errors import DataError
from llava.processing.labels import is_utf8
from llava.processing.templates import image_first
from llava.processing.tokenize import IMAGE_TAG

USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
MAX_SHOWN = 60  # characters of an id or value quoted in a message: a message stays one readable line

__all__ = ["Row", "read_rows", "load_records", "row_id", "parse_record", "json_type", "clip", "shown_path",
           "USER_ROLES", "ASSISTANT_ROLES"]


@dataclass
class Row:
    """A record in normal form: alternating human/gpt turns with `<image>` tags placed."""

    index: int
    id: str
    turns: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type ("object", "array", ...), for messages about data files."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _read_text(path: str | os.PathLike) -> str:
    """The file as text; bytes that are not UTF-8 are named by offset, line and column."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:  # stays a FileNotFoundError (callers catch it); its message names the file
        raise
    except OSError as err:  # a folder, no permission: the user's to fix, named
        raise DataError(f"{path}: cannot read the data file: {err.strerror or err}") from None
    try:
        return raw.decode("utf-8-sig")  # a UTF-8 byte-order mark is harmless; drop it
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        hint = " (it looks like UTF-16)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise DataError(f"{path}: not UTF-8 text{hint}: byte 0x{raw[err.start]:02x} at offset {err.start} "
                        f"(line {line}, byte {column} of the line) cannot be decoded; save the file as UTF-8 "
                        "JSON") from None


def _loads(text: str) -> Any:
    """`json.loads`, with the non-JSONDecodeError failures (nesting, huge numbers) as ValueError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _parses(line: str) -> bool:
    try:
        _loads(line)
    except ValueError:  # JSONDecodeError included
        return False
    return True


def _json_lines(path: str | os.PathLike, text: str) -> list[Any]:
    """The values of a JSON-lines file; a bad line is named by number and column."""
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028 etc.
        if not line.strip():
            continue
        try:
            rows.append(_loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON on line {lineno}, column {e.colno}: {e.msg}") from None
        except ValueError as e:
            raise DataError(f"{path}: invalid JSON on line {lineno}: {e}") from None
    return rows


def _parse_rows(path: str | os.PathLike) -> tuple[list[Any], bool]:
    """The file's rows as parsed, and whether they came from one JSON list (else JSON lines)."""
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty: no rows (expected a JSON list of records or JSON lines)")
    try:
        value = _loads(text)
    except json.JSONDecodeError as e:
        first = next(line for line in text.split("\n") if line.strip())
        if _parses(first) and (e.msg == "Extra data" or not text.lstrip().startswith("[")):
            return _json_lines(path, text), False  # one value a line (and maybe a broken line further on)
        ends = " (the file ends there: is it cut short?)" if not text[e.pos:].strip() else ""
        raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}{ends}") from None
    except ValueError as e:
        raise DataError(f"{path}: invalid JSON: {e}") from None
    if isinstance(value, list):
        if not value:
            raise DataError(f"{path}: no rows (the file holds an empty JSON list)")
        return value, True
    one_line = sum(1 for line in text.split("\n") if line.strip()) == 1
    if one_line and str(path).lower().endswith(".jsonl"):
        return [value], False
    kind = json_type(value)
    what = {"object": "an object", "array": "an array", "null": "null"}.get(kind, f"a {kind}")
    if isinstance(value, dict):
        what += f" with keys {_short(sorted(value)[:5])}" if value else " with no keys"
    raise DataError(f"{path}: expected a JSON list of records (or JSON lines), got {what}")


def read_rows(path: str | os.PathLike) -> list[Any]:
    """Every row of a JSON list or JSON-lines file as parsed, non-objects included (see `parse_record`).

    The whole file as one JSON value must be a list; a single object is accepted only as the one
    line of a `.jsonl` file (an object in a `.json` file is usually a wrapper such as
    `{"data": [...]}`, and reading it as one broken row would hide that).  A file with no rows
    is an error: nothing would train.
    """
    return _parse_rows(path)[0]


def load_records(path: str | os.PathLike) -> list[dict]:
    """Records of a JSON list or JSONL file; bad JSON is reported with its line number.

    Every row must be a JSON object (`read_rows` keeps the others, for per-row reports).
    """
    records, is_list = _parse_rows(path)
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            place = f"item {i}" if is_list else f"row #{i}"
            raise DataError(f"{path}: {place} is a {type(rec).__name__} (JSON {json_type(rec)}), "
                            "expected a JSON object")
    return records


def clip(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters: a huge string from a row must not flood a one-line message."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def shown_path(path: str) -> str:
    """A file name from a row as a message shows it: quoted when it holds control characters, cut when huge."""
    return clip(path if path.isprintable() else repr(path))


def _short(value: Any) -> str:
    """`repr(value)` (printable, quoted), cut to MAX_SHOWN characters."""
    return clip(repr(value), MAX_SHOWN)


def row_id(rec: Any, index: int) -> str:
    """The record's `id`, or `#index` for records without one; printable and at most MAX_SHOWN long."""
    if not isinstance(rec, dict) or rec.get("id") in (None, ""):
        return f"#{index}"
    text = str(rec["id"])
    if not text.isprintable() or len(text) > MAX_SHOWN:
        text = _short(text)
    return text


def _images(rec: dict) -> tuple[list[str], list[str]]:
    """The record's image names and the problem with its `image` field, if any."""
    images = rec.get("image")
    if isinstance(images, str):
        images = [images]
    if images is None:
        images = []
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        return [], [f"'image' must be a file name or a list of file names, got {_short(images)}"]
    if any(not is_utf8(p) or "\x00" in p for p in images):
        return [], ["'image' holds a file name that is not valid text (an unpaired surrogate or a NUL)"]
    return list(images), []


def _turns(conv: list) -> tuple[list[tuple[str, str]], list[str]]:
    """(role, value) of each turn, and a problem for each turn that is not a {from, value} pair."""
    turns: list[tuple[str, str]] = []
    problems: list[str] = []
    for j, turn in enumerate(conv):
        if not isinstance(turn, dict):
            problems.append(f"turn {j} is a JSON {json_type(turn)}, expected an object with 'from' and 'value'")
            continue
        value, role = turn.get("value"), turn.get("from")
        if not isinstance(value, str):
            got = "missing" if "value" not in turn else f"a JSON {json_type(value)}"
            problems.append(f"turn {j} needs a string 'value' ({got})")
            continue
        if not is_utf8(value):
            problems.append(f"turn {j} holds an unpaired surrogate (a \\ud800-\\udfff escape), not valid text")
            continue
        if not isinstance(role, str) or role.lower() not in USER_ROLES + ASSISTANT_ROLES:
            problems.append(f"turn {j} has unknown role {_short(role)} (expected human or gpt)")
            continue
        turns.append(("human" if role.lower() in USER_ROLES else "gpt", value))
    return turns, problems


def parse_record(rec: Any, index: int = 0) -> tuple[Row, list[str]]:
    """Normalise a record like the original's preprocessing; returns the row and its problems.

    A leading gpt turn is dropped (as the original does) and so is a trailing human turn
    without an answer.  One image: its tag is moved to the front of its human turn, or
    inserted at the front of the first one when missing (the original's layout).  Several
    images: one tag per image, in order, is required.  Any JSON value is accepted: what is
    not a usable record comes back as problems, never as an exception.
    """
    row = Row(index=index, id=row_id(rec, index))
    if not isinstance(rec, dict):
        return row, [f"record is a JSON {json_type(rec)}, expected an object"]
    row.images, problems = _images(rec)
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        return row, problems + ["missing or empty 'conversations'"]
    turns, turn_problems = _turns(conv)
    problems += turn_problems
    if problems:
        return row, problems
    if turns and turns[0][0] == "gpt":
        turns = turns[1:]
    for j, (role, _) in enumerate(turns):
        if role != ("human", "gpt")[j % 2]:
            return row, [f"roles do not alternate human/gpt: turn {j} is {role} after {turns[j - 1][0]}"]
    if len(turns) % 2 and IMAGE_TAG not in turns[-1][1]:
        turns = turns[:-1]  # an unanswered question trains nothing, as in the original
    if not turns:
        return row, ["no human/gpt pair to train on"]
    values = [value for _, value in turns]
    for j, value in enumerate(values):
        if not value.strip():
            problems.append(f"turn {j} ({turns[j][0]}) is empty")
        elif j % 2 and IMAGE_TAG in value:
            problems.append(f"turn {j} (gpt) contains {IMAGE_TAG}")
    if len(values) % 2:
        problems.append(f"the last human turn has {IMAGE_TAG} but no answer")
    problems += _place_tags(values, len(row.images))
    row.turns = values
    return row, problems


def _place_tags(values: list[str], n_images: int) -> list[str]:
    """Check tag counts against images; for one image put its tag first (in place)."""
    n_tags = sum(v.count(IMAGE_TAG) for v in values[::2])
    if n_images == 0:
        return [f"{n_tags} {IMAGE_TAG} tag(s) but no image"] if n_tags else []
    if n_tags > n_images:
        return [f"more {IMAGE_TAG} tags ({n_tags}) than images ({n_images})"]
    if n_images == 1:
        if n_tags == 0:
            values[0] = IMAGE_TAG + "\n" + values[0]
        else:
            j = next(j for j in range(0, len(values), 2) if IMAGE_TAG in values[j])
            values[j] = image_first(values[j])
        return []
    if n_tags != n_images:
        return [(f"{n_tags} {IMAGE_TAG} tag(s) for {n_images} images; rows with several images need one tag "
                 "per image, in order")]
    return []
