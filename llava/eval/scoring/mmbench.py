"""MMBench: LLaVA's `scripts/convert_mmbench_for_submission.py`, plus a local circular accuracy.

    python -m llava.eval.convert_mmbench_for_submission --annotation-file mmbench_dev_20230712.tsv \
        --result-dir answers --upload-dir answers_upload --experiment llava-v1.5-13b

Upload (upstream): the TSV without its hint/category/source/image/comment/l2-category columns,
with a `prediction` column inserted at position 6 (after A-D), filled from
`{result-dir}/{experiment}.jsonl` by matching `index` to `question_id`; with several answers per
question (circular rounds) the LAST one in the file wins, as upstream's repeated assignment.
Written as `{experiment}.xlsx` when openpyxl is installed (upstream needs pandas + openpyxl);
otherwise as `{experiment}.tsv` with the same columns, and the printout says so (the server
wants xlsx; convert it elsewhere).

Local accuracy (NOT upstream, which scores on the OpenCompass server; only when the TSV has an
`answer` column): each answer's right letter is the letter the prompt showed for the right option
text, found in the answer's `options` (the rotated option texts `model_vqa_mmbench` records) or,
without them, by rotation: original index i in round r is shown as letter (i - r) mod n. A
question counts as right only if EVERY round it has is right (MMBench's CircularEval). Letter
parse (a guess, no GPT matching): the stripped text's first char if it is an option letter and
is alone or followed by one of ". ):,"; else the option whose text equals the answer
(case-insensitive, trailing "." ignored); else no letter (wrong).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

from llava.errors import DataError, InputError
from llava.eval.scoring.command import run_scorer
from llava.eval.scoring.files import field, iter_jsonl

NAME = "mmbench"
LETTERS = "ABCDEFGHIJ"
DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")


def read_tsv(path: str | Path) -> tuple[list[str], list[dict]]:
    """(columns, rows) of an MMBench TSV (base64 image cells can be megabytes long)."""
    if not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        rows = list(reader)
        columns = list(reader.fieldnames or [])
    if "index" not in columns:
        raise DataError(f"{path}: no 'index' column")
    return columns, rows


def option_texts(row: dict) -> list[str]:
    """The non-empty option cells A, B, C, ... in order (upstream stops at the first NaN)."""
    texts = []
    for letter in LETTERS:
        value = (row.get(letter) or "").strip()
        if not value or value.lower() == "nan":
            break
        texts.append(value)
    return texts


def parse_letter(text: str, options: Sequence[str]) -> str | None:
    """The option letter an answer names, by the documented local rule, or None."""
    text = text.strip()
    letters = LETTERS[: len(options)]
    if text and text[0] in letters and (len(text) == 1 or text[1] in ". ):,"):
        return text[0]
    wanted = text.rstrip(".").strip().lower()
    for letter, option in zip(letters, options):
        if option.rstrip(".").strip().lower() == wanted:
            return letter
    return None


def right_letter(row: dict, answer: dict) -> str:
    """The letter under which this round's prompt showed the right option."""
    options = option_texts(row)
    index = LETTERS.index(row["answer"].strip())
    shown = answer.get("options")
    if isinstance(shown, list) and options[index] in shown:
        return LETTERS[shown.index(options[index])]
    return LETTERS[(index - int(answer.get("round_id", 0))) % len(options)]


def circular_accuracy(rows: list[dict], answers: list[dict]) -> dict:
    """Accuracy where a question is right only if all of its rounds are right."""
    by_index = {row["index"]: row for row in rows}
    verdicts: dict[str, list[bool]] = {}
    for answer in answers:
        row = by_index[str(answer["question_id"])]
        shown = answer.get("options") if isinstance(answer.get("options"), list) else option_texts(row)
        ok = parse_letter(str(answer["text"]), shown) == right_letter(row, answer)
        verdicts.setdefault(row["index"], []).append(ok)
    right = sum(all(v) for v in verdicts.values())
    return {"questions": len(verdicts), "rounds": sum(len(v) for v in verdicts.values()), "correct": right,
            "accuracy": right / len(verdicts) * 100 if verdicts else None}


