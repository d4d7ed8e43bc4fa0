"""Write a `llava_synth` lmms-eval task (YAML + JSONL) for a folder written by `llava data synth`.

Why generated, not shipped: lmms-eval reads a local dataset from the path in the task's YAML,
and a task function only sees the document, not where it came from. So the task is written
next to the data: `NAME.jsonl` is the folder's `eval.jsonl` with each image's absolute path,
and `NAME.yaml` points at it and names the functions in `utils.py`. If the data folder
moves, write the task again (it takes a moment).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from llava.eval.synth import load_questions
from llava.integrations.lmms_eval.tasks.llava_synth.utils import metric_names

UTILS = "llava.integrations.lmms_eval.tasks.llava_synth.utils"
TASK_DIR = "lmms_eval_task"  # default output folder, inside the data folder
DEFAULT_NAME = "llava_synth"
DEFAULT_MAX_NEW_TOKENS = 8  # as `python -m llava.eval.synth`


def task_yaml(name: str, data_file: str, categories: list[str], max_new_tokens: int, source: str) -> str:
    """The task's YAML text (greedy, stopping only where the model's template stops, as our scorer does)."""
    metrics = "".join(f"  - metric: {m}\n    aggregation: !function {UTILS}.aggregate_{m}\n"
                      f"    higher_is_better: true\n" for m in metric_names(categories))
    return (f"# Written by `python -m llava.integrations.lmms_eval make-task` from {source}\n"
            f"# (image paths in {data_file} are absolute: rerun it if the data folder moves).\n"
            f"task: {name}\n"
            f"dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(data_file)}\n"
            f"test_split: test\n"
            f"output_type: generate_until\n"
            f"doc_to_visual: !function {UTILS}.doc_to_visual\n"
            f"doc_to_text: !function {UTILS}.doc_to_text\n"
            f"doc_to_target: answer\n"
            f"process_results: !function {UTILS}.process_results\n"
            f"generation_kwargs:\n  max_new_tokens: {int(max_new_tokens)}\n  temperature: 0\n  do_sample: false\n"
            f"  num_beams: 1\n  until: []\n"
            f"metric_list:\n{metrics}"
            f"lmms_eval_specific_kwargs:\n  default:\n    pre_prompt: \"\"\n    post_prompt: \"\"\n"
            f"metadata:\n  version: 1.0\n")


def write_task(data_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, name: str = DEFAULT_NAME,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, limit: int | None = None) -> Path:
    """Write `NAME.yaml` and `NAME.jsonl` into `out_dir` (default DATA/lmms_eval_task); returns the YAML's path.

    `limit`: only the first N questions (the eval set cycles through the categories, so any
    prefix of 7 or more has them all).
    """
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise ValueError(f"task name {name!r}: use letters, digits and underscores")
    data = Path(data_dir).resolve()
    eval_file = data / "eval.jsonl"
    if not eval_file.is_file():
        raise FileNotFoundError(f"{eval_file} not found; write the data first: llava data synth --out {data_dir} "
                                "--n 0 --eval-n 280 (or pass --generate N to make-task)")
    questions = load_questions(eval_file)[:limit]
    rows = []
    for q in questions:
        image = data / q["image"]
        if not image.is_file():
            raise FileNotFoundError(f"question {q['question_id']}: image {image} not found")
        rows.append({"question_id": q["question_id"], "image": str(image), "text": q["text"],
                     "answer": str(q["answer"]), "category": q["category"]})
    out = Path(out_dir).resolve() if out_dir else data / TASK_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    categories = sorted({r["category"] for r in rows})
    yaml_path = out / f"{name}.yaml"
    yaml_path.write_text(task_yaml(name, f"{name}.jsonl", categories, max_new_tokens, str(eval_file)),
                         encoding="utf-8")
    return yaml_path
