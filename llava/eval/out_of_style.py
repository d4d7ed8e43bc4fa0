"""Out-of-style held-out evaluation: pictures and wordings the model never trained on.

A user's first pictures are not drawn by the training renderer (`llava.data.synth_scene`:
96x96 PIL polygons with a dark outline in seven fixed colours), and users word questions
their own way. This set is drawn by an independent renderer (`llava.eval.drawn`: numpy
signed distances, other shades, sizes, canvases, outlines, backgrounds, JPEG/PNG) and asks
every question twice, each time about its own picture: once worded like training
("train", a wording of the varied world's `synth_phrasing.VARIED_TEMPLATES`, which include
the classic world's) and once in wordings training never uses
("heldout", `synth_phrasing.HELDOUT_TEMPLATES`, removed from every training pool), so a drop can be told apart: style of the pictures
(train wording) or style of the questions (heldout minus train). Blank images give the
grounding check (answers should fall to chance).

    python -m llava.eval.out_of_style [--model-path P] [--data DIR] [--seed 0] [--per-cell 40]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import string
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from llava.data.synth_phrasing import HELDOUT_TEMPLATES, VARIED_TEMPLATES
from llava.data.synth_scene import PLURALS
from llava.data.synth_text import SHORT_SUFFIX
from llava.eval.drawn import COLOR_NAMES, SHAPE_NAMES, Drawing, encode, sample_drawing
from llava.eval.synth import chance_levels, check_targets, evaluate, load_questions, score

CATEGORIES: tuple[str, ...] = ("color", "shape", "count", "exist", "position")
WORDINGS: tuple[str, ...] = ("train", "heldout")
# The fields a template must use to name what it asks about; naming nothing is only
# unambiguous about a single-object picture, and only for colour and shape questions.
REQUIRED: dict[str, frozenset[str]] = {"color": frozenset({"shape"}), "shape": frozenset({"color"}),
                                       "count": frozenset({"plural"}), "exist": frozenset({"color", "shape"}),
                                       "position": frozenset({"a", "b"})}
ANSWERS: dict[str, tuple[str, ...]] = {"color": COLOR_NAMES, "shape": SHAPE_NAMES, "count": ("1", "2", "3", "4"),
                                       "exist": ("Yes", "No"), "position": ("left", "right")}
TARGETS: dict[str, float] = {"color": 95.0, "shape": 90.0, "count": 85.0, "exist": 90.0, "exist_f1": 0.9,
                             "position": 85.0}
SINGLE_EVERY = 5  # every 5th colour/shape question (20%): one large shape on a plain canvas
MIN_DX = 0.2  # position: centres at least this fraction of the width apart

__all__ = ["HELDOUT_TEMPLATES", "TARGETS", "CATEGORIES", "WORDINGS", "fields_of", "trained_templates",
           "make_question", "write_set", "deciding_items", "seen_after_center_crop",
           "evaluate_out_of_style", "format_report", "main"]


def fields_of(template: str) -> frozenset[str]:
    """The {fields} a format string uses."""
    return frozenset(name for _, name, _, _ in string.Formatter().parse(template) if name)


def _usable(template: str, category: str, single: bool) -> bool:
    used = fields_of(template)
    return used == REQUIRED[category] or (not used and single and category in ("color", "shape"))


def trained_templates(category: str) -> tuple[str, ...]:
    """The wordings training asks a category's questions in (those about a lone object too)."""
    return VARIED_TEMPLATES[category] + VARIED_TEMPLATES.get(f"{category}_single", ())


def _template(rng: random.Random, category: str, wording: str, single: bool) -> str:
    pool = trained_templates(category) if wording == "train" else HELDOUT_TEMPLATES[category]
    usable = [t for t in pool if _usable(t, category, single)]
    if not usable:
        raise RuntimeError(f"no {wording} template for {category!r} fits (single={single}): {pool}")
    return rng.choice(usable)


def _others(rng: random.Random, exclude: str, k: int) -> list[str]:
    return [rng.choice([s for s in SHAPE_NAMES if s != exclude]) for _ in range(k)]


