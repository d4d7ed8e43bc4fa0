"""Resumable output files for long answering runs (benchmark answers, `llava batch`).

Why: a benchmark run over 100k questions must survive a crash or a SIGKILL without losing more
than the batch in flight and without writing any answer twice. Every row is one `write` of a
whole record followed by a flush, and `sync()` (once per batch) fsyncs; on restart `open_rows`
reads the rows already there and cuts away a half-written last record (the only damage a
crash mid-write can leave), so the caller skips what is done and answers the rest.

Formats: JSON lines (one object a line), or CSV with a header (chosen by a `.csv` suffix).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from llava.errors import DataError
from llava.eval.scoring.files import iter_jsonl

Row = dict[str, Any]


def read_jsonl_numbered(path: str | os.PathLike, what: str = "file") -> list[tuple[int, Row]]:
    """(line number, object) for every object of a JSON lines file; a bad line -> DataError naming file and line."""
    return list(iter_jsonl(path, what))


def _jsonl_records(data: bytes, path: Path) -> tuple[list[Row], int]:
    """(complete rows, byte length they take); only the last line may be damaged."""
    rows: list[Row] = []
    end = 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, 1):
        last = number == len(lines)  # the text after the final newline: empty, or a torn write
        if not line.strip():
            if not last:
                end += len(line) + 1
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            if last or number == len(lines) - 1 and not lines[-1].strip():
                return rows, end  # a record torn by a crash: cut it away and answer it again
            raise DataError(f"output file {path}, line {number} is not a JSON object; "
                            "it is not a file this command wrote (move it away or pick another --out)")
        if last:
            return rows, end  # complete JSON but no newline yet: rewrite it with its newline
        rows.append(row)
        end += len(line) + 1
    return rows, end


def _csv_records(data: bytes, path: Path, fields: Sequence[str]) -> tuple[list[Row], int]:
    """(complete rows, byte length of header + those rows); a record without its newline is cut."""
    text = data.decode("utf-8")
    parts = text.split("\n")  # not splitlines(): an answer may hold \r or \u2028, which are not record ends
    lines = [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    reader = csv.reader(iter(lines))
    rows: list[Row] = []
    consumed, end, header = 0, 0, None
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error:  # end of data inside a quoted field: a torn last record
            break
        chunk = "".join(lines[consumed:reader.line_num])
        consumed = reader.line_num
        if not chunk.endswith("\n"):
            break
        if header is None:
            header = record
            if header != list(fields):
                raise DataError(f"output file {path} has columns {header}, expected {list(fields)}; "
                                "it is not a file this command wrote (move it away or pick another --out)")
        else:
            rows.append(dict(zip(header, record)))
        end += len(chunk.encode("utf-8"))
    return rows, end


class RowWriter:
    """Appends rows to a JSONL or CSV file, one flushed write per row; `sync()` makes them durable."""

    def __init__(self, path: Path, fields: Sequence[str] | None = None) -> None:
        self.path = path
        self.fields = list(fields or [])
        self.csv = path.suffix.lower() == ".csv"
        self._file = open(path, "ab")  # noqa: SIM115 - kept open across batches; closed by close()
        if self.csv and self._file.tell() == 0:
            self._write_bytes(self._csv_line(self.fields))

    def _csv_line(self, values: Sequence[Any]) -> bytes:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL).writerow(["" if v is None else v for v in values])
        return buf.getvalue().encode("utf-8")

    def _write_bytes(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()

    def write(self, row: Row) -> None:
        if self.csv:
            self._write_bytes(self._csv_line([row.get(k) for k in self.fields]))
        else:
            self._write_bytes((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))

    def sync(self) -> None:
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()

    def __enter__(self) -> RowWriter:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_rows(path: str | os.PathLike, fields: Sequence[str] | None = None) -> list[Row]:
    """The complete rows of an output file (a torn last record is ignored, not repaired)."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if path.suffix.lower() == ".csv":
        return _csv_records(data, path, fields or [])[0]
    return _jsonl_records(data, path)[0]


def open_rows(path: str | os.PathLike, fields: Sequence[str] | None = None) -> tuple[list[Row], RowWriter]:
    """The rows already written to `path` and a writer that appends after them.

    A half-written last record is truncated away first, so its item is answered again and
    never appears twice. The parent folder is created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    if path.exists():
        data = path.read_bytes()
        if path.suffix.lower() == ".csv":
            rows, end = _csv_records(data, path, fields or [])
        else:
            rows, end = _jsonl_records(data, path)
        if end < len(data):
            with open(path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
    return rows, RowWriter(path, fields)


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of at most `size` items."""
    for start in range(0, len(items), size):
        yield items[start:start + size]
