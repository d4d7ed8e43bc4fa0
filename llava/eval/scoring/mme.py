"""MME: LLaVA's `convert_answer_to_mme.py` plus the official MME `eval_tool/calculation.py`.

    cd playground/data/eval/MME
    python -m llava.eval.convert_mme --experiment llava-v1.5-13b      # convert, then score
    python -m llava.eval.scoring.mme --results_dir eval_tool/answers/llava-v1.5-13b   # score only

Conversion (upstream, paths relative to the working dir as upstream): answers
`answers/{experiment}.jsonl` -> `eval_tool/answers/{experiment}/{category}.txt`, one line per
answer in answer order: `image_file\tquestion\tground_truth\tprediction`. Category is the
question_id before the first `/`; the GT file is the question_id's last part up to its FIRST `.`
plus `.txt`. The question is the prompt minus "Answer the question using a single word or
phrase." (stripped), plus " Please answer yes or no." if absent, with a double space if that is
how the GT file spells it. Ground truth is read from `MME_Benchmark_release_version/{category}/`
(`questions_answers_YN/*.txt` when an `images/` folder exists), lines `question\tanswer`.

Calculation (official): each subtask file is read as consecutive line PAIRS, one pair per image
(so answers must keep the question file's order). Prediction parse, after lower-casing (the last
field keeps its newline, so the exact test rarely applies): "yes"/"no" exactly, else "yes" if its
first 4 chars contain "yes", else "no" if they contain "no" ("not sure" -> no, "nope" -> no),
else "other". acc = right/questions, acc+ = images with both right/images, score = 100*(acc+acc+);
Perception = sum over 10 subtasks, Cognition over 4.

Deviations (documented): tabs/newlines inside an answer are replaced by spaces (upstream writes
them and breaks the line pairs); a missing subtask file, an odd line count or a malformed line
raises DataError (upstream crashes, or prints and skips the line); an answer whose question is not
in the ground truth raises DataError naming the line (upstream: KeyError).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from llava.errors import DataError, InputError
from llava.eval.scoring.command import run_scorer
from llava.eval.scoring.files import field, iter_jsonl

NAME = "mme"
EVAL_TYPES = {
    "Perception": ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                   "artwork", "OCR"],
    "Cognition": ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"],
}
SHORT_SUFFIX = "Answer the question using a single word or phrase."
YES_NO = "Please answer yes or no."


def parse_mme_answer(pred: str) -> str:
    """'yes', 'no' or 'other' by the official rule (input already lower-cased)."""
    if pred in ("yes", "no"):
        return pred
    prefix = pred[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def read_ground_truth(data_path: str | Path) -> dict[tuple[str, str, str], str]:
    """{(category, gt file name, question): answer} from the MME release folder."""
    data_path = Path(data_path)
    if not data_path.is_dir():
        raise InputError(f"{data_path}: no such directory (the MME release folder)")
    gt = {}
    for category_dir in sorted(p for p in data_path.iterdir() if p.is_dir()):
        qa_dir = category_dir / "questions_answers_YN" if (category_dir / "images").exists() else category_dir
        for txt in sorted(qa_dir.glob("*.txt")):
            for number, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                parts = line.strip().split("\t")
                if len(parts) != 2:
                    raise DataError(f"{txt}, line {number}: expected 'question<TAB>answer'")
                gt[(category_dir.name, txt.name, parts[0])] = parts[1]
    return gt


def convert_answers(answers_file: str | Path, gt: dict, out_dir: str | Path) -> dict[str, int]:
    """Write one `{category}.txt` per category; returns {category: lines written}."""
    rows: dict[str, list[str]] = {}
    for line, answer in iter_jsonl(answers_file):
        where = f"{answers_file}, line {line}"
        qid, prompt = str(field(answer, "question_id", where)), str(field(answer, "prompt", where))
        text = " ".join(str(field(answer, "text", where)).replace("\t", " ").splitlines())
        category, file = qid.split("/")[0], qid.split("/")[-1].split(".")[0] + ".txt"
        if SHORT_SUFFIX in prompt:
            prompt = prompt.replace(SHORT_SUFFIX, "").strip()
        if YES_NO not in prompt:
            prompt = prompt + " " + YES_NO
            if (category, file, prompt) not in gt:
                prompt = prompt.replace(" " + YES_NO, "  " + YES_NO)
        if (category, file, prompt) not in gt:
            raise DataError(f"{where}: no ground truth for {category}/{file} question {prompt!r}")
        rows.setdefault(category, []).append("\t".join((file, prompt, gt[category, file, prompt], text)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for category, lines in rows.items():
        (out_dir / f"{category}.txt").write_text("".join(f"{x}\n" for x in lines), encoding="utf-8")
    return {category: len(lines) for category, lines in rows.items()}


def score_subtask(path: str | Path) -> dict:
    """acc, acc+, score and answer counts for one subtask file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file (every MME subtask needs one)")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if not lines or len(lines) % 2:
        raise DataError(f"{path}: {len(lines)} lines; MME needs two questions per image")
    right = both_right = other = 0
    for start in range(0, len(lines), 2):
        image_right = 0
        for number in (start + 1, start + 2):
            parts = lines[number - 1].split("\t")
            if len(parts) != 4 or parts[2].lower() not in ("yes", "no"):
                raise DataError(f"{path}, line {number}: expected 'image<TAB>question<TAB>yes|no<TAB>answer'")
            pred = parse_mme_answer(parts[3].lower())
            other += pred == "other"
            image_right += pred == parts[2].lower()
        right += image_right
        both_right += image_right == 2
    acc, acc_plus = right / len(lines), both_right / (len(lines) // 2)
    return {"questions": len(lines), "images": len(lines) // 2, "acc": acc, "acc_plus": acc_plus,
            "other_num": other, "score": 0 + acc * 100 + acc_plus * 100}


def score_results_dir(results_dir: str | Path) -> dict:
    """{eval type: {"total": score, "tasks": {task: subtask metrics}}}."""
    metrics = {}
    for eval_type, tasks in EVAL_TYPES.items():
        scored = {task: score_subtask(Path(results_dir) / f"{task}.txt") for task in tasks}
        total = 0
        for m in scored.values():
            total += m["score"]
        metrics[eval_type] = {"total": total, "tasks": scored}
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", type=str, default=None,
                        help="convert answers/{experiment}.jsonl first, then score eval_tool/answers/{experiment}")
    parser.add_argument("--results_dir", type=str, default=None, help="folder of per-subtask txt files to score")
    parser.add_argument("--data-path", type=str, default="MME_Benchmark_release_version",
                        help="MME release folder with the ground truth (for --experiment)")
    parser.add_argument("--answers-dir", type=str, default="answers", help="where {experiment}.jsonl is")
    parser.add_argument("--output-dir", type=str, default="eval_tool/answers",
                        help="converted files go to OUTPUT_DIR/{experiment}")


