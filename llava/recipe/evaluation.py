"""What the recipe measures of the model it trained: held-out scores for its card and `eval_results.json`.

Three sets: the recipe's own held-out questions (its world, its canonical wordings, another seed),
the same with blank images (the grounding check), and the out-of-style set
(`llava.eval.out_of_style`: pictures from an independent renderer, training and held-out wordings)
that says how the model does on pictures a user draws.
"""

from __future__ import annotations

import os
from typing import Any

from llava.train.checkpointing import write_json

OUT_OF_STYLE_SEED = 0  # one fixed set for every run: cards compare


def evaluate_model(model_dir: str, data_dir: str, batch_size: int = 32, device: str = "cpu",
                   out_of_style_dir: str | None = None) -> dict[str, Any]:
    """Held-out scores with real images and with blank ones (the grounding check), and on the
    out-of-style set (`llava.eval.out_of_style`) when its folder is given."""
    from llava.api import load
    from llava.eval.synth import evaluate

    pipe = load(model_dir, device=device)
    eval_file = os.path.join(data_dir, "eval.jsonl")
    real = evaluate(pipe, eval_file, data_dir, batch_size=batch_size, model_id="tiny-llava")
    blank = evaluate(pipe, eval_file, data_dir, batch_size=batch_size, blank_images=True, model_id="tiny-llava")
    metrics = {"real": real, "blank": blank}
    if out_of_style_dir:
        from llava.eval.out_of_style import evaluate_out_of_style

        metrics["out_of_style"] = evaluate_out_of_style(pipe, out_of_style_dir, batch_size=batch_size)
    return metrics


def eval_seed(seed: int) -> int:
    """The held-out set's seed: never the training seed."""
    return seed + 1


def _blank_results(blank: dict[str, Any]) -> dict[str, Any]:
    """What `llava.eval.synth.grounding_check` reads of a blank-image score."""
    return {key: blank[key] for key in ("accuracy", "overall", "answered", "answered_accuracy")}


def write_eval_results(model_dir: str, summary: dict[str, Any]) -> str:
    """`eval_results.json` beside the model: the card's numbers in a form tests re-check."""
    m = summary["metrics"]
    results = {"eval_seed": summary["eval_seed"], "eval_n": summary["spec"]["eval_n"],
               "eval_sha256": summary.get("eval_sha"),
               "real": {"accuracy": m["real"]["accuracy"], "overall": m["real"]["overall"],
                        "exist_f1": m["real"]["exist"]["f1"]},
               "blank": _blank_results(m["blank"]),
               "chance": m["real"]["chance"]}
    if "out_of_style" in m:
        oos = m["out_of_style"]
        results["out_of_style"] = {
            **summary.get("out_of_style_set", {}),
            **{part: {"accuracy": oos[part]["accuracy"], "overall": oos[part]["overall"],
                      "exist_f1": oos[part].get("exist", {}).get("f1")} for part in ("all", "train", "heldout")},
            "blank": {**_blank_results(oos["blank"]), "exist_f1": oos["blank"].get("exist", {}).get("f1")},
            "chance": oos["all"]["chance"]}
        if "count_detail" in oos:
            results["out_of_style"]["count_detail"] = oos["count_detail"]
        if "after_crop" in oos:
            crop = oos["after_crop"]
            results["out_of_style"]["after_crop"] = {"accuracy": crop["accuracy"], "overall": crop["overall"],
                                                     "share": crop["share"]}
    path = os.path.join(model_dir, "eval_results.json")
    write_json(path, results, indent=1)
    return path
