"""MM-Vet, graded by a judge model in the manner of the official `mm-vet_evaluator` (GPT-4 grader).

    llava eval score mm_vet --question-file llava-mm-vet.jsonl --result-file answers.jsonl \\
        --output grades.jsonl --judge-url URL [--judge-model gpt-4-0613]

Each answer is compared with the ground truth by a judge model (`llava.eval.judge`), which
completes a few-shot table row with a correctness score 0.0-1.0; the per-capability scores (rec,
ocr, know, gen, spat, math) and the total are mean x100 over the questions with that capability.
The prompt is our own wording in the official grader's spirit (a table of question, ground
truth, prediction, correctness; `<AND>`: every part must be there, `<OR>`: any one part is
enough); the numbers therefore track, but are not guaranteed to equal, the official ones.

Inputs: questions as JSONL (`question_id`, `text`, `answer` = ground truth, `capability` list;
`image` is not needed) or the official `mm-vet.json` ({"v1_<n>": {question, answer, capability}});
answers as JSONL (`question_id`, `text`, from `model_vqa`) or the submission JSON
({"v1_<question_id>": text}). Ids match with or without the `v1_` prefix.

Kept from the official grader: `<AND>`/`<OR>` get spaces around them; the judge gets one user
message, `max_tokens` 3 (`--max-tokens`); the reply's first space-separated word must be a
number in [0, 1] (we split on any whitespace, so "0.5\\nbecause" parses); a reply that is not
is asked again with a nudge, at temperatures 0, 0, 0.5, 1.0, 1.5, and after five such replies the
answer scores 0.0 (the official code then makes a sixth call whose reply it ignores; we don't).
Scores print to 1 decimal. One run (the official default; the paper averages 5).

Ours: such a 0.0 is marked `unparseable` in the grade row and counted in the metrics, and it is
final (a rerun keeps it, as the official grade file does). A call that fails after its HTTP
retries is marked `failed`, left out of the means and counted; a rerun of the same command
grades those again (rows are matched by question id, so delete the file to grade new answers).
A question without an answer stops the run before the first call (the official: KeyError).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from llava.errors import DataError
from llava.eval.judge import (
    Judge,
    JudgeCallFailed,
    add_judge_arguments,
    judge_all,
    judge_from_args,
)
from llava.eval.scoring.command import run_scorer
from llava.eval.scoring.files import field, iter_jsonl, read_json

NAME = "mm_vet"
NEEDS_JUDGE = True
DEFAULT_MODEL = "gpt-4-0613"
CAPABILITIES = ("rec", "ocr", "know", "gen", "spat", "math")
TEMPERATURES = (0.0, 0.0, 0.5, 1.0, 1.5)
NUDGE = "\nReply with the correctness score only, a number from 0.0 to 1.0: "

PROMPT = """Score how correct an AI model's prediction is, compared with the ground truth answer to a \
question about an image. In the ground truth, <AND> joins parts that must all appear in the prediction \
for it to be fully correct, and <OR> joins alternatives of which any one is enough. Give partial credit \
to a prediction that is partly right. The correctness is one of 0.0 (wrong), 0.1, 0.2, 0.3, 0.4, 0.5, \
0.6, 0.7, 0.8, 0.9 and 1.0 (fully correct). Fill in only the correctness of the last row.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
How many apples are on the plate? | 3 | There are three apples on the plate. | 1.0
Which two colours does the flag have? | red <AND> white | red | 0.5
Which two colours does the flag have? | red <AND> white | The flag is white and red. | 1.0
Which two colours does the flag have? | red <AND> white | blue and green | 0.0
What animal is on the sofa? | cat <OR> kitten | A small kitten. | 1.0
What is the total on the receipt? | 12.50 | $12.5 | 1.0
Why is the road sign funny? | The sign says "No fishing" but it stands in a desert, where there is no \
water to fish in. | The sign is in a desert. | 0.3
Why is the road sign funny? | The sign says "No fishing" but it stands in a desert, where there is no \
water to fish in. | It forbids fishing in a dry desert with no water anywhere, which is absurd. | 1.0
"""


def grading_prompt(question: str, truth: str, prediction: str) -> str:
    """The few-shot table with this sample as its last, open row."""
    truth = truth.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    return PROMPT + "\n" + " | ".join([question, truth, prediction, ""])


def parse_grade(reply: str) -> float | None:
    """The correctness in [0, 1] from the reply's first word, or None."""
    words = reply.split()
    try:
        score = float(words[0]) if words else math.nan
    except ValueError:
        return None
    return score if 0.0 <= score <= 1.0 else None  # NaN fails both comparisons


