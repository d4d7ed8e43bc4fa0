"""LLaVA-Bench (In-the-Wild, COCO), judged as upstream `eval_gpt_review_bench.py` + `summarize_gpt_review.py`.

    python -m llava.eval.eval_gpt_review_bench -q questions.jsonl -c context.jsonl \\
        -a answers_gpt4.jsonl answers.jsonl -o reviews/review_mymodel.jsonl --judge-url URL [--rule rule.json]

For each question a judge model (`llava.eval.judge`, any OpenAI-compatible endpoint; upstream
fixes `gpt-4-0314`) sees the image's `[Context]` captions, the `[Question]`, the reference answer as
`[Assistant 1]`, the model's as `[Assistant 2]` and the `[System]` rule `llava_bench_{category}`
(conv, detail, complex) of the rule file, with upstream's system message and temperature 0.2. It
scores both on the reply's first line ("s1 s2"). Per category and over `all`: relative score =
mean(s2)/mean(s1)*100, and both means x10 (upstream's printout: name, relative, reference, model).

The shipped `llava/eval/table/rule.json` is our own wording of the three rules, in upstream's
format and keys; pass upstream's `llava/eval/table/rule.json` with `--rule` for exact parity.

Upstream quirks kept: the context's `caption` list is joined with newlines (a plain string
caption is used as is, where upstream's join would put a newline between its characters); the
means are rounded to 3 decimals before the ratio, the printed numbers to 1; rows without
`category` count towards `all` only; `all` prints first, then the categories sorted.

Where we differ, on purpose:
- Parse: first line, commas to spaces, split on any whitespace (upstream splits on single spaces,
  so "8, 7" or a trailing space is unparseable there); exactly two finite numbers, else unparseable.
- A failed call (`"failed": true`, tuple [-1, -1]; upstream retries forever instead) is counted
  and left out of the means. An unparseable reply is kept as upstream does, tuple [-1, -1]
  averaged into the means (so a review file gives upstream's numbers), and counted apart
  (`unparseable`), so the printout says how many there were.
- `-i/--ignore` compares ids as text; upstream compares argparse's strings with the JSON's
  integer ids, so for LLaVA-Bench's integer ids it ignores nothing.
- Resume: rows are matched by `question_id`, not by position. A rerun first drops the failed and
  unparseable rows from the review file (rewritten whole, atomically) and asks the judge again
  for those and for every question without a row; rows with parsed scores are kept as they are,
  so delete the file to judge a new answer file. Upstream resumes by position and never retries.
- Answers are matched to questions by `question_id` (upstream pairs the three files line by
  line); a question without a reference or model answer, a category without a rule or an image
  without context stops the run before the first judge call. A model answer without
  `answer_id` is recorded with its question id (upstream requires `answer_id` there).
- A zero reference mean gives relative None (upstream: ZeroDivisionError).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from llava.errors import DataError, InputError
from llava.eval.judge import (
    Judge,
    JudgeCallFailed,
    add_judge_arguments,
    judge_all,
    judge_from_args,
)
from llava.eval.scoring.command import run_scorer
from llava.eval.scoring.files import field, iter_jsonl, read_json

NAME = "llava_bench"
NEEDS_JUDGE = True
DEFAULT_RULE = Path(__file__).resolve().parents[1] / "table" / "rule.json"
DEFAULT_MODEL = "gpt-4-0314"
SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
TEMPERATURE = 0.2
SUMMARY_PREFIXES = ("gpt4_text", "reviews_", "review_")


def parse_score(review: str) -> list[float] | None:
    """[s1, s2] from the first line of a review, or None when it does not hold exactly two numbers."""
    words = review.split("\n")[0].replace(",", " ").split()
    if len(words) != 2:
        return None
    try:
        scores = [float(w) for w in words]
    except ValueError:
        return None
    return scores if all(math.isfinite(s) for s in scores) else None


def review_content(caption: str, question: str, answer1: str, answer2: str, rule: dict) -> str:
    """The judge's user message, laid out exactly as upstream."""
    role, prompt = rule["role"], rule["prompt"]
    return (f"[Context]\n{caption}\n\n[Question]\n{question}\n\n"
            f"[{role} 1]\n{answer1}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer2}\n\n[End of {role} 2]\n\n[System]\n{prompt}\n\n")


def _answers(path: str, what: str) -> dict[str, dict]:
    out = {}
    for line, row in iter_jsonl(path, what):
        where = f"{what} {path}, line {line}"
        out[str(field(row, "question_id", where))] = {"text": str(field(row, "text", where)),
                                                      "id": row.get("answer_id", row["question_id"])}
    return out


