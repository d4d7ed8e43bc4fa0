"""Score a model on the synthetic benchmark (`eval.jsonl` written by `llava.data.synth`).

    from llava.eval.synth import evaluate
    result = evaluate(llava.load("out/tiny"), "data/synth/eval.jsonl", "data/synth")
    blind = evaluate(pipe, ..., blank_images=True)     # grounding check: should fall to ~chance

or `python -m llava.eval.synth --model-path out/tiny --data data/synth [--blank-images]`.

Answers are compared after `normalize_answer` (VQA-style: case, punctuation, articles and
number words do not matter); per-category accuracies are percentages, and the existence
(yes/no) category also gets POPE's precision, recall, F1 and yes-ratio, with "yes" as the
positive class, as fractions. A question without an answer counts as wrong.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import string
import sys
from collections import Counter
from typing import Any, Mapping, Sequence

import PIL.Image

CATEGORIES = ("color", "shape", "count", "exist", "position", "word", "mc")
# What the shipped model must reach (the project's issue); accuracies in percent, F1 a fraction.
TARGETS: dict[str, float] = {"color": 95.0, "shape": 95.0, "count": 80.0, "exist": 90.0, "exist_f1": 0.9,
                             "position": 85.0, "word": 70.0, "mc": 90.0}

_NUMBERS = {w: str(i) for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven",
                                              "eight", "nine", "ten"))}
_ARTICLES = {"a", "an", "the"}
_SYNONYMS = {"grey": "gray", "colour": "color"}
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_MC_LEAD = re.compile(r"^[(\[]?([A-D])(?:$|[.):\]\s,])")
_MC_ONLY = re.compile(r"^[(\[]?([A-Da-d])[.):\]]?$")
_MC_PHRASE = re.compile(r"\b(?:answer is|option|choice)\s*:?\s*\(?([A-D])\b", re.IGNORECASE)

__all__ = ["normalize_answer", "score", "answer_sets", "chance_levels", "grounding_check", "evaluate", "check_targets",
           "format_report", "load_questions", "TARGETS", "CATEGORIES"]


def _first_line(text: str) -> str:
    for line in str(text).strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def normalize_answer(text: str | None, category: str | None = None) -> str:
    """Canonical form of an answer, for exact-match comparison with the ground truth.

    Always: first non-empty line, lowercase, punctuation and articles dropped, number words
    as digits ("Three." -> "3", "Yes." -> "yes"). `category="mc"`: the option letter, upper
    case, when the answer is or starts with one ("B", "B.", "(B) blue", "The answer is B").
    `category="exist"`: "yes"/"no" from the first word, else "no" when "no"/"not" occurs
    (POPE's rule). `category="count"`: the first number when there is one ("3 circles" -> "3").
    """
    line = _first_line(text or "")
    if category == "mc":
        for pattern in (_MC_LEAD, _MC_ONLY, _MC_PHRASE):
            m = pattern.search(line)
            if m:
                return m.group(1).upper()
    words = [_SYNONYMS.get(w, _NUMBERS.get(w, w)) for w in _PUNCT.sub(" ", line.lower()).split()]
    words = [w for w in words if w not in _ARTICLES]
    if category == "exist" and words:
        if words[0] in ("yes", "no"):
            return words[0]
        if "no" in words or "not" in words:
            return "no"
        if "yes" in words:
            return "yes"
    if category == "count":
        digits = [w for w in words if w.isdigit()]
        if digits:
            return digits[0]
    return " ".join(words)


def load_questions(path: str | os.PathLike) -> list[dict]:
    """The questions of an eval.jsonl file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _lookup(answers: Mapping[Any, str | None], qid: Any) -> str | None:
    """Answers keyed by int or str ids both work (JSON files turn ids into either)."""
    if qid in answers:
        return answers[qid]
    return answers.get(str(qid))


def _pct(num: float, den: float) -> float:
    return round(100.0 * num / den, 2) if den else 0.0


def score(questions: Sequence[Mapping[str, Any]], answers: Mapping[Any, str | None]) -> dict[str, Any]:
    """Accuracy per category and overall (percent), exist P/R/F1/yes-ratio, and missing answers.

    Returns {"overall", "n", "correct", "missing", "accuracy": {cat: percent}, "categories":
    {cat: {"accuracy", "n", "correct", "missing", "answered"}}, "answered": {cat: count},
    "answered_accuracy": {cat: percent or None}, "exist": {"accuracy", "precision", "recall",
    "f1", "yes_ratio"}} ("exist" only when there are existence questions). "answered" counts the
    answers among the category's answers in `questions` (`answer_sets`); the rest are declines
    or out-of-vocabulary words, which `grounding_check` tells apart from guesses.
    """
    per: dict[str, dict[str, int]] = {}
    vocab = answer_sets(questions)
    tp = fp = fn = said_yes = n_exist = 0
    for q in questions:
        cat = q["category"]
        stats = per.setdefault(cat, {"n": 0, "correct": 0, "missing": 0, "answered": 0})
        stats["n"] += 1
        raw = _lookup(answers, q["question_id"])
        if raw is None:
            stats["missing"] += 1
        truth = normalize_answer(q["answer"], cat)
        pred = normalize_answer(raw, cat) if raw is not None else None
        stats["correct"] += int(pred is not None and pred == truth)
        stats["answered"] += int(pred in vocab[cat])
        if cat == "exist":
            n_exist += 1
            positive, said = truth == "yes", pred == "yes"
            said_yes += said
            tp += positive and said
            fp += (not positive) and said
            fn += positive and not said
    n = sum(s["n"] for s in per.values())
    correct = sum(s["correct"] for s in per.values())
    ordered = sorted(per, key=lambda c: (CATEGORIES.index(c) if c in CATEGORIES else len(CATEGORIES), c))
    result: dict[str, Any] = {
        "overall": _pct(correct, n), "n": n, "correct": correct, "missing": sum(s["missing"] for s in per.values()),
        "accuracy": {c: _pct(per[c]["correct"], per[c]["n"]) for c in ordered},
        "categories": {c: {"accuracy": _pct(per[c]["correct"], per[c]["n"]), **per[c]} for c in ordered},
        "answered": {c: per[c]["answered"] for c in ordered},
        "answered_accuracy": {c: _pct(per[c]["correct"], per[c]["answered"]) if per[c]["answered"] else None
                              for c in ordered},
    }
    if n_exist:
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        result["exist"] = {"accuracy": result["categories"]["exist"]["accuracy"], "precision": round(precision, 4),
                           "recall": round(recall, 4), "f1": round(f1, 4), "yes_ratio": round(said_yes / n_exist, 4)}
    return result


def _true_answers(questions: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Each category's true answers, normalised, one per question."""
    answers: dict[str, list[str]] = {}
    for q in questions:
        answers.setdefault(q["category"], []).append(normalize_answer(q["answer"], q["category"]))
    return answers


def answer_sets(questions: Sequence[Mapping[str, Any]]) -> dict[str, set[str]]:
    """Each category's answers in this set of questions (normalised): what a blind guesser picks from."""
    return {cat: set(values) for cat, values in _true_answers(questions).items()}


def chance_levels(questions: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Accuracy (percent) a blind guesser gets per category: the better of guessing uniformly
    among the category's answers (`answer_sets`) and always giving its most common answer;
    "overall" is the question-weighted mean. A model fed blank images should score about this."""
    answers = _true_answers(questions)
    out: dict[str, float] = {}
    for cat, values in answers.items():
        counts = Counter(values)
        out[cat] = round(max(100.0 / len(counts), 100.0 * max(counts.values()) / len(values)), 2)
    total = sum(len(v) for v in answers.values())
    out["overall"] = round(sum(out[c] * len(v) for c, v in answers.items()) / total, 2) if total else 0.0
    return out


def check_targets(result: Mapping[str, Any], targets: Mapping[str, float] = TARGETS) -> dict[str, dict[str, Any]]:
    """{metric: {"value", "target", "ok"}} for every target; a missing category is not ok."""
    out = {}
    for key, target in targets.items():
        if key == "exist_f1":
            value = result.get("exist", {}).get("f1")
        else:
            value = result.get("categories", {}).get(key, {}).get("accuracy")
        out[key] = {"value": value, "target": target, "ok": value is not None and value >= target}
    return out


def grounding_check(blank: Mapping[str, Any], chance: Mapping[str, float], margin: float = 10.0,
                    min_answered: int = 10) -> dict[str, dict[str, Any]]:
    """The grounding check on a blank-image result (`score`'s, or `eval_results.json`'s "blank"):
    {category: {"accuracy", "answered", "answered_accuracy", "chance", "ok"}}.

    A model that looks at the picture cannot beat a blind guess without one; nor can it fall far
    below it by guessing, unless something in the question leaks the answer the other way. So among
    the answers it gives from the category's set, accuracy stays within `margin` points of chance.
    Answers outside that set ("No" to "left or right?" about a blank picture: there is nothing to
    place) are declines, not guesses, and do not count; a category with fewer than `min_answered`
    guesses has too few to show a prior, and passes.
    """
    out = {}
    for cat, accuracy in blank["accuracy"].items():
        answered, acc = blank["answered"][cat], blank["answered_accuracy"][cat]
        ok = answered < min_answered or abs(acc - chance[cat]) <= margin
        out[cat] = {"accuracy": accuracy, "answered": answered, "answered_accuracy": acc, "chance": chance[cat],
                    "ok": ok}
    return out


def _blank_like(path: str) -> PIL.Image.Image:
    with PIL.Image.open(path) as img:
        size = img.size
    return PIL.Image.new("RGB", size, (255, 255, 255))


def evaluate(pipe: Any, eval_file: str | os.PathLike, image_folder: str | os.PathLike, batch_size: int = 16,
             max_new_tokens: int = 8, blank_images: bool = False, answers_file: str | os.PathLike | None = None,
             model_id: str | None = None) -> dict[str, Any]:
    """Answer every question with `pipe.generate` (greedy, in batches) and score the answers.

    `blank_images=True` replaces each image with a white one of the same size: the grounding
    check (a model that really looks at images should drop to about `chance_levels`).
    `answers_file`: also write the answers as JSONL in the original's format.
    The result is `score(...)` plus "chance", "blank_images" and "model_id".
    """
    questions = load_questions(eval_file)
    model_id = model_id or str(getattr(pipe, "name", None) or "llava")
    answers: dict[Any, str] = {}
    rows = []
    for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        paths = [os.path.join(image_folder, q["image"]) for q in batch]
        images = [_blank_like(p) for p in paths] if blank_images else paths
        outputs = pipe.generate([q["text"] for q in batch], images=images, temperature=0,
                                max_new_tokens=max_new_tokens)
        if len(outputs) != len(batch):
            raise RuntimeError(f"pipe.generate returned {len(outputs)} answers for {len(batch)} prompts")
        for q, text in zip(batch, outputs):
            answers[q["question_id"]] = text
            answer_id = hashlib.sha256(f"{model_id}\0{q['question_id']}\0{text}".encode()).hexdigest()[:22]
            rows.append({"question_id": q["question_id"], "prompt": q["text"], "text": text,
                         "answer_id": answer_id, "model_id": model_id, "metadata": {}})
    if answers_file:
        os.makedirs(os.path.dirname(os.path.abspath(answers_file)), exist_ok=True)
        with open(answers_file, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    result = score(questions, answers)
    result.update(chance=chance_levels(questions), blank_images=blank_images, model_id=model_id)
    return result


def format_report(result: Mapping[str, Any]) -> str:
    """A small table: accuracy, chance and target per category, then exist's POPE metrics."""
    chance = result.get("chance", {})
    checks = check_targets(result)
    lines = [f"{'category':<10} {'n':>5} {'acc %':>7} {'chance':>7} {'target':>7}"]
    for cat, s in result["categories"].items():
        target = checks.get(cat, {}).get("target")
        mark = "" if target is None else (" ok" if checks[cat]["ok"] else " BELOW")
        lines.append(f"{cat:<10} {s['n']:>5} {s['accuracy']:>7.2f} {chance.get(cat, float('nan')):>7.2f} "
                     f"{'' if target is None else f'{target:.0f}':>7}{mark}")
    overall_chance = chance.get("overall", float("nan"))
    lines.append(f"{'overall':<10} {result['n']:>5} {result['overall']:>7.2f} {overall_chance:>7.2f}")
    if "exist" in result:
        e, f1 = result["exist"], checks["exist_f1"]
        lines.append(f"exist: precision {e['precision']:.3f} recall {e['recall']:.3f} f1 {e['f1']:.3f} "
                     f"(target {f1['target']}{' ok' if f1['ok'] else ' BELOW'}) yes-ratio {e['yes_ratio']:.3f}")
    if result.get("missing"):
        lines.append(f"missing answers: {result['missing']} (counted wrong)")
    if result.get("blank_images") and "answered" in result:
        checks = grounding_check(result, chance)
        lines.append("grounding check (accuracy among the answers from each category's set, within 10 of chance): "
                     + "; ".join(f"{c} {_guesses(g)}{'' if g['ok'] else ' OFF'}" for c, g in checks.items()))
    return "\n".join(lines)


def _guesses(check: Mapping[str, Any]) -> str:
    acc = check["answered_accuracy"]
    return f"{'-' if acc is None else f'{acc:.1f}'} of {check['answered']}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava.eval.synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default=None, help="checkpoint folder (default: the bundled model)")
    p.add_argument("--data", default=None, help="folder written by `llava data synth` (eval.jsonl + images)")
    p.add_argument("--eval-file", default=None, help="default: DATA/eval.jsonl")
    p.add_argument("--image-folder", default=None, help="default: DATA, or the eval file's folder")
    p.add_argument("--answers-file", default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--blank-images", action="store_true", help="grounding check: white images instead")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--require-targets", action="store_true", help="exit 1 unless every target is met")
    args = p.parse_args(argv)
    if not args.eval_file and not args.data:
        p.error("give --data or --eval-file")
    eval_file = args.eval_file or os.path.join(args.data, "eval.jsonl")
    image_folder = args.image_folder or args.data or os.path.dirname(os.path.abspath(eval_file))

    from llava.api import load

    pipe = load(args.model_path, device=args.device)
    result = evaluate(pipe, eval_file, image_folder, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      blank_images=args.blank_images, answers_file=args.answers_file)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    if args.require_targets and not all(c["ok"] for c in check_targets(result).values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