def upload_table(columns: list[str], rows: list[dict], answers: list[dict]) -> tuple[list[str], list[list]]:
    prediction = {str(a["question_id"]): a["text"] for a in answers}  # last one wins
    kept = [c for c in columns if c not in DROPPED]
    kept.insert(min(6, len(kept)), "prediction")
    table = [[prediction.get(row["index"]) if c == "prediction" else row.get(c) for c in kept] for row in rows]
    return kept, table


def write_upload(columns: list[str], table: list[list], upload_dir: str | Path, experiment: str) -> tuple[Path, str]:
    """Write xlsx if openpyxl is importable, else TSV; returns (path, note)."""
    out = Path(upload_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import openpyxl  # optional: only the upload format needs it
    except ImportError:
        path = out / f"{experiment}.tsv"
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(columns)
            writer.writerows([["" if v is None else v for v in r] for r in table])
        return path, "openpyxl is not installed, so wrote TSV instead of xlsx; the server needs xlsx"
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(columns)
    for r in table:
        sheet.append([int(v) if c == "index" and str(v).isdigit() else v for c, v in zip(columns, r)])
    path = out / f"{experiment}.xlsx"
    book.save(path)
    return path, ""


def load_answers(path: Path, indices: set[str]) -> list[dict]:
    answers = []
    for line, row in iter_jsonl(path):
        where = f"{path}, line {line}"
        qid, text = field(row, "question_id", where), field(row, "text", where)
        if str(qid) not in indices:
            raise DataError(f"{where}: question_id {qid!r} is not an index of the annotation file")
        if not isinstance(text, str):
            raise DataError(f"{where}: 'text' must be a string")
        answers.append(row)
    return answers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotation-file", type=str, required=True, help="the MMBench TSV")
    parser.add_argument("--result-dir", type=str, required=True, help="folder with {experiment}.jsonl")
    parser.add_argument("--upload-dir", type=str, required=True, help="where {experiment}.xlsx goes")
    parser.add_argument("--experiment", type=str, required=True)


def score_from_args(args: argparse.Namespace) -> dict:
    columns, rows = read_tsv(args.annotation_file)
    answers = load_answers(Path(args.result_dir) / f"{args.experiment}.jsonl", {r["index"] for r in rows})
    path, note = write_upload(*upload_table(columns, rows, answers), args.upload_dir, args.experiment)
    metrics: dict = {"upload_file": str(path), "note": note, "answered": len({str(a["question_id"]) for a in answers}),
                     "total": len(rows)}
    if "answer" in columns:
        for i, row in enumerate(rows):
            if row.get("answer", "").strip() not in LETTERS[: len(option_texts(row))]:
                raise DataError(f"{args.annotation_file}, row {i + 2}: answer {row.get('answer')!r} is not an option")
        metrics["circular"] = circular_accuracy(rows, answers)
    return metrics


def headline(metrics: dict) -> tuple[str, float | None, float]:
    """The local circular accuracy where the TSV has answers (the official number comes from the server)."""
    circular = metrics.get("circular") or {}
    return "circular accuracy (local)", circular.get("accuracy"), 100.0


def format_metrics(metrics: dict) -> str:
    """Upstream prints nothing; this says what was written and the local accuracy if any."""
    out = [f"Wrote {metrics['upload_file']} ({metrics['answered']} of {metrics['total']} questions answered)"]
    if metrics["note"]:
        out.append(f"Note: {metrics['note']}")
    c = metrics.get("circular")
    if c and c["accuracy"] is not None:
        out.append(f"Local circular accuracy: {c['accuracy']:.2f}% ({c['correct']}/{c['questions']} questions, "
                   f"{c['rounds']} rounds; all rounds must be right)")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None, prog: str = "python -m llava.eval.convert_mmbench_for_submission") -> int:
    return run_scorer(sys.modules[__name__], argv, prog, "Write the MMBench upload file and a local accuracy.")


if __name__ == "__main__":
    raise SystemExit(main())