def _scene(rng: random.Random, category: str, answer: str, first_picture: bool) -> tuple[Drawing, dict[str, str]]:
    """A drawing whose answer to the category's question is `answer`, and the fields naming the subject."""
    colors = list(COLOR_NAMES)
    if category in ("color", "shape"):
        n = 1 if first_picture else rng.randint(1, 4)
        subject = (rng.choice(SHAPE_NAMES), answer) if category == "color" else (answer, rng.choice(colors))
        # Other objects never share what names the subject: its shape (colour q.) or colour (shape q.).
        if category == "color":
            rest = [(s, rng.choice(colors)) for s in _others(rng, subject[0], n - 1)]
        else:
            rest = [(rng.choice(SHAPE_NAMES), rng.choice([c for c in colors if c != subject[1]])) for _ in range(n - 1)]
        specs = [subject] + rest
        rng.shuffle(specs)
        drawing = sample_drawing(rng, specs, large=first_picture, plain=first_picture)
        return drawing, ({"shape": subject[0]} if category == "color" else {"color": subject[1]})
    if category == "count":
        shape = rng.choice(SHAPE_NAMES)
        specs = [(shape, rng.choice(colors)) for _ in range(int(answer))]
        specs += [(s, rng.choice(colors)) for s in _others(rng, shape, rng.randint(0, 2))]
        rng.shuffle(specs)
        return sample_drawing(rng, specs), {"plural": PLURALS[shape], "shape": shape}
    if category == "exist":
        drawing = sample_drawing(rng, [(rng.choice(SHAPE_NAMES), rng.choice(colors)) for _ in range(rng.randint(1, 4))])
        present = sorted({(o.color, o.shape) for o in drawing.items})
        near = [(c, s) for c in colors for s in SHAPE_NAMES  # plausible negatives: colour or shape is there
                if (c, s) not in present and (drawing.count(shape=s) or drawing.count(color=c))]
        color, shape = rng.choice(present if answer == "Yes" else near)
        return drawing, {"color": color, "shape": shape}
    for _ in range(200):  # position: two nameable objects clearly apart
        a, b = rng.sample([(s, c) for s in SHAPE_NAMES for c in colors], 2)
        rest = [x for x in ((rng.choice(SHAPE_NAMES), rng.choice(colors)) for _ in range(rng.randint(0, 2)))
                if x not in (a, b)]
        drawing = sample_drawing(rng, [a, b] + rest)
        oa, ob = drawing.items[0], drawing.items[1]
        if abs(oa.x - ob.x) >= MIN_DX * drawing.width:
            if (oa.x < ob.x) != (answer == "left"):
                oa, ob = ob, oa
            return drawing, {"a": f"{oa.color} {oa.shape}", "b": f"{ob.color} {ob.shape}"}
    raise RuntimeError("could not draw a position scene")


def answer_of(category: str, drawing: Drawing, fields: Mapping[str, str]) -> str | None:
    """The answer derived from the scene alone, or None when the question would be ambiguous."""
    items = drawing.items
    if category == "color":
        match = [o for o in items if o.shape == fields["shape"]]
        return match[0].color if len(match) == 1 else None
    if category == "shape":
        match = [o for o in items if o.color == fields["color"]]
        return match[0].shape if len(match) == 1 else None
    if category == "count":
        return str(drawing.count(shape=fields["shape"]))
    if category == "exist":
        return "Yes" if drawing.count(shape=fields["shape"], color=fields["color"]) else "No"
    named = {}
    for key in ("a", "b"):
        match = [o for o in items if f"{o.color} {o.shape}" == fields[key]]
        if len(match) != 1:
            return None
        named[key] = match[0]
    if abs(named["a"].x - named["b"].x) < MIN_DX * drawing.width:
        return None
    return "left" if named["a"].x < named["b"].x else "right"


def _center_square(width: int, height: int) -> tuple[float, float, int]:
    """(left, top, side) of the square a shortest-edge + centre-crop processor keeps, in pixels."""
    short = min(width, height)
    return (width - short) / 2, (height - short) / 2, short


def make_question(seed: int, i: int, category: str, wording: str, answer: str,
                  first_picture: bool = False) -> tuple[dict[str, Any], Drawing]:
    """Question `i` of the set (its row, without the image path) and its drawing."""
    rng = random.Random(f"out_of_style:{seed}:{i}")
    drawing, fields = _scene(rng, category, answer, first_picture)
    if answer_of(category, drawing, fields) != answer:
        raise RuntimeError(f"question {i}: scene does not answer {answer!r}")
    template = _template(rng, category, wording, len(drawing.items) == 1)
    x0, y0, short = _center_square(drawing.width, drawing.height)
    row = {"question_id": i, "text": template.format(**fields) + SHORT_SUFFIX, "answer": answer,
           "category": category, "wording": wording, "template": template, "fields": fields,
           "n_objects": len(drawing.items), "outline": any(o.style == "outline" for o in drawing.items),
           "canvas": [drawing.width, drawing.height], "format": drawing.fmt, "samples": drawing.samples,
           "noise": drawing.noise, "first_picture": first_picture,
           # Whether a shortest-edge + centre-crop preprocessor still sees every object whole.
           "in_center_crop": all(x0 <= o.x - o.size / 2 and o.x + o.size / 2 <= x0 + short and
                                 y0 <= o.y - o.size / 2 and o.y + o.size / 2 <= y0 + short for o in drawing.items),
           "scene": drawing.to_dict()}
    return row, drawing