def score_from_args(args: argparse.Namespace) -> dict:
    results_dir = args.results_dir
    if args.experiment:
        results_dir = results_dir or str(Path(args.output_dir) / args.experiment)
        convert_answers(Path(args.answers_dir) / f"{args.experiment}.jsonl", read_ground_truth(args.data_path),
                        results_dir)
    if not results_dir:
        raise InputError("give --experiment (convert and score) or --results_dir (score converted files)")
    return score_results_dir(results_dir)


def headline(metrics: dict) -> tuple[str, float | None, float]:
    """The paper's MME number: the perception total (10 subtasks, at most 2000)."""
    return "Perception", metrics["Perception"]["total"], 200.0 * len(metrics["Perception"]["tasks"])


def format_metrics(metrics: dict) -> str:
    """calculation.py's printout, byte for byte (its print() spacing included)."""
    out = []
    for eval_type, m in metrics.items():
        out.append(f"=========== {eval_type} ===========\n")
        out.append(f"total score: {m['total']} \n\n")
        out.extend(f"\t {task}  score: {t['score']}\n" for task, t in m["tasks"].items())
        out.append("\n\n")
    return "".join(out).rstrip("\n")


def main(argv: Sequence[str] | None = None, prog: str = "python -m llava.eval.scoring.mme") -> int:
    return run_scorer(sys.modules[__name__], argv, prog, "Convert answers to MME's format and score them.")


if __name__ == "__main__":
    raise SystemExit(main())
