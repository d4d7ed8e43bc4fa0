"""ScienceQA (SQA-IMG), scored as upstream `llava/eval/eval_science_qa.py` does.

    python -m llava.eval.eval_science_qa --base-dir DIR --result-file answers.jsonl \
        --output-file out.json --output-result result.json [--split test]

Problems are `problems.json` restricted to `pid_splits.json[split]`, in split order; answers are
matched by `question_id`. A missing answer counts as the text "FAILED" with prompt "Unknown" (so
wrong, and not multimodal). Letter extraction (upstream, quirks kept), first rule that applies:
1. the whole text is one of the options (A-E; no stripping, so "A " or "a" fail this rule);
2. len >= 3, first char an option and chars 1-2 are ". " ("B. dog");
3. `The answer is ([A-Z]).` found exactly once (the `.` matches ANY char, so the letter must be
   followed by something: "The answer is C." and "The answer is Cat" give C, a text ending in
   "The answer is C" fails; two matches fail);
4. otherwise "FAILED".
The letter's index must be below the number of choices, else the prediction is -1 (wrong).
IMG-Accuracy is over answers whose prompt contains `<image>`; 0 multimodal answers gives 0.0
(upstream: ZeroDivisionError). `--options` is `type=list` upstream (so `--options ABC` meant
['A','B','C']); here both `--options A B C` and `--options ABC` work.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from llava.errors import DataError, InputError
from llava.eval.scoring.command import run_scorer
from llava.eval.scoring.files import field, iter_jsonl, read_json

NAME = "science_qa"
OPTIONS = ["A", "B", "C", "D", "E"]
ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def extract_letter(text: str, options: Sequence[str] = OPTIONS) -> str:
    """The option letter upstream reads from a prediction, or "FAILED"."""
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def pred_index(letter: str, n_choices: int, options: Sequence[str] = OPTIONS) -> int:
    """Index of the letter among the first `n_choices` options, -1 if out of range or FAILED."""
    return list(options).index(letter) if letter in list(options)[:n_choices] else -1


def score_science_qa(problems: dict, split_ids: Sequence[str], predictions: dict,
                     options: Sequence[str] = OPTIONS) -> tuple[dict, dict, dict]:
    """(metrics, output-file results, output-result dict) as upstream builds them."""
    results: dict[str, list] = {"correct": [], "incorrect": []}
    sqa = {"acc": None, "correct": None, "count": None, "results": {}, "outputs": {}}
    for prob_id in split_ids:
        if prob_id not in problems:
            raise DataError(f"problems.json has no problem {prob_id!r} named by pid_splits.json")
        prob = problems[prob_id]
        where = f"problems.json, problem {prob_id}"
        choices, answer = field(prob, "choices", where), field(prob, "answer", where)
        pred = predictions.get(prob_id, {"text": "FAILED", "prompt": "Unknown"})
        text = pred["text"]
        letter = extract_letter(text, options)
        idx = pred_index(letter, len(choices), options)
        analysis = {
            "question_id": prob_id, "parsed_ans": letter, "ground_truth": options[answer],
            "question": pred["prompt"], "pred": text, "is_multimodal": "<image>" in pred["prompt"],
        }
        sqa["results"][prob_id] = idx
        sqa["outputs"][prob_id] = text
        results["correct" if idx == answer else "incorrect"].append(analysis)
    correct, total = len(results["correct"]), len(results["correct"]) + len(results["incorrect"])
    if not total:
        raise DataError("the split has no problems")
    img_correct = sum(a["is_multimodal"] for a in results["correct"])
    img_total = img_correct + sum(a["is_multimodal"] for a in results["incorrect"])
    sqa.update(acc=correct / total * 100, correct=correct, count=total)
    metrics = {"total": total, "correct": correct, "accuracy": correct / total * 100,
               "img_total": img_total, "img_correct": img_correct,
               "img_accuracy": img_correct / img_total * 100 if img_total else 0.0}
    return metrics, results, sqa


def _load_predictions(path: str | Path) -> dict:
    predictions = {}
    for line, row in iter_jsonl(path):
        where = f"{path}, line {line}"
        text, prompt = field(row, "text", where), field(row, "prompt", where)
        if not isinstance(text, str) or not isinstance(prompt, str):
            raise DataError(f"{where}: 'text' and 'prompt' must be strings")
        predictions[field(row, "question_id", where)] = row  # later lines win, as upstream's dict
    return predictions


def _options(values: Sequence[str]) -> list[str]:
    return list(values[0]) if len(values) == 1 and len(values[0]) > 1 else list(values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-dir", type=str, required=True, help="folder with problems.json and pid_splits.json")
    parser.add_argument("--result-file", type=str, required=True, help="answers JSONL")
    parser.add_argument("--output-file", type=str, default=None, help="JSON of correct/incorrect analyses")
    parser.add_argument("--output-result", type=str, default=None, help="JSON of acc, per-problem predictions")
    parser.add_argument("--split", type=str, default="test")
    parser.add_argument("--options", nargs="+", default=OPTIONS, help="option letters (A B C D E)")


def score_from_args(args: argparse.Namespace) -> dict:
    base = Path(args.base_dir)
    splits = read_json(base / "pid_splits.json")
    if args.split not in splits:
        raise InputError(f"--split {args.split!r}: not in {base / 'pid_splits.json'} (has {sorted(splits)})")
    metrics, results, sqa = score_science_qa(read_json(base / "problems.json"), splits[args.split],
                                             _load_predictions(args.result_file), _options(args.options))
    for path, data in ((args.output_file, results), (args.output_result, sqa)):
        if path:
            Path(path).write_text(json.dumps(data, indent=2), encoding="utf-8")
    return metrics


def headline(metrics: dict) -> tuple[str, float | None, float]:
    """SQA-IMG, the paper's column: accuracy on the questions with an image."""
    return "IMG-Accuracy", metrics["img_accuracy"], 100.0


def format_metrics(metrics: dict) -> str:
    return (f"Total: {metrics['total']}, Correct: {metrics['correct']}, Accuracy: {metrics['accuracy']:.2f}%, "
            f"IMG-Accuracy: {metrics['img_accuracy']:.2f}%")


def main(argv: Sequence[str] | None = None, prog: str = "python -m llava.eval.eval_science_qa") -> int:
    return run_scorer(sys.modules[__name__], argv, prog, "Score ScienceQA answers as upstream eval_science_qa.py.")


if __name__ == "__main__":
    raise SystemExit(main())
