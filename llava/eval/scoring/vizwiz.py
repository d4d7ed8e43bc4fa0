"""VizWiz submission file, as LLaVA's `scripts/convert_vizwiz_for_submission.py` writes it.

    python -m llava.eval.convert_vizwiz_for_submission --annotation-file llava_test.jsonl \
        --result-file merge.jsonl --result-upload-file answers_upload/llava-v1.5-13b.json

`--annotation-file` is LLaVA's VizWiz *question* JSONL (`question_id`, `image`). Writes
`[{"image", "answer"}]` in question order, each answer EvalAI-normalised; prints
`total results: N, total split: M, error_line: K` as the original. The accuracy itself comes
from the EvalAI server.

"Unanswerable": upstream does nothing special. The model is asked (in the prompt) to say
"Unanswerable", and its text goes through the normaliser like any other ("Unanswerable." ->
"unanswerable"); an empty answer stays '' (the brief's "empty becomes unanswerable" is not what
upstream does, so it is not done). Every question must have an answer: upstream asserts, this
raises a `DataError` naming the first question without one.

Our additions (documented): a malformed line raises a `DataError` naming file and line (upstream
skips and counts it, so `error_line` is always 0 here); when the question rows carry human
`answers` (10 per question, strings or `{"answer": ...}`, as VizWiz val annotations), a local
accuracy is computed with the leave-one-out VQA metric and printed as an extra `Accuracy:` line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from llava.errors import DataError
from llava.eval.scoring import vqav2
from llava.eval.scoring.command import run_scorer
from llava.eval.scoring.files import field, iter_jsonl
from llava.eval.scoring.vqa_normalize import (
    answer_strings,
    mean,
    normalize_answer,
    vqa_accuracy,
)
from llava.eval.scoring.vqav2 import read_answers

NAME = "vizwiz"
PROG = "python -m llava.eval.convert_vizwiz_for_submission"


def read_questions(path: str | Path) -> list[dict]:
    """[{"question_id", "image", "answers" (or None)}] from the question JSONL."""
    out = []
    for line, row in iter_jsonl(path):
        where = f"{path}, line {line}"
        answers = answer_strings(row["answers"], where) if "answers" in row else None
        out.append({"question_id": field(row, "question_id", where), "image": field(row, "image", where),
                    "answers": answers, "where": where})
    return out


def convert(annotation_file: str | Path, result_file: str | Path, result_upload_file: str | Path) -> dict:
    """Write the upload file; return counts (and the local accuracy where answers are known)."""
    answers = read_answers(result_file)
    questions = read_questions(annotation_file)
    for q in questions:
        if q["question_id"] not in answers:
            raise DataError(f"{result_file}: no answer for question_id {q['question_id']!r} of {q['where']} "
                            "(every question needs one; answers for another question set?)")
    upload = [{"image": q["image"], "answer": normalize_answer(answers[q["question_id"]])} for q in questions]
    metrics: dict = {"total_results": len(answers), "total_split": len(questions), "error_line": 0,
                     "written": str(result_upload_file)}
    known = [q for q in questions if q["answers"] is not None]
    if known:
        metrics["accuracy"] = 100.0 * mean(vqa_accuracy(answers[q["question_id"]], q["answers"]) for q in known)
        metrics["scored"] = len(known)
    Path(result_upload_file).parent.mkdir(parents=True, exist_ok=True)
    with open(result_upload_file, "w", encoding="utf-8") as f:
        json.dump(upload, f)
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotation-file", type=str, required=True)
    parser.add_argument("--result-file", type=str, required=True)
    parser.add_argument("--result-upload-file", type=str, required=True)


def score_from_args(args: argparse.Namespace) -> dict:
    return convert(args.annotation_file, args.result_file, args.result_upload_file)


def headline(metrics: dict) -> tuple[str, float | None, float]:
    """VQA accuracy where the annotation file has answers (the official number comes from EvalAI)."""
    return "VQA accuracy (local)", metrics.get("accuracy"), 100.0


def format_metrics(metrics: dict) -> str:
    """The same line as LLaVA's VQAv2 converter prints (both upstream scripts print it)."""
    return vqav2.format_metrics(metrics)


def main(argv: Sequence[str] | None = None) -> int:
    return run_scorer(sys.modules[__name__], argv, PROG, "VizWiz upload file (LLaVA's converter)")
