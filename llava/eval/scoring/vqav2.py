"""VQAv2 test-dev submission file, as LLaVA's `scripts/convert_vqav2_for_submission.py` writes it.

    python -m llava.eval.convert_vqav2_for_submission --split llava_vqav2_mscoco_test-dev2015 --ckpt llava-v1.5-13b

Reads `{dir}/answers/{split}/{ckpt}/merge.jsonl` and the full question list
`{dir}/llava_vqav2_mscoco_test2015.jsonl`, and writes `{dir}/answers_upload/{split}/{ckpt}.json`:
`[{"question_id", "answer"}]` in question-list order with every answer EvalAI-normalised and ''
for a question with no answer (EvalAI wants every test2015 question). When an id repeats, the
last answer wins. Prints `total results: N, total split: M, error_line: K` as the original.
The accuracy itself comes from the EvalAI server.

Our additions (documented deviations):
- `--src`, `--test-split`, `--dst` override the three derived paths (then `--ckpt`/`--split`
  are only needed for the paths still derived);
- a malformed answers line raises a `DataError` naming file and line, where the original skips
  and counts it (so `error_line` is always 0 here);
- an answers file sharing no question id with the question list raises a `DataError`
  (the original would write an all-empty submission);
- `--annotation-file` (VQAv2 annotations, `{"annotations": [{"question_id", "answers": [10]}]}`
  or a plain list) adds a local accuracy over the listed questions that have annotations:
  EvalAI normaliser on both sides and the leave-one-out `min(1, matches/3)` of the official
  VQA metric. The server's normalisation differs in small details, so this is an estimate,
  printed as an extra `Accuracy:` line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from llava.errors import DataError, InputError
from llava.eval.scoring.command import run_scorer
from llava.eval.scoring.files import field, iter_jsonl, read_json
from llava.eval.scoring.vqa_normalize import (
    answer_strings,
    mean,
    normalize_answer,
    vqa_accuracy,
)

NAME = "vqav2"
PROG = "python -m llava.eval.convert_vqav2_for_submission"
DEFAULT_DIR = "./playground/data/eval/vqav2"


def read_answers(path: str | Path) -> dict[object, str]:
    """{question_id: text} from an answers JSONL (the last answer for a repeated id wins)."""
    out: dict[object, str] = {}
    for line, row in iter_jsonl(path):
        where = f"{path}, line {line}"
        text = field(row, "text", where)
        if not isinstance(text, str):
            raise DataError(f"{where}: field 'text' must be a string, not {type(text).__name__}")
        out[field(row, "question_id", where)] = text
    return out


def read_question_ids(path: str | Path) -> list[object]:
    return [field(row, "question_id", f"{path}, line {line}") for line, row in iter_jsonl(path)]


def load_vqa_annotations(path: str | Path) -> dict[object, list[str]]:
    """{question_id: human answers} from VQAv2-style annotations (also used for VizWiz-like lists)."""
    data = read_json(path)
    rows = data.get("annotations") if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected an 'annotations' list (VQAv2 annotations)")
    out: dict[object, list[str]] = {}
    for i, row in enumerate(rows):
        where = f"{path} annotations[{i}]"
        if not isinstance(row, dict) or "question_id" not in row:
            raise DataError(f"{where}: needs 'question_id' and 'answers'")
        out[row["question_id"]] = answer_strings(row.get("answers"), where)
    return out


def build_submission(answers: dict[object, str], question_ids: Sequence[object]) -> list[dict]:
    """One entry per listed question, in order: the normalised answer, or '' when missing."""
    return [{"question_id": qid, "answer": normalize_answer(answers[qid]) if qid in answers else ""}
            for qid in question_ids]


def local_accuracy(answers: dict[object, str], question_ids: Sequence[object],
                   annotations: dict[object, list[str]], annotation_file: str | Path) -> dict:
    """Mean VQA accuracy (percent) over listed questions with annotations; a missing answer scores ''."""
    scored = [vqa_accuracy(answers.get(qid, ""), annotations[qid]) for qid in question_ids if qid in annotations]
    if not scored:
        raise DataError(f"{annotation_file}: annotates none of the listed questions (another question set?)")
    return {"accuracy": 100.0 * mean(scored), "scored": len(scored)}


def resolve_paths(args: argparse.Namespace) -> tuple[str, str, str]:
    """(src, test split, dst): explicit flags, else the original's paths under --dir."""
    def derived(what: str) -> None:
        if not args.ckpt or not args.split:
            raise InputError(f"give --ckpt and --split (or --{what})")
    if args.src is None:
        derived("src")
    if args.dst is None:
        derived("dst")
    src = args.src or os.path.join(args.dir, "answers", args.split, args.ckpt, "merge.jsonl")
    test_split = args.test_split or os.path.join(args.dir, "llava_vqav2_mscoco_test2015.jsonl")
    dst = args.dst or os.path.join(args.dir, "answers_upload", args.split, f"{args.ckpt}.json")
    return src, test_split, dst


def convert(src: str | Path, test_split: str | Path, dst: str | Path,
            annotation_file: str | Path | None = None) -> dict:
    """Write the submission; return counts (and the local accuracy when annotations are given)."""
    answers = read_answers(src)
    question_ids = read_question_ids(test_split)
    if answers and not set(answers) & set(question_ids):
        raise DataError(f"{src}: none of its question ids is in {test_split} (answers for another question set?)")
    submission = build_submission(answers, question_ids)
    metrics: dict = {"total_results": len(answers), "total_split": len(question_ids), "error_line": 0,
                     "missing": sum(qid not in answers for qid in question_ids), "written": str(dst)}
    if annotation_file is not None:
        metrics.update(local_accuracy(answers, question_ids, load_vqa_annotations(annotation_file), annotation_file))
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", encoding="utf-8") as f:
        json.dump(submission, f)
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=str, default=DEFAULT_DIR)
    parser.add_argument("--ckpt", type=str)
    parser.add_argument("--split", type=str)
    parser.add_argument("--src", type=str, help="answers JSONL (default {dir}/answers/{split}/{ckpt}/merge.jsonl)")
    parser.add_argument("--test-split", type=str,
                        help="question JSONL (default {dir}/llava_vqav2_mscoco_test2015.jsonl)")
    parser.add_argument("--dst", type=str, help="output JSON (default {dir}/answers_upload/{split}/{ckpt}.json)")
    parser.add_argument("--annotation-file", type=str, help="VQAv2 annotations for a local accuracy (our addition)")


def score_from_args(args: argparse.Namespace) -> dict:
    src, test_split, dst = resolve_paths(args)
    return convert(src, test_split, dst, args.annotation_file)


def headline(metrics: dict) -> tuple[str, float | None, float]:
    """VQA accuracy where --annotation-file gave local answers (the official number comes from EvalAI)."""
    return "VQA accuracy (local)", metrics.get("accuracy"), 100.0


def format_metrics(metrics: dict) -> str:
    line = (f"total results: {metrics['total_results']}, total split: {metrics['total_split']}, "
            f"error_line: {metrics['error_line']}")
    if "accuracy" in metrics:
        line += f"\nAccuracy: {metrics['accuracy']:.2f}% ({metrics['scored']} questions)"
    return line


def main(argv: Sequence[str] | None = None) -> int:
    return run_scorer(sys.modules[__name__], argv, PROG, "VQAv2 submission file (LLaVA's converter)")