def write_set(out_dir: str | os.PathLike, seed: int = 0, per_cell: int = 40) -> dict[str, Any]:
    """Write images/, eval.jsonl and meta.json; `per_cell` questions per (category, wording),
    answers cycling through the category's vocabulary. Same seed, same bytes."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows, i = [], 0
    for category in CATEGORIES:
        for wording in WORDINGS:
            vocab = ANSWERS[category]
            for j in range(per_cell):
                first = category in ("color", "shape") and j % SINGLE_EVERY == 0
                row, drawing = make_question(seed, i, category, wording, vocab[j % len(vocab)], first)
                image = f"images/oos_{i:05d}.{'jpg' if drawing.fmt == 'jpeg' else 'png'}"
                (out / image).write_bytes(encode(drawing))
                rows.append({"question_id": row["question_id"], "image": image, **row})
                i += 1
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()
    (out / "eval.jsonl").write_bytes(data)
    meta = {"seed": seed, "per_cell": per_cell, "n": len(rows),
            "counts": {f"{c}/{w}": n for (c, w), n in sorted(Counter((r["category"], r["wording"]) for r in rows).items())},
            "answers": {c: dict(sorted(Counter(r["answer"] for r in rows if r["category"] == c).items()))
                        for c in CATEGORIES},
            "sha256": hashlib.sha256(data).hexdigest()}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def deciding_items(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The drawn items (`row["scene"]["items"]`) whose sight decides the answer: every object of
    the counted shape, the one the colour or shape question names, both of a position question,
    the present one of a "Yes" existence question (a "No" stays true whatever is hidden)."""
    items, f, category = row["scene"]["items"], row["fields"], row["category"]
    if category in ("color", "count"):
        return [o for o in items if o["shape"] == f["shape"]]
    if category == "shape":
        return [o for o in items if o["color"] == f["color"]]
    if category == "exist":
        return [o for o in items if o["shape"] == f["shape"] and o["color"] == f["color"]]
    return [o for o in items if f"{o['color']} {o['shape']}" in (f["a"], f["b"])]


def seen_after_center_crop(row: Mapping[str, Any]) -> bool:
    """Whether a square-mode image processor (shortest edge, then a centre crop) keeps the centre
    of every deciding item: on a wide or tall picture it cuts the sides off, and what it cut no
    square-mode model can answer about. (Pad and anyres keep the whole picture.)"""
    x0, y0, short = _center_square(*row["canvas"])
    return all(x0 <= o["x"] <= x0 + short and y0 <= o["y"] <= y0 + short for o in deciding_items(row))


def count_detail(questions: Sequence[Mapping[str, Any]], answers: Mapping[Any, str | None]) -> dict[str, Any]:
    """Count accuracy by the true count ("by_answer") and by the objects in the picture, distractors
    included ("by_objects"): {value: {"accuracy", "n"}}. A category score hides where counting
    fails; small models miss the larger counts and the fuller pictures first."""
    counts = [q for q in questions if q["category"] == "count"]

    def split(key: str) -> dict[str, dict[str, Any]]:
        out = {}
        for value in sorted({int(q[key]) for q in counts}):
            part = score([q for q in counts if int(q[key]) == value], answers)["categories"]["count"]
            out[str(value)] = {"accuracy": part["accuracy"], "n": part["n"]}
        return out

    return {"by_answer": split("answer"), "by_objects": split("n_objects")}


def evaluate_out_of_style(pipe: Any, data_dir: str | os.PathLike, batch_size: int = 32) -> dict[str, Any]:
    """Answer every question once (and once more on blank images) and score by wording.

    Returns {"train", "heldout", "all", "blank", "after_crop", "count_detail"}: `llava.eval.synth.score`
    dicts with "chance"; "after_crop" scores only the questions `seen_after_center_crop` and adds
    "share" ({category: percent of its questions that are}); "count_detail" is `count_detail`'s.
    """
    eval_file = os.path.join(data_dir, "eval.jsonl")
    questions = load_questions(eval_file)
    with tempfile.TemporaryDirectory() as tmp:
        answers_file = os.path.join(tmp, "answers.jsonl")
        everything = evaluate(pipe, eval_file, data_dir, batch_size=batch_size, answers_file=answers_file)
        answers = {r["question_id"]: r["text"] for r in load_questions(answers_file)}
    result: dict[str, Any] = {"all": everything}
    for wording in WORDINGS:
        subset = [q for q in questions if q.get("wording") == wording]
        result[wording] = {**score(subset, answers), "chance": chance_levels(subset)}
    seen = [q for q in questions if seen_after_center_crop(q)]
    asked, kept = Counter(q["category"] for q in questions), Counter(q["category"] for q in seen)
    result["after_crop"] = {**score(seen, answers), "chance": chance_levels(seen),
                            "share": {c: round(100.0 * kept[c] / n, 2) for c, n in asked.items()}}
    result["count_detail"] = count_detail(questions, answers)
    result["blank"] = evaluate(pipe, eval_file, data_dir, batch_size=batch_size, blank_images=True)
    return result


