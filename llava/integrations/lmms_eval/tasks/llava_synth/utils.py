"""The `llava_synth` task's functions, named by its YAML (`!function llava.integrations...utils.NAME`).

Scoring is `llava.eval.synth.score` itself, so lmms-eval's numbers are the ones
`python -m llava.eval.synth` prints for the same answers: `exact_match` is the overall
accuracy in percent (answers compared after `normalize_answer`), `acc_<category>` the
per-category accuracies, `exist_f1` POPE's F1 on the yes/no questions.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import PIL.Image

from llava.eval.synth import CATEGORIES, score

Doc = Mapping[str, Any]


def doc_to_visual(doc: Doc) -> list[PIL.Image.Image]:
    """The question's one image (`make-task` wrote its absolute path into the task's JSONL)."""
    with PIL.Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: Doc, lmms_eval_specific_kwargs: Mapping[str, str] | None = None) -> str:
    """The question as written (it already asks for a short answer); pre/post prompts per model if set."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['text']}{kwargs.get('post_prompt', '')}"


def process_results(doc: Doc, results: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The same record under every metric (aggregation scores all records at once with our scorer, each
    metric over all questions: lmms-eval counts a task's samples from one metric's records)."""
    record = {"question_id": doc["question_id"], "category": doc["category"], "answer": doc["answer"],
              "pred": results[0] if results else None}
    return {name: record for name in metric_names(CATEGORIES)}


def metric_names(categories: Sequence[str]) -> list[str]:
    """exact_match, then acc_<category> for each known category present, then exist_f1 when there are yes/no questions."""
    ordered = [c for c in CATEGORIES if c in categories]
    return ["exact_match"] + [f"acc_{c}" for c in ordered] + (["exist_f1"] if "exist" in categories else [])


def _score(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    questions = [{"question_id": r["question_id"], "category": r["category"], "answer": r["answer"]} for r in records]
    return score(questions, {r["question_id"]: r["pred"] for r in records})


def aggregate_exact_match(records: Sequence[Mapping[str, Any]]) -> float:
    return float(_score(records)["overall"])


def aggregate_exist_f1(records: Sequence[Mapping[str, Any]]) -> float:
    exist = _score(records).get("exist")
    return float(exist["f1"]) if exist else math.nan


def _category_aggregate(category: str) -> Callable[[Sequence[Mapping[str, Any]]], float]:
    def aggregate(records: Sequence[Mapping[str, Any]]) -> float:
        accuracy = _score(records)["accuracy"].get(category)
        return math.nan if accuracy is None else float(accuracy)  # nan: --limit left none of this category

    aggregate.__name__ = f"aggregate_acc_{category}"
    return aggregate


# One module-level function per category, so the YAML can name each.
aggregate_acc_color = _category_aggregate("color")
aggregate_acc_shape = _category_aggregate("shape")
aggregate_acc_count = _category_aggregate("count")
aggregate_acc_exist = _category_aggregate("exist")
aggregate_acc_position = _category_aggregate("position")
aggregate_acc_word = _category_aggregate("word")
aggregate_acc_mc = _category_aggregate("mc")
