"""`llava data check` and `llava data inspect`: see what training will make of a data file.

`check` lists every bad row (id and reason) and statistics; `inspect` shows chosen rows as
rendered text, token ids and labels, so a template or tokenizer mismatch is visible before a
training run rather than after it.

Exit status: 0 every row is usable; 1 some rows are bad (each listed by id); 2 the file itself
cannot be used (missing, not UTF-8, not a JSON list or JSON lines, no rows at all) or an
argument is wrong, said in one line. An empty file is 2, not "0 bad rows of 0": training on it
would fail, so the check must too.
Also runs standalone as `python -m llava.train.data_cli data ...`.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any, Callable, Sequence

from llava.console import exit_with, run_command
from llava.errors import InputError
from llava.processing.labels import IGNORE_INDEX, LabelError, build_example, training_text
from llava.processing.templates import get_template
from llava.processing.tokenize import CONVENTIONS
from llava.train.records import parse_record, read_rows

if TYPE_CHECKING:  # llava.train.data imports torch: loaded only when a command runs, so `llava --help` stays fast
    from llava.train.data import Size

DEFAULT_ROWS = "0-4"


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `data check` and `data inspect` on a parser's subcommands."""
    data = subparsers.add_parser("data", help="check and inspect training data files")
    sub = data.add_subparsers(dest="data_command", required=True)
    from llava.data.synth_cli import add_synth_command

    add_synth_command(sub)

    check = sub.add_parser("check", help="report every bad row and statistics of a data file (exit 1 if any "
                           "bad, 2 if the file is unusable or has no rows)")
    check.add_argument("data", help="JSON list or JSONL of LLaVA conversation records")
    _common_args(check)
    check.add_argument("--max-length", type=_positive, default=None,
                       help="report rows that cannot be truncated to N tokens")
    check.set_defaults(func=cmd_check)

    inspect = sub.add_parser("inspect", help="show rows as rendered text, input_ids and labels")
    inspect.add_argument("data", help="JSON list or JSONL of LLaVA conversation records")
    _common_args(inspect)
    inspect.add_argument("--rows", default=DEFAULT_ROWS, help=f"row indices: '0,3,5' or '0-9' (default {DEFAULT_ROWS})")
    inspect.add_argument("--max-length", type=_positive, default=None, help="truncate like training would")
    inspect.set_defaults(func=cmd_inspect)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value}")
    return value


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-folder", default=None, help="folder the records' image paths are relative to")
    p.add_argument("--tokenizer", default=None, help="folder loadable by transformers.AutoTokenizer")
    p.add_argument("--template", default=None, help="conversation template, e.g. vicuna_v1, plain")
    p.add_argument("--model", default=None,
                   help="checkpoint: image token counts (and default tokenizer/template) from this model")
    p.add_argument("--convention", choices=CONVENTIONS, default="original", help="how <image> is tokenised")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _load_model(path: str) -> tuple[Any, Any, str]:
    """(model, tokenizer, template name) of a checkpoint; a separate function so tests can stub it.

    Through `llava.checkpoint`, not `llava.api`: training sits below the API (tests/test_import_layers.py)."""
    from llava.checkpoint import load_checkpoint
    from llava.processing.templates import template_for_model

    ckpt = load_checkpoint(path, device="cpu")
    template = get_template(ckpt.model.config.template or template_for_model(ckpt.name))
    return ckpt.model, ckpt.tokenizer, template.name


def _setup(args: argparse.Namespace, need_tokenizer: bool):
    """Tokenizer, template, per-image token count and placeholder id from the arguments."""
    tokenizer = template = None
    from llava.train.data import IMAGE_TOKEN_INDEX

    count: Callable[[Size], int] | None = None
    index = IMAGE_TOKEN_INDEX
    if args.model:
        model, tokenizer, template = _load_model(args.model)
        count, index = model.image_token_count, model.config.image_token_index
    if args.tokenizer:
        tokenizer = _load_tokenizer(args.tokenizer)
    template = args.template or template
    if need_tokenizer and tokenizer is None:
        raise InputError("--tokenizer (or --model) is required")
    if tokenizer is not None and template is None:
        raise InputError("--template is required with --tokenizer")
    if template is not None:
        get_template(template)  # fail early on an unknown name
    return tokenizer, template, count, index


