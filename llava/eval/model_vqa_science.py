"""`python -m llava.eval.model_vqa_science`: ScienceQA answering as the original (SQA-IMG).

    python -m llava.eval.model_vqa_science --question-file llava_test_CQM-A.json --image-folder test \\
        --answers-file answers.jsonl --single-pred-prompt --temperature 0 --conv-mode vicuna_v1

The question file is a JSON list of `{"id", "image"?, "conversations": [{"from": "human", "value"}, ...]}`.
As the original: the `<image>` tag is moved to the front (and kept in "prompt", which the scorer's
IMG-Accuracy relies on), `--single-pred-prompt` appends the letter instruction. Batched and
resumable like `llava.eval.answering`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from llava.console import exit_with
from llava.errors import DataError
from llava.eval.answering import IMAGE_TAG, Answerer, Item

LETTER_PROMPT = "Answer with the option's letter from the given choices directly."


def read_science(path: str, image_folder: str, single_pred_prompt: bool) -> list[Item]:
    """ScienceQA conversations -> items (question_id = "id")."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"question file {path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(rows, list):
        raise DataError(f"question file {path}: expected a JSON list of questions")
    items, seen = [], set()
    for i, row in enumerate(rows):
        try:
            qid, text = row["id"], row["conversations"][0]["value"]
        except (KeyError, IndexError, TypeError):
            raise DataError(f"question file {path}, entry {i}: needs \"id\" and \"conversations\"[0][\"value\"]") from None
        if qid in seen:
            raise DataError(f"question file {path}, entry {i}: id {qid!r} used twice")
        seen.add(qid)
        prompt = text.replace(IMAGE_TAG, "").strip()
        image = os.path.join(image_folder, row["image"]) if row.get("image") else None
        if image:
            prompt = f"{IMAGE_TAG}\n{prompt}"
        if single_pred_prompt:
            prompt = f"{prompt}\n{LETTER_PROMPT}"
        items.append(Item(key=(qid,), query=prompt, image=image, head={"question_id": qid, "prompt": prompt},
                          label=f"question {qid!r}"))
    return items


def _add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--single-pred-prompt", action="store_true")


def _read_items(args: argparse.Namespace) -> list[Item]:
    return read_science(os.path.expanduser(args.question_file), os.path.expanduser(args.image_folder),
                        args.single_pred_prompt)


ANSWERER = Answerer("python -m llava.eval.model_vqa_science", max_new_tokens=1024, read_items=_read_items,
                    add_flags=_add_flags)


def main(argv: Sequence[str] | None = None) -> int:
    return ANSWERER.main(argv)


if __name__ == "__main__":
    exit_with(main())
