"""SEED-Bench, scored as LLaVA's `scripts/convert_seed_for_submission.py` does.

    python -m llava.eval.convert_seed_for_submission --annotation-file SEED-Bench.json \
        --result-file merge.jsonl --result-upload-file upload.jsonl

Annotation: `{"question_type": {name: id}, "questions": [{question_id, question_type_id,
data_type ("image"|"video"), answer}, ...]}`. A question is right iff the answer text EQUALS the
answer letter (exact, case- and whitespace-sensitive: "A." and "a" are wrong); a missing answer
is wrong. Printed: accuracy per question type (sorted by type id, named by the annotation), total,
then image and video accuracy. The upload file has one `{"question_id", "prediction"}` line per
annotation question, in annotation order, with the raw answer text.

Choices (documented): answers are found by the question_id as written OR its int form (upstream
looks up only `int(id)` when the id parses as an int, so a string "123" in the answers file would
silently count as missing); a type (image/video) with no questions is not printed and is None in
the metrics (upstream: ZeroDivisionError); a question without an answer makes the upload raise
DataError naming it (upstream: KeyError) after the accuracy is computed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from llava.errors import DataError
from llava.eval.scoring.command import run_scorer
from llava.eval.scoring.files import field, iter_jsonl, read_json

NAME = "seed"


def _key(qid: object) -> object:
    try:
        return int(qid)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return qid


def _lookup(results: dict, qid: object) -> dict | None:
    return results.get(qid, results.get(_key(qid)))


def _accuracy(questions: list[dict], results: dict) -> tuple[dict, float | None]:
    counts: dict[object, list[int]] = {}
    for q in questions:
        row = _lookup(results, q["question_id"])
        tally = counts.setdefault(q["question_type_id"], [0, 0])
        tally[0] += row is not None and row.get("text") == q["answer"]
        tally[1] += 1
    per_type = {t: counts[t][0] / counts[t][1] * 100 for t in sorted(counts)}
    right, total = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    return per_type, (right / total * 100 if total else None)


def score_seed(annotation: dict, results: dict) -> dict:
    """Per-type, total, image and video accuracy (percent)."""
    names = {type_id: name for name, type_id in annotation.get("question_type", {}).items()}
    questions = annotation["questions"]
    for i, q in enumerate(questions):
        for key in ("question_id", "question_type_id", "answer", "data_type"):
            field(q, key, f"annotation question #{i}")
    per_type, total = _accuracy(questions, results)
    metrics: dict = {"per_type": {str(names.get(t, t)): acc for t, acc in per_type.items()}, "total": total}
    for data_type in ("image", "video"):
        metrics[data_type] = _accuracy([q for q in questions if q["data_type"] == data_type], results)[1]
    return metrics


def load_results(path: str | Path) -> dict:
    """{question_id: answer row}; later lines win, as upstream's dict."""
    results = {}
    for line, row in iter_jsonl(path):
        where = f"{path}, line {line}"
        field(row, "text", where)
        results[field(row, "question_id", where)] = row
    return results


def write_upload(annotation: dict, results: dict, path: str | Path) -> None:
    lines = []
    for q in annotation["questions"]:
        row = _lookup(results, q["question_id"])
        if row is None:
            raise DataError(f"no answer for SEED question_id {q['question_id']!r}; the upload needs every question")
        lines.append(json.dumps({"question_id": q["question_id"], "prediction": row["text"]}) + "\n")
    Path(path).write_text("".join(lines), encoding="utf-8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotation-file", type=str, required=True, help="SEED-Bench.json")
    parser.add_argument("--result-file", type=str, required=True, help="answers JSONL")
    parser.add_argument("--result-upload-file", type=str, default=None, help="JSONL to submit (optional here)")


def score_from_args(args: argparse.Namespace) -> dict:
    annotation = read_json(args.annotation_file)
    if not isinstance(annotation, dict) or not isinstance(annotation.get("questions"), list):
        raise DataError(f"{args.annotation_file}: expected an object with a 'questions' list")
    results = load_results(args.result_file)
    metrics = score_seed(annotation, results)
    if args.result_upload_file:
        write_upload(annotation, results, args.result_upload_file)
    return metrics


def headline(metrics: dict) -> tuple[str, float | None, float]:
    """Image accuracy (LLaVA-1.5's SEED column), else the total."""
    if metrics.get("image") is not None:
        return "image accuracy", metrics["image"], 100.0
    return "total accuracy", metrics["total"], 100.0


def format_metrics(metrics: dict) -> str:
    out = [f"{name}: {acc:.2f}%" for name, acc in metrics["per_type"].items()]
    if metrics["total"] is not None:
        out.append(f"Total accuracy: {metrics['total']:.2f}%")
    out += [f"{t} accuracy: {metrics[t]:.2f}%" for t in ("image", "video") if metrics[t] is not None]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None, prog: str = "python -m llava.eval.convert_seed_for_submission") -> int:
    return run_scorer(sys.modules[__name__], argv, prog, "Score SEED-Bench answers and write the upload file.")


if __name__ == "__main__":
    raise SystemExit(main())