def _load_jobs(args: argparse.Namespace) -> list[dict]:
    """One job (question, texts, rule) per question; every input problem is found before any call."""
    rules = read_json(args.rule)
    if not isinstance(rules, dict):
        raise DataError(f"rule file {args.rule}: expected a JSON object of {{key: {{role, prompt}}}}")
    captions = {}
    for line, row in iter_jsonl(args.context, "context file"):
        where = f"context file {args.context}, line {line}"
        caption = field(row, "caption", where)
        captions[field(row, "image", where)] = "\n".join(caption) if isinstance(caption, list) else str(caption)
    reference, model = _answers(args.answer_list[0], "reference answers"), _answers(args.answer_list[1], "answers")
    jobs = []
    for line, q in iter_jsonl(args.question, "question file"):
        where = f"question file {args.question}, line {line}"
        qid, category = field(q, "question_id", where), f"llava_bench_{field(q, 'category', where)}"
        image = field(q, "image", where)
        for answers, name in ((reference, args.answer_list[0]), (model, args.answer_list[1])):
            if str(qid) not in answers:
                raise DataError(f"{name} has no answer for question_id {qid!r} ({where})")
        if image not in captions:
            raise DataError(f"{where}: image {image!r} has no row in context file {args.context}")
        rule = rules.get(category)
        if not isinstance(rule, dict) or "prompt" not in rule or "role" not in rule:
            raise DataError(f"{where}: rule file {args.rule} has no {{role, prompt}} entry {category!r}")
        if any(str(j["row"]["question_id"]) == str(qid) for j in jobs):
            raise DataError(f"{where}: question_id {qid!r} repeats")
        ref, ans = reference[str(qid)], model[str(qid)]
        jobs.append({"row": {"id": len(jobs) + 1, "question_id": qid, "answer1_id": ref["id"],
                             "answer2_id": ans["id"], "category": category},
                     "content": review_content(captions[image], str(field(q, "text", where)), ref["text"],
                                               ans["text"], rule)})
    if not jobs:
        raise DataError(f"question file {args.question} has no questions")
    return jobs


def _status(row: dict) -> str:
    """'ok', 'failed' or 'unparseable' for a review row (ours or upstream's)."""
    if row.get("failed"):
        return "failed"
    scores = row.get("tuple", row.get("score"))
    ok = (isinstance(scores, list) and len(scores) == 2 and scores != [-1, -1]
          and all(isinstance(s, (int, float)) and math.isfinite(s) for s in scores))
    return "ok" if ok else "unparseable"


def review_one(judge: Judge, job: dict) -> dict:
    """One review row: upstream's fields, or `failed` with the reason when the call never succeeded."""
    row = dict(job["row"])
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": job["content"]}]
    try:
        reply = judge.chat(messages, TEMPERATURE)
    except JudgeCallFailed as err:
        print(f"{NAME}: question {row['question_id']}: judge call failed: {err}", file=sys.stderr)
        return {**row, "content": None, "tuple": [-1, -1], "failed": True, "error": str(err)}
    scores = parse_score(reply)
    if scores is None:
        print(f"{NAME}: question {row['question_id']}: unparseable judge reply {reply[:80]!r}", file=sys.stderr)
    return {**row, "content": reply, "tuple": scores or [-1, -1]}


def _stats(pairs: list[list[float]]) -> dict:
    s1, s2 = (round(math.fsum(p[i] for p in pairs) / len(pairs), 3) for i in (0, 1))
    return {"relative": round(s2 / s1 * 100, 1) if s1 else None, "reference": round(s1 * 10, 1),
            "model": round(s2 * 10, 1), "n": len(pairs)}


def summarize(rows: Iterable[dict], name: str, ignore: Iterable[str] = ()) -> dict:
    """Per-category numbers as upstream prints them (unparseable rows in as -1 -1), failed rows left out."""
    ignore, groups, counts = set(ignore), {}, {"ok": 0, "failed": 0, "unparseable": 0}
    for row in rows:
        if str(row.get("question_id")) in ignore:
            continue
        status = _status(row)
        counts[status] += 1
        if status == "failed":
            continue
        pair = [float(s) for s in row.get("tuple", row.get("score"))] if status == "ok" else [-1.0, -1.0]
        groups.setdefault("all", []).append(pair)
        if "category" in row:
            groups.setdefault(str(row["category"]), []).append(pair)
    order = sorted(groups, key=lambda k: (k != "all", k))
    return {"name": name, "categories": {k: _stats(groups[k]) for k in order}, "reviewed": counts["ok"],
            "unparseable": counts["unparseable"], "failed": counts["failed"]}


