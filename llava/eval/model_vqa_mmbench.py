"""`python -m llava.eval.model_vqa_mmbench`: MMBench answering as the original.

    python -m llava.eval.model_vqa_mmbench --question-file mmbench_dev_20230712.tsv \\
        --answers-file answers.jsonl --single-pred-prompt --temperature 0 --conv-mode vicuna_v1 [--all-rounds]

The TSV has `index, question, hint, A..D, image (base64), ...`. Prompt = `[hint\\n]question` then
one `X. option` line per option; `--single-pred-prompt` appends the letter instruction (Chinese
with `--lang cn`); `--all-rounds` asks once per rotation of the options (circular evaluation).
Answer rows add `round_id`, `options`, `option_char`; resume is keyed by (question_id, round_id).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import csv
import math
import os
import sys
from collections.abc import Sequence

from llava.console import exit_with
from llava.errors import DataError
from llava.eval.answering import Answerer, Item

ALL_OPTIONS = ["A", "B", "C", "D"]
SUFFIX = {"en": "Answer with the option's letter from the given choices directly.", "cn": "请直接回答选项字母。"}


def is_none(value: object) -> bool:
    """The original's test for an empty TSV cell (pandas reads those as NaN)."""
    if value is None or isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def _index(value: str) -> int | str:
    return int(value) if value.strip().lstrip("-").isdigit() else value


def read_mmbench(path: str, all_rounds: bool, single_pred_prompt: bool, lang: str) -> list[Item]:
    """MMBench TSV rows -> one item per round (one round unless --all-rounds)."""
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    items = []
    for line, row in enumerate(rows, 2):
        if not all(k in row for k in ("index", "question", "image")):
            raise DataError(f"question file {path}, line {line}: needs index, question and image columns")
        try:
            image = base64.b64decode(row["image"], validate=False)
        except (binascii.Error, ValueError):
            raise DataError(f"question file {path}, line {line}: image is not base64") from None
        qid = _index(row["index"])
        options = []
        for char in ALL_OPTIONS:
            if is_none(row.get(char)):
                break
            options.append(row[char])
        chars = ALL_OPTIONS[:len(options)]
        for round_id in range(len(options) if all_rounds else 1):
            question = row["question"] if is_none(row.get("hint")) else f"{row['hint']}\n{row['question']}"
            for char, option in zip(ALL_OPTIONS, options):
                question += f"\n{char}. {option}"
            query = f"{question}\n{SUFFIX[lang]}" if single_pred_prompt else question
            items.append(Item(key=(qid, round_id), query=query, image=image,
                              head={"question_id": qid, "round_id": round_id, "prompt": question},
                              tail={"options": options, "option_char": chars}, label=f"question {qid!r} round {round_id}"))
            options, chars = options[1:] + options[:1], chars[1:] + chars[:1]
    return items


def _add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all-rounds", action="store_true")
    p.add_argument("--single-pred-prompt", action="store_true")
    p.add_argument("--lang", type=str, default="en", choices=sorted(SUFFIX))


def _read_items(args: argparse.Namespace) -> list[Item]:
    return read_mmbench(os.path.expanduser(args.question_file), args.all_rounds, args.single_pred_prompt, args.lang)


ANSWERER = Answerer("python -m llava.eval.model_vqa_mmbench", max_new_tokens=1024, read_items=_read_items,
                    key_fields=("question_id", "round_id"), add_flags=_add_flags)


def main(argv: Sequence[str] | None = None) -> int:
    return ANSWERER.main(argv)


if __name__ == "__main__":
    exit_with(main())