def _key(qid: object) -> str:
    text = str(qid)
    return text[3:] if text.startswith("v1_") else text


def load_questions(path: str) -> list[dict]:
    """{question_id, id (without `v1_`), question, answer, capability} per question, from our JSONL or mm-vet.json."""
    if str(path).endswith(".json"):
        data = read_json(path)
        if not isinstance(data, dict):
            raise DataError(f"question file {path}: expected the official {{\"v1_<n>\": {{...}}}} object")
        rows = [(f"{path}, entry {k}", {"question_id": k, **v} if isinstance(v, dict) else {})
                for k, v in data.items()]
        text_key = "question"
    else:
        rows = [(f"question file {path}, line {n}", row) for n, row in iter_jsonl(path, "question file")]
        text_key = "text"
    questions = []
    for where, row in rows:
        caps = field(row, "capability", where)
        if not isinstance(caps, list) or not caps:
            raise DataError(f"{where}: capability must be a non-empty list (e.g. [\"rec\", \"ocr\"])")
        qid = field(row, "question_id", where)
        questions.append({"question_id": qid, "id": _key(qid), "question": str(field(row, text_key, where)),
                          "answer": str(field(row, "answer", where)), "capability": [str(c) for c in caps]})
    if not questions:
        raise DataError(f"question file {path} has no questions")
    ids = [q["id"] for q in questions]
    if len(set(ids)) < len(ids):
        raise DataError(f"question file {path}: question_id {next(i for i in ids if ids.count(i) > 1)} repeats")
    return questions


def load_answers(path: str) -> dict[str, str]:
    """Model answers by question id, from answers JSONL or the {"v1_<qid>": text} submission file."""
    if str(path).endswith(".json"):
        data = read_json(path)
        if not isinstance(data, dict):
            raise DataError(f"result file {path}: expected a {{\"v1_<question_id>\": answer}} object")
        return {_key(k): str(v) for k, v in data.items()}
    answers = {}
    for n, row in iter_jsonl(path, "result file"):
        where = f"result file {path}, line {n}"
        answers[_key(field(row, "question_id", where))] = str(field(row, "text", where))
    return answers


def grade_one(judge: Judge, sample: dict) -> dict:
    """One grade row; up to five tries for a reply that parses, then 0.0 as the official grader."""
    row = {"question_id": sample["question_id"], "capability": sample["capability"], "answer": sample["answer"],
           "prediction": sample["prediction"]}
    prompt = grading_prompt(sample["question"], sample["answer"], sample["prediction"])
    replies = []
    for attempt, temperature in enumerate(TEMPERATURES):
        messages = [{"role": "user", "content": prompt + (NUDGE if attempt else "")}]
        try:
            reply = judge.chat(messages, temperature)
        except JudgeCallFailed as err:
            print(f"{NAME}: question {sample['question_id']}: judge call failed: {err}", file=sys.stderr)
            return {**row, "content": replies, "score": None, "failed": True, "error": str(err)}
        replies.append(reply)
        score = parse_grade(reply)
        if score is not None:
            return {**row, "content": replies, "score": score}
    print(f"{NAME}: question {sample['question_id']}: no score in {len(replies)} judge replies; scored 0.0", file=sys.stderr)
    return {**row, "content": replies, "score": 0.0, "unparseable": True}


