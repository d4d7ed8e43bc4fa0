"""GQA: LLaVA's `scripts/convert_gqa_for_eval.py` and the official GQA `eval.py` it feeds.

    python -m llava.eval.convert_gqa_for_eval --src merge.jsonl --dst testdev_balanced_predictions.json
    llava eval score gqa --tier testdev_balanced          # in the folder eval.py would run in

Conversion: `[{"questionId", "prediction"}]` with `prediction = text.rstrip('.').lower()` (every
trailing period goes, inner ones stay; no other normalisation); prints nothing, as upstream.

Scoring reproduces the GQA `eval.py` shipped in LLaVA's eval.zip (file names are templates
formatted with `--tier`, so `--tier testdev_balanced` reads `testdev_balanced_questions.json`
and `testdev_balanced_predictions.json`): over questions with `isBalanced`, exact string match
of prediction and answer gives accuracy, accuracy on binary (structural type other than `query`)
and open (`query`) questions, per structural and per semantic type, per number of reasoning
steps (semantic operations, not counting `exist`/`query: name`/`choose name` ones) and per
number of words; distribution = answer-histogram chi-square per global group / 100 (lower is
better); consistency (`--consistency`) = accuracy on the `entailed` questions of each correctly
answered question. Quirks kept: the per-type lines print raw type names (`attr`, `rel`), since
the original's `subMetrics` renaming tests a stale loop variable and never applies;
validity/plausibility count a prediction in `color`/`material`/`shape` as valid for questions
whose detailed type contains `Common`.

Scene graphs optional: grounding needs scene graphs and attention maps and is not implemented
(`--grounding` is refused). Validity and plausibility need the choices file: when it is absent
(as for testdev) they are omitted here, where the original prints them as 0.00%. The banner and
"Loading ..." lines the original prints are not repeated; the metrics block is printed as is.
A missing balanced prediction raises a `DataError` naming the question (the original raises).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from llava.console import run_command
from llava.errors import DataError, InputError
from llava.eval.scoring.command import run_scorer
from llava.eval.scoring.files import field, iter_jsonl, read_json
from llava.eval.scoring.vqa_normalize import mean

NAME = "gqa"
PROG = "llava eval score gqa"
CONVERT_PROG = "python -m llava.eval.convert_gqa_for_eval"
NOT_STEPS = ("exist", "query: name", "choose name")
DETAILED = (("accuracyPerStructuralType", "Accuracy / structural type"),
            ("accuracyPerSemanticType", "Accuracy / semantic type"),
            ("accuracyPerSteps", "Accuracy / steps number"),
            ("accuracyPerLength", "Accuracy / words number"))


# ---- conversion (convert_gqa_for_eval.py) -------------------------------------------------------

def convert_answers(src: str | Path) -> list[dict]:
    """Answers JSONL -> `[{"questionId", "prediction"}]`, prediction = text.rstrip('.').lower()."""
    out = []
    for line, row in iter_jsonl(src):
        where = f"{src}, line {line}"
        text = field(row, "text", where)
        if not isinstance(text, str):
            raise DataError(f"{where}: field 'text' must be a string, not {type(text).__name__}")
        out.append({"questionId": field(row, "question_id", where), "prediction": text.rstrip(".").lower()})
    return out


def convert(src: str | Path, dst: str | Path) -> list[dict]:
    predictions = convert_answers(src)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w", encoding="utf-8") as f:
        json.dump(predictions, f)
    return predictions


def convert_main(argv: Sequence[str] | None = None) -> int:
    """`convert_gqa_for_eval.py --src --dst`; silent on success, as upstream."""
    parser = argparse.ArgumentParser(prog=CONVERT_PROG, description="GQA predictions file (LLaVA's converter)")
    parser.add_argument("--src", type=str, required=True)
    parser.add_argument("--dst", type=str, required=True)
    args = parser.parse_args(argv)

    def command() -> int:
        convert(args.src, args.dst)
        return 0

    return run_command(CONVERT_PROG, command)


# ---- scoring (GQA eval.py) ----------------------------------------------------------------------

def steps_num(question: dict) -> int:
    return len([op for op in question.get("semantic", [])
                if not any(o in f"{op['operation']}: {op['argument']}" for o in NOT_STEPS)])


def belongs(prediction: str, group: list[str], question: dict) -> bool:
    if "Common" in question["types"]["detailed"]:
        group = ["color", "material", "shape"]
    return prediction in group


def chi_square(gold: dict, predicted: dict) -> float | None:
    """Chi-square of predicted vs gold answer counts per group, weighted by group size."""
    total_score, total = 0.0, 0
    for group, answers in gold.items():
        score = sum((predicted[group].get(ans, 0) - e) ** 2 / e for ans, e in answers.items())
        overall = sum(answers.values())
        total_score += score * overall
        total += overall
    return total_score / total if total else None


def _predictions_dict(predictions: list, path: str | Path) -> dict:
    if not isinstance(predictions, list):
        raise DataError(f"{path}: expected a JSON list of {{'questionId', 'prediction'}}")
    out = {}
    for i, p in enumerate(predictions):
        if not isinstance(p, dict) or "questionId" not in p or "prediction" not in p:
            raise DataError(f"{path} item {i}: needs 'questionId' and 'prediction'")
        out[p["questionId"]] = p["prediction"]
    return out


def score(questions: dict, predictions: dict, choices: dict | None = None, consistency: bool = False,
          predictions_file: str | Path = "predictions", choices_file: str | Path = "choices") -> dict:
    """The official metrics over balanced questions (percentages; distribution is a chi-square/100)."""
    for qid, q in questions.items():
        if not isinstance(q, dict):
            raise DataError(f"question {qid}: not a JSON object (not a GQA questions file?)")
        if qid not in predictions and (consistency or q.get("isBalanced")):
            raise DataError(f"{predictions_file}: no prediction for question {qid} (answers for another "
                            "question set? every balanced question needs one)")
        if choices is not None and q.get("isBalanced") and not isinstance(choices.get(qid), dict):
            raise DataError(f"{choices_file}: no choices for question {qid} (choices for another question set?)")
    acc: list[float] = []
    by_answer_type: dict[str, list[float]] = {"binary": [], "open": []}
    valid: list[float] = []
    plausible: list[float] = []
    consistent: list[float] = []
    detailed: dict[str, dict] = {name: defaultdict(list) for name, _ in DETAILED}
    gold_dist: dict = defaultdict(lambda: defaultdict(int))
    pred_dist: dict = defaultdict(lambda: defaultdict(int))
    for qid, q in questions.items():
        if not q.get("isBalanced"):
            continue
        try:
            gold, predicted = q["answer"], predictions[qid]
            correct = float(predicted == gold)
            acc.append(correct)
            detailed["accuracyPerLength"][len(q["question"].split())].append(correct)
            detailed["accuracyPerSteps"][steps_num(q)].append(correct)
            detailed["accuracyPerStructuralType"][q["types"]["structural"]].append(correct)
            detailed["accuracyPerSemanticType"][q["types"]["semantic"]].append(correct)
            by_answer_type["open" if q["types"]["structural"] == "query" else "binary"].append(correct)
            if choices is not None:
                valid.append(float(belongs(predicted, choices[qid]["valid"], q)))
                plausible.append(float(belongs(predicted, choices[qid]["plausible"], q)))
            if q["groups"]["global"] is not None:
                gold_dist[q["groups"]["global"]][gold] += 1
                pred_dist[q["groups"]["global"]][predicted] += 1
            entailed = [eid for eid in q.get("entailed", []) if eid != qid]
            if consistency and correct and entailed:
                consistent.append(mean(float(predictions[e] == questions[e]["answer"]) for e in entailed))
        except (KeyError, TypeError) as err:
            raise DataError(f"question {qid}: missing or malformed field {err} "
                            "(not a GQA questions/choices file?)") from None
    if not acc:
        raise DataError("no balanced questions to score (not a GQA balanced questions file?)")
    metrics: dict = {"binary": 100 * mean(by_answer_type["binary"]), "open": 100 * mean(by_answer_type["open"]),
                     "accuracy": 100 * mean(acc), "questions": len(acc)}
    if consistency:
        metrics["consistency"] = 100 * mean(consistent)
    if choices is not None:
        metrics.update(validity=100 * mean(valid), plausibility=100 * mean(plausible))
    distribution = chi_square(gold_dist, pred_dist)
    if distribution is not None:
        metrics["distribution"] = distribution / 100
    for name, _ in DETAILED:
        metrics[name] = {str(k): {"accuracy": 100 * mean(v), "questions": len(v)}
                         for k, v in sorted(detailed[name].items())}
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tier", default="val", type=str, help="Tier, e.g. train, val, testdev_balanced")
    parser.add_argument("--scenes", default="{tier}_sceneGraphs.json", type=str, help="unused (grounding only)")
    parser.add_argument("--questions", default="{tier}_questions.json", type=str)
    parser.add_argument("--choices", default="{tier}_choices.json", type=str, help="optional")
    parser.add_argument("--predictions", default="{tier}_predictions.json", type=str)
    parser.add_argument("--attentions", default="{tier}_attentions.json", type=str, help="unused (grounding only)")
    parser.add_argument("--consistency", action="store_true")
    parser.add_argument("--grounding", action="store_true", help="not supported (needs scene graphs)")
    parser.add_argument("--objectFeatures", action="store_true", help="unused (grounding only)")
    parser.add_argument("--mapSize", default=7, type=int, help="unused (grounding only)")
    parser.add_argument("--src", type=str, default=None,
                        help="score an answers JSONL directly instead of --predictions (our addition)")


def score_from_args(args: argparse.Namespace) -> dict:
    if args.grounding:
        raise InputError("--grounding is not supported (it needs scene graphs and attention maps)")
    questions_file = args.questions.format(tier=args.tier)
    questions = read_json(questions_file)
    if not isinstance(questions, dict):
        raise DataError(f"{questions_file}: expected a JSON object of questions by id")
    if args.src is not None:
        predictions_file = args.src
        predictions = _predictions_dict(convert_answers(args.src), args.src)
    else:
        predictions_file = args.predictions.format(tier=args.tier)
        predictions = _predictions_dict(read_json(predictions_file), predictions_file)
    choices_file = Path(args.choices.format(tier=args.tier))
    choices = read_json(choices_file) if choices_file.is_file() else None
    if choices is not None and not isinstance(choices, dict):
        raise DataError(f"{choices_file}: expected a JSON object of choices by question id")
    return score(questions, predictions, choices, args.consistency, predictions_file, choices_file)


def headline(metrics: dict) -> tuple[str, float | None, float]:
    """GQA eval.py's accuracy (the paper's column)."""
    return "accuracy", metrics["accuracy"], 100.0


def format_metrics(metrics: dict) -> str:
    """The original's metrics block (its leading blank line, banners and loading lines left out)."""
    lines = []
    for name in ("binary", "open", "accuracy", "consistency", "validity", "plausibility", "distribution"):
        if name in metrics:
            suffix = " (lower is better)" if name == "distribution" else "%"
            lines.append(f"{name.capitalize()}: {metrics[name]:.2f}{suffix}")
    for name, title in DETAILED:
        lines += ["", f"{title}:"]
        lines += [f"  {t}: {v['accuracy']:.2f}% ({v['questions']} questions)" for t, v in metrics[name].items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return run_scorer(sys.modules[__name__], argv, PROG, "GQA metrics (the official eval.py)")