def _load_tokenizer(path: str):
    """`AutoTokenizer.from_pretrained`, its many ways of failing on a wrong folder said in one line."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"--tokenizer {path}: cannot load a tokenizer from it ({first})") from err


def cmd_check(args: argparse.Namespace) -> int:
    from llava.train.data import check_dataset

    tokenizer, template, count, index = _setup(args, need_tokenizer=False)
    report = check_dataset(args.data, args.image_folder, tokenizer, template, args.max_length, count, index,
                           args.convention)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0 if report.ok else 1


def parse_rows(spec: str, n_rows: int) -> list[int]:
    """'0,3,5' / '0-9' / '0-2,7' -> indices, each checked against the number of rows."""
    rows: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                rows += range(lo, min(hi, n_rows - 1) + 1) or [lo]  # a range past the end is clipped
            elif part:
                rows.append(int(part))
        except ValueError:
            raise InputError(f"--rows: cannot read {part!r}; use e.g. 0,3,5 or 0-9") from None
    bad = [r for r in rows if not 0 <= r < n_rows]
    if bad:
        raise InputError(f"--rows: row(s) {bad} out of range; the file has {n_rows} rows")
    return rows


def inspect_row(rec: Any, index: int, tokenizer, template: str, count: Callable[[Size], int] | None,
                image_token_index: int, image_folder: str | None, convention: str,
                max_length: int | None) -> dict[str, Any]:
    """One row as training sees it: rendered text, ids, labels and the trained text pieces."""
    row, problems = parse_record(rec, index)
    out: dict[str, Any] = {"index": index, "id": row.id}
    counts = [1] * len(row.images)
    if not problems and row.images and count is not None:
        from llava.train.data import read_image_sizes

        sizes, problems = read_image_sizes(row, image_folder)
        counts = [int(count(s)) for s in sizes]
    if not problems:
        try:
            ids, labels = build_example(tokenizer, template, row.turns, counts, image_token_index, convention,
                                        max_length)
        except LabelError as e:
            problems.append(e.reason)
    if problems:
        out["error"] = "; ".join(problems)
        return out
    out["text"] = training_text(get_template(template), row.turns, len(counts))[0]
    out["input_ids"], out["labels"] = ids, labels
    out["trained"] = [tokenizer.decode(run) for run in _runs(labels)]
    return out


def _runs(labels: Sequence[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        if i and labels[i - 1] != IGNORE_INDEX:
            runs[-1].append(label)
        else:
            runs.append([label])
    return runs


def cmd_inspect(args: argparse.Namespace) -> int:
    tokenizer, template, count, index = _setup(args, need_tokenizer=True)
    records = read_rows(args.data)  # a row that is not a record is shown as that row's error
    failed = False
    for i in parse_rows(args.rows, len(records)):
        out = inspect_row(records[i], i, tokenizer, template, count, index, args.image_folder, args.convention,
                          args.max_length)
        failed |= "error" in out
        if args.json:
            print(json.dumps(out, ensure_ascii=False))
            continue
        print(f"=== row {out['id']} (#{i}) ===")
        if "error" in out:
            print(f"error: {out['error']}")
            continue
        print(out["text"])
        print(f"--- input_ids ({len(out['input_ids'])}): {out['input_ids']}")
        print(f"--- labels: {out['labels']}")
        print(f"--- trained: {out['trained']}")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llava", description="LLaVA training data tools")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_command(f"llava data {args.data_command}", lambda: args.func(args))


if __name__ == "__main__":
    exit_with(main())
