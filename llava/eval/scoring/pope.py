"""POPE, scored as upstream `llava/eval/eval_pope.py` does.

    python -m llava.eval.eval_pope --annotation-dir DIR --question-file llava_pope_test.jsonl --result-file merge.jsonl

For each `coco_pope_{category}.json` in the annotation dir (JSONL despite the name, one `label`
per line), the answers whose question has that `category` are paired with the labels BY
POSITION (upstream quirk: ids are not matched, so answers must keep the question file's order).

Parse rule (upstream, quirks kept): keep the text before the first `.`, drop commas, split on
single spaces; the answer is "no" if any word is exactly `No`, `not` or `no` (case-sensitive, so
`NO`, `No.`-less `Nope` or `no!` count as "yes"), else "yes". Positive = yes; label "no" is
negative and every other label positive.

Choices where upstream crashes or is silent (documented deviations):
- categories are scored in sorted file order (upstream: `os.listdir` order);
- files in the dir not named `coco_pope_*.json` are skipped (upstream asserts);
- an answer count different from the label count raises DataError (upstream `zip` truncates);
- precision/recall/F1 with a zero denominator are 0.0 (upstream: ZeroDivisionError);
- `average_f1` (mean F1 over categories; the paper's POPE number, unverified) is in the metrics
  but not printed, since upstream prints no average.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from llava.errors import DataError, InputError
from llava.eval.scoring.command import run_scorer
from llava.eval.scoring.files import field, iter_jsonl

NAME = "pope"
PREFIX, SUFFIX = "coco_pope_", ".json"


def parse_pope_answer(text: str) -> str:
    """'yes' or 'no' by upstream's rule (first sentence; case-sensitive No/not/no words)."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def score_pope(answers: Sequence[str], labels: Sequence[str]) -> dict:
    """Confusion counts and metrics for answer texts paired with labels by position."""
    if len(answers) != len(labels):
        raise DataError(f"{len(answers)} answers for {len(labels)} labels (POPE pairs them by position)")
    if not answers:
        raise DataError("no answers to score")
    preds = [parse_pope_answer(a) == "yes" for a in answers]
    gold = [label != "no" for label in labels]
    tp = sum(p and g for p, g in zip(preds, gold))
    fp = sum(p and not g for p, g in zip(preds, gold))
    tn = sum(not p and not g for p, g in zip(preds, gold))
    fn = sum(not p and g for p, g in zip(preds, gold))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "samples": len(answers), "TP": tp, "FP": fp, "TN": tn, "FN": fn,
        "accuracy": (tp + tn) / (tp + tn + fp + fn), "precision": precision, "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall), "yes_ratio": sum(preds) / len(preds),
    }


def score_pope_files(annotation_dir: str | Path, question_file: str | Path, result_file: str | Path) -> dict:
    """Per-category metrics over the annotation dir, as upstream's `__main__`."""
    annotation_dir = Path(annotation_dir)
    if not annotation_dir.is_dir():
        raise InputError(f"--annotation-dir {annotation_dir}: no such directory")
    category_of = {}
    for line, q in iter_jsonl(question_file):
        where = f"{question_file}, line {line}"
        category_of[field(q, "question_id", where)] = field(q, "category", where)
    by_category: dict[str, list[str]] = {}
    for line, a in iter_jsonl(result_file):
        where = f"{result_file}, line {line}"
        qid = field(a, "question_id", where)
        if qid not in category_of:
            raise DataError(f"{where}: question_id {qid!r} is not in {question_file}")
        by_category.setdefault(category_of[qid], []).append(str(field(a, "text", where)))
    files = sorted(p for p in annotation_dir.iterdir() if p.name.startswith(PREFIX) and p.name.endswith(SUFFIX))
    if not files:
        raise InputError(f"--annotation-dir {annotation_dir}: no {PREFIX}*{SUFFIX} files")
    categories = {}
    for path in files:
        category = path.name[len(PREFIX):-len(SUFFIX)]
        labels = [str(field(row, "label", f"{path}, line {n}")) for n, row in iter_jsonl(path)]
        try:
            categories[category] = score_pope(by_category.get(category, []), labels)
        except DataError as err:
            raise DataError(f"category {category!r} ({path.name}): {err}") from None
    f1s = [m["f1"] for m in categories.values()]
    return {"categories": categories, "average_f1": sum(f1s) / len(f1s)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotation-dir", type=str, required=True, help="folder of coco_pope_{category}.json")
    parser.add_argument("--question-file", type=str, required=True, help="llava_pope_test.jsonl (with category)")
    parser.add_argument("--result-file", type=str, required=True, help="answers JSONL")


def score_from_args(args: argparse.Namespace) -> dict:
    return score_pope_files(args.annotation_dir, args.question_file, args.result_file)


def headline(metrics: dict) -> tuple[str, float | None, float]:
    """The paper's POPE number: F1 (percent) averaged over the categories scored."""
    f1 = [m["f1"] for m in metrics["categories"].values()]
    return "F1, mean of categories", (100 * sum(f1) / len(f1) if f1 else None), 100.0


def format_metrics(metrics: dict) -> str:
    """Upstream's printout, category by category (floats with Python's repr, then a %.3f line)."""
    out = []
    for category, m in metrics["categories"].items():
        out += [
            f"Category: {category}, # samples: {m['samples']}",
            "TP\tFP\tTN\tFN\t",
            f"{m['TP']}\t{m['FP']}\t{m['TN']}\t{m['FN']}",
            f"Accuracy: {m['accuracy']}",
            f"Precision: {m['precision']}",
            f"Recall: {m['recall']}",
            f"F1 score: {m['f1']}",
            f"Yes ratio: {m['yes_ratio']}",
            ", ".join(f"{m[k]:.3f}" for k in ("f1", "accuracy", "precision", "recall", "yes_ratio")),
            "====================================",
        ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None, prog: str = "python -m llava.eval.eval_pope") -> int:
    return run_scorer(sys.modules[__name__], argv, prog, "Score POPE answers as upstream eval_pope.py.")


if __name__ == "__main__":
    raise SystemExit(main())
