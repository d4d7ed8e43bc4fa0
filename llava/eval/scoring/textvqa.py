"""TextVQA accuracy, as LLaVA's `llava/eval/eval_textvqa.py` computes it.

    python -m llava.eval.eval_textvqa --annotation-file TextVQA_0.5.1_val.json --result-file answers.jsonl

Each answer line is matched to its annotation by `(question_id, question.lower())`: LLaVA's TextVQA
question file uses the TextVQA `image_id` as `question_id`, and the question is recovered from the
answer's `prompt` (`prompt_question`). The prediction and the 10 human answers are normalised by
the EvalAI processor and scored by the leave-one-out VQA accuracy (`vqa_normalize`). Prints, as the
original: the result file's stem, `Samples: N`, `Accuracy: X.XX%` and a blank line; `--result-dir`
scores every `*.jsonl` in a folder (sorted), printing `Skipping NAME` for other files.
Where the original would crash (KeyError, assert, division by zero) this raises a `DataError`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from llava.errors import DataError, InputError
from llava.eval.scoring.command import run_scorer
from llava.eval.scoring.files import field, iter_jsonl, read_json
from llava.eval.scoring.vqa_normalize import answer_strings, mean, vqa_accuracy

NAME = "textvqa"
PROG = "python -m llava.eval.eval_textvqa"
_OLD_STYLE = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def prompt_question(prompt: str) -> str | None:
    """The question inside an answer's prompt, lowercased; None where the original asserts.

    Three prompt shapes, tested in the original's order: `OCR tokens: ... Question: Q Short answer:`;
    three lines with `Reference OCR token: ` (the question is the other line, first or second);
    two lines (question + suffix).
    """
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = _OLD_STYLE.search(prompt)
        question = match.group(1) if match else None
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        question = None
    return None if question is None else question.lower()


def text_field(row: dict, key: str, where: str) -> str:
    """A string field, or a `DataError` naming the file and line."""
    value = field(row, key, where)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, not {type(value).__name__}")
    return value


def load_annotations(path: str | Path) -> dict[tuple[object, str], list[str]]:
    """`TextVQA_0.5.1_val.json` as {(image_id, question.lower()): its 10 answers}."""
    data = read_json(path)
    rows = data.get("data") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON object with a 'data' list (TextVQA annotations)")
    out: dict[tuple[object, str], list[str]] = {}
    for i, row in enumerate(rows):
        where = f"{path} data[{i}]"
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or "image_id" not in row:
            raise DataError(f"{where}: needs 'image_id' and a 'question' string")
        out[(row["image_id"], row["question"].lower())] = answer_strings(row.get("answers"), where)
    return out


def score_file(annotations: dict[tuple[object, str], list[str]], result_file: str | Path) -> dict:
    """{"experiment", "samples", "accuracy" (percent)} for one answers JSONL."""
    scores = []
    for line, row in iter_jsonl(result_file):
        where = f"{result_file}, line {line}"
        question = prompt_question(text_field(row, "prompt", where))
        if question is None:
            raise DataError(f"{where}: cannot find the question in the prompt (not a TextVQA prompt)")
        key = (field(row, "question_id", where), question)
        if key not in annotations:
            raise DataError(f"{where}: no annotation for question_id {key[0]!r} and question {question!r} "
                            "(answers for another question set?)")
        gt = annotations[key]
        if len(gt) != 10:  # the original asserts exactly 10 human answers
            raise DataError(f"{where}: its annotation has {len(gt)} answers, TextVQA has 10")
        scores.append(vqa_accuracy(text_field(row, "text", where), gt))
    if not scores:
        raise DataError(f"{result_file}: no answers")
    return {"experiment": os.path.splitext(os.path.basename(str(result_file)))[0],
            "samples": len(scores), "accuracy": 100.0 * mean(scores)}


def score(annotation_file: str | Path, result_file: str | Path | None = None,
          result_dir: str | Path | None = None) -> dict:
    """Score one file and/or every `*.jsonl` in a folder: {"runs": [...], "skipped": [...]}."""
    if result_file is None and result_dir is None:
        raise InputError("give --result-file or --result-dir")
    annotations = load_annotations(annotation_file)
    runs, skipped = [], []
    if result_file is not None:
        runs.append({**score_file(annotations, result_file), "file": os.path.basename(str(result_file))})
    if result_dir is not None:
        if not Path(result_dir).is_dir():
            raise InputError(f"{result_dir}: no such folder")
        for name in sorted(os.listdir(result_dir)):
            if name.endswith(".jsonl"):
                runs.append({**score_file(annotations, Path(result_dir) / name), "file": name, "in_dir": True})
            else:
                skipped.append(name)
    metrics: dict = {"runs": runs, "skipped": skipped}
    if runs:
        metrics.update(samples=runs[0]["samples"], accuracy=runs[0]["accuracy"])
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotation-file", type=str, required=True)
    parser.add_argument("--result-file", type=str)
    parser.add_argument("--result-dir", type=str)


def score_from_args(args: argparse.Namespace) -> dict:
    return score(args.annotation_file, args.result_file, args.result_dir)


def headline(metrics: dict) -> tuple[str, float | None, float]:
    """Accuracy of the --result-file run (or of the first file of --result-dir)."""
    runs = metrics["runs"]
    return "accuracy", (runs[0]["accuracy"] if runs else None), 100.0


def format_metrics(metrics: dict) -> str:
    """The original's output: the --result-file run, then the folder's files in name order."""
    lines: list[str] = []
    runs = metrics["runs"]
    folder = sorted([(r["file"], r) for r in runs if r.get("in_dir")]
                    + [(name, None) for name in metrics.get("skipped", [])], key=lambda item: item[0])
    for name, run in [(r.get("file", ""), r) for r in runs if not r.get("in_dir")] + folder:
        if run is None:
            lines.append(f"Skipping {name}")
        else:
            lines += [run["experiment"], f"Samples: {run['samples']}", f"Accuracy: {run['accuracy']:.2f}%", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return run_scorer(sys.modules[__name__], argv, PROG, "TextVQA accuracy (LLaVA's eval_textvqa.py)")