def _value(res: Mapping[str, Any], key: str) -> float | None:
    if key == "exist_f1":
        return res.get("exist", {}).get("f1")
    return res.get("categories", {}).get(key, {}).get("accuracy")


def targets_met(result: Mapping[str, Any]) -> bool:
    """Every target met on both wordings together and on the heldout wording alone."""
    return all(c["ok"] for part in ("all", "heldout") for c in check_targets(result[part], TARGETS).values())


def count_detail_sentence(detail: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """`count_detail` as a clause: accuracy % (questions) by the true count and by the objects drawn."""
    def part(key: str) -> str:
        return ", ".join(f"{v} {d['accuracy']:.1f} ({d['n']})" for v, d in detail[key].items())
    return f"by the true count: {part('by_answer')}; by the objects in the picture: {part('by_objects')}"


def format_report(result: Mapping[str, Any]) -> str:
    """Category rows x train / heldout / all / blank / chance / target, checked on all and on heldout."""
    chance = result["all"].get("chance", {})
    checks = {part: check_targets(result[part], TARGETS) for part in ("all", "heldout")}
    lines = [f"out-of-style set: {result['all']['n']} questions; target checked on all (train+heldout wordings) "
             "and on heldout alone",
             f"{'category':<10} {'n':>4} {'train %':>8} {'heldout %':>10} {'all %':>7} {'blank %':>8} {'chance %':>9} "
             f"{'target':>7}  {'all':<6} {'heldout':<7}"]

    def fmt(x: float | None, width: int, f1: bool) -> str:
        return f"{'-':>{width}}" if x is None else f"{x:>{width}.3f}" if f1 else f"{x:>{width}.2f}"

    for key in (*CATEGORIES, "exist_f1"):
        f1 = key == "exist_f1"
        n = result["all"].get("categories", {}).get("exist" if f1 else key, {}).get("n", 0)
        marks = ["-" if key not in checks[p] else ("ok" if checks[p][key]["ok"] else "BELOW") for p in checks]
        lines.append(f"{key:<10} {n:>4} {fmt(_value(result['train'], key), 8, f1)} "
                     f"{fmt(_value(result['heldout'], key), 10, f1)} {fmt(_value(result['all'], key), 7, f1)} "
                     f"{fmt(_value(result['blank'], key), 8, f1)} {fmt(None if f1 else chance.get(key), 9, f1)} "
                     f"{TARGETS[key]:>7g}  {marks[0]:<6} {marks[1]}")
    lines.append(f"{'overall':<10} {result['all']['n']:>4} {result['train']['overall']:>8.2f} "
                 f"{result['heldout']['overall']:>10.2f} {result['all']['overall']:>7.2f} "
                 f"{result['blank']['overall']:>8.2f} {chance.get('overall', float('nan')):>9.2f}")
    for part in ("train", "heldout"):
        e = result[part].get("exist")
        if e:
            lines.append(f"exist ({part}): precision {e['precision']:.3f} recall {e['recall']:.3f} "
                         f"yes-ratio {e['yes_ratio']:.3f}")
    crop = result.get("after_crop")
    if crop:
        lines.append("a centre crop (square mode) keeps what decides the answer in: " + ", ".join(
            f"{c} {crop['share'][c]:.0f}% (accuracy there {crop['accuracy'][c]:.1f})"
            for c in CATEGORIES if c in crop.get("accuracy", {})))
    detail = result.get("count_detail")
    if detail:
        lines.append("count accuracy % (questions) " + count_detail_sentence(detail))
    lines.append("targets: " + ("all met" if targets_met(result) else "NOT all met"))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava.eval.out_of_style", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default=None, help="checkpoint folder (default: the bundled model)")
    p.add_argument("--data", default=None, help="set folder; generated there if it has no eval.jsonl (default: temp)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-cell", type=int, default=40, help="questions per (category, wording)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--require-targets", action="store_true", help="exit 1 unless every target is met")
    args = p.parse_args(argv)

    from llava.api import load

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or tmp
        if not os.path.exists(os.path.join(data, "eval.jsonl")):
            write_set(data, seed=args.seed, per_cell=args.per_cell)
        pipe = load(args.model_path, device=args.device)
        result = evaluate_out_of_style(pipe, data, batch_size=args.batch_size)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 1 if args.require_targets and not targets_met(result) else 0


if __name__ == "__main__":
    sys.exit(main())