def summarize(rows: Sequence[dict]) -> dict:
    """Mean x100 per capability, per capability combination and in total; failed rows left out."""
    graded = [r for r in rows if not r.get("failed")]
    groups: dict[str, list[float]] = {}
    combos: dict[str, list[float]] = {}
    order = {c: i for i, c in enumerate(CAPABILITIES)}
    for row in graded:
        caps = sorted(set(row["capability"]), key=lambda c: (order.get(c, len(order)), c))
        for cap in caps:
            groups.setdefault(cap, []).append(row["score"])
        combos.setdefault("_".join(caps), []).append(row["score"])

    def table(scores: dict[str, list[float]]) -> dict:
        return {k: {"score": math.fsum(v) / len(v) * 100, "n": len(v)} for k, v in scores.items()}

    caps = sorted(groups, key=lambda c: (order.get(c, len(order)), c))
    total = math.fsum(r["score"] for r in graded) / len(graded) * 100 if graded else None
    return {"capabilities": table({c: groups[c] for c in caps}), "total": total, "graded": len(graded),
            "combinations": table(dict(sorted(combos.items(), key=lambda kv: -len(kv[1])))),
            "unparseable": sum(bool(r.get("unparseable")) for r in graded), "failed": len(rows) - len(graded)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--question-file", required=True, help="MM-Vet questions JSONL (or the official mm-vet.json)")
    parser.add_argument("--result-file", required=True, help="answers JSONL (or {\"v1_<qid>\": text} JSON)")
    parser.add_argument("--output", required=True, help="grade JSONL (appended; a rerun resumes)")
    add_judge_arguments(parser, DEFAULT_MODEL, default_max_tokens=3, max_tokens_note="official: 3")


def score_from_args(args: argparse.Namespace) -> dict:
    judge = judge_from_args(args)
    questions, answers = load_questions(args.question_file), load_answers(args.result_file)
    missing = [q["id"] for q in questions if q["id"] not in answers]
    if missing:
        raise DataError(f"result file {args.result_file} has no answer for question_id {missing[0]}"
                        + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    items = [(str(q["question_id"]), {**q, "prediction": answers[q["id"]]}) for q in questions]
    rows = judge_all(args.output, items, lambda r: not r.get("failed"),
                     lambda sample: grade_one(judge, sample))
    return summarize(rows)


def format_metrics(metrics: dict) -> str:
    """One `name score n` line per capability, then total; the capability combinations below."""
    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1f}"

    out = [f"{'capability':<12}{'score':>7}{'n':>6}"]
    out += [f"{c:<12}{fmt(m['score']):>7}{m['n']:>6}" for c, m in metrics["capabilities"].items()]
    out.append(f"{'total':<12}{fmt(metrics['total']):>7}{metrics['graded']:>6}")
    out += ["", f"{'combination':<24}{'score':>7}{'n':>6}"]
    out += [f"{c:<24}{fmt(m['score']):>7}{m['n']:>6}" for c, m in metrics["combinations"].items()]
    if metrics["unparseable"]:
        out.append(f"unparseable judge replies: {metrics['unparseable']} (scored 0.0, as the official grader does)")
    if metrics["failed"]:
        out.append(f"failed judge calls: {metrics['failed']} (left out of the scores; a rerun grades them)")
    return "\n".join(out)


def headline(metrics: dict) -> tuple[str, float | None, float]:
    """MM-Vet's reported number: the total score, percent."""
    return "total", metrics["total"], 100.0


def main(argv: Sequence[str] | None = None, prog: str = "python -m llava.eval.scoring.mm_vet") -> int:
    return run_scorer(sys.modules[__name__], argv, prog, "Grade MM-Vet answers with a judge model.")


if __name__ == "__main__":
    raise SystemExit(main())