def review_name(path: str | Path) -> str:
    """Upstream's label for a review file: its name without `gpt4_text_` and `.jsonl`."""
    return os.path.basename(str(path)).replace("gpt4_text_", "").replace(".jsonl", "")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--question", required=True, help="questions.jsonl (question_id, image, text, category)")
    parser.add_argument("-c", "--context", required=True, help="context.jsonl (image, caption)")
    parser.add_argument("-a", "--answer-list", nargs=2, required=True, metavar=("REFERENCE", "ANSWERS"),
                        help="reference answers (answers_gpt4.jsonl), then the model's answers")
    parser.add_argument("-r", "--rule", default=str(DEFAULT_RULE), help="rule.json (default: our shipped rules)")
    parser.add_argument("-o", "--output", required=True, help="review JSONL (appended; a rerun resumes)")
    add_judge_arguments(parser, DEFAULT_MODEL, default_max_tokens=1024, max_tokens_note="default 1024")


def score_from_args(args: argparse.Namespace) -> dict:
    judge = judge_from_args(args)
    items = [(str(job["row"]["question_id"]), job) for job in _load_jobs(args)]
    rows = judge_all(args.output, items, lambda r: _status(r) == "ok", lambda job: review_one(judge, job))
    return summarize(rows, review_name(args.output))


def format_metrics(metrics: dict) -> str:
    """Upstream's printout (name; `category relative reference model` lines; a rule), then our counts."""
    out = [metrics["name"]]
    for category, m in metrics["categories"].items():
        relative = "n/a" if m["relative"] is None else m["relative"]
        out.append(f"{category} {relative} {m['reference']} {m['model']}")
    out.append("=" * 33)
    if metrics["unparseable"]:
        out.append(f"unparseable judge replies: {metrics['unparseable']} (scored -1 -1 and averaged in, as upstream; "
                   "a rerun asks again)")
    if metrics["failed"]:
        out.append(f"failed judge calls: {metrics['failed']} (left out of the means; a rerun asks again)")
    return "\n".join(out)


def add_summary_arguments(parser: argparse.ArgumentParser) -> None:
    """`summarize_gpt_review.py`'s flags."""
    parser.add_argument("-d", "--dir", default=None, help="folder of review files (gpt4_text*, reviews_*, review_*)")
    parser.add_argument("-f", "--files", nargs="*", default=None, help="review files (under --dir when given)")
    parser.add_argument("-i", "--ignore", nargs="*", default=None, help="question ids to leave out")


def summary_from_args(args: argparse.Namespace) -> dict:
    """Every review file summarized, in sorted order, as upstream's loop does."""
    if args.files:
        names = list(args.files)
    elif args.dir:
        if not os.path.isdir(args.dir):
            raise InputError(f"--dir {args.dir}: no such directory")
        names = [x for x in os.listdir(args.dir) if x.endswith(".jsonl") and x.startswith(SUMMARY_PREFIXES)]
        if not names:
            raise InputError(f"--dir {args.dir}: no review files (*.jsonl named {', '.join(SUMMARY_PREFIXES)}...)")
    else:
        raise InputError("give review files with -f/--files or a folder of them with -d/--dir")
    ignore = [str(x) for x in args.ignore or []]
    files = []
    for name in sorted(names):
        path = os.path.join(args.dir, name) if args.dir else name
        files.append(summarize((row for _, row in iter_jsonl(path, "review file")), review_name(name), ignore))
    return {"files": files}


def format_summary(metrics: dict) -> str:
    return "\n".join(format_metrics(m) for m in metrics["files"])


def headline(metrics: dict) -> tuple[str, float | None, float]:
    """The paper's LLaVA-W number; 100 means "as good as the reference answers" (it can exceed 100)."""
    return "relative score (all)", metrics["categories"].get("all", {}).get("relative"), 100.0


def main(argv: Sequence[str] | None = None, prog: str = "python -m llava.eval.eval_gpt_review_bench") -> int:
    return run_scorer(sys.modules[__name__], argv, prog, "Judge LLaVA-Bench answers as upstream "
                      "eval_gpt_review_bench.py, then summarize as summarize_gpt_review.py.")


if __name__ == "__main__":
    raise SystemExit(main())
