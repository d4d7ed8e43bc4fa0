"""The out-of-style held-out set (llava.eval.drawn + llava.eval.out_of_style).

Answers are re-derived here from the stored scene dicts with independent code, and the
renderer is checked from pixels (areas, colours), so neither can hide a bug behind itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import string
from collections import Counter
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from llava.data.synth import generate
from llava.data.synth_phrasing import VARIED_TEMPLATES, VARIED_TRAINING_TEMPLATES
from llava.data.synth_scene import COLORS, PLURALS, SHAPES
from llava.data.synth_text import SHORT_SUFFIX, TEMPLATES
from llava.eval import drawn
from llava.eval.drawn import Drawing, Item, render
from llava.eval.out_of_style import (
    HELDOUT_TEMPLATES,
    TARGETS,
    count_detail,
    count_detail_sentence,
    evaluate_out_of_style,
    format_report,
    main,
    seen_after_center_crop,
    trained_templates,
    write_set,
)
from llava.eval.synth import load_questions
from llava.train.data import load_records

PER_CELL = 12  # 120 questions: enough that every style choice occurs for the fixed seed


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def oos(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("oos")
    write_set(out, seed=0, per_cell=PER_CELL)
    return out


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("oos_tiny")
    write_set(out, seed=0, per_cell=2)
    return out


@pytest.fixture(scope="module")
def rows(oos) -> list[dict]:
    return load_questions(oos / "eval.jsonl")


def test_deterministic_per_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    meta = write_set(a, seed=5, per_cell=3)
    write_set(b, seed=5, per_cell=3)
    write_set(c, seed=6, per_cell=3)
    assert _files(a) == _files(b)
    assert (a / "eval.jsonl").read_bytes() != (c / "eval.jsonl").read_bytes()
    assert meta["sha256"] == hashlib.sha256((a / "eval.jsonl").read_bytes()).hexdigest()
    assert meta["n"] == 30 and set(meta["counts"].values()) == {3}
    assert json.loads((a / "meta.json").read_text())["seed"] == 5


def _derive(category: str, scene: dict, fields: dict) -> str | None:
    """The answer from the scene dict, or None when the question would not be unique."""
    items = scene["items"]
    if category == "color":
        hits = [o for o in items if o["shape"] == fields["shape"]]
        return hits[0]["color"] if len(hits) == 1 else None
    if category == "shape":
        hits = [o for o in items if o["color"] == fields["color"]]
        return hits[0]["shape"] if len(hits) == 1 else None
    if category == "count":
        k = sum(o["shape"] == fields["shape"] for o in items)
        return str(k) if PLURALS[fields["shape"]] == fields["plural"] else None
    if category == "exist":
        return "Yes" if any((o["color"], o["shape"]) == (fields["color"], fields["shape"]) for o in items) else "No"
    a = [o for o in items if f"{o['color']} {o['shape']}" == fields["a"]]
    b = [o for o in items if f"{o['color']} {o['shape']}" == fields["b"]]
    if len(a) != 1 or len(b) != 1 or abs(a[0]["x"] - b[0]["x"]) < 0.2 * scene["width"]:
        return None
    return "left" if a[0]["x"] < b[0]["x"] else "right"


def test_answers_derive_from_scene(rows):
    for r in rows:
        assert _derive(r["category"], r["scene"], r["fields"]) == r["answer"], r["question_id"]
        assert r["text"] == r["template"].format(**r["fields"]) + SHORT_SUFFIX
        used = {f for _, f, _, _ in string.Formatter().parse(r["template"]) if f}
        if not used:  # a question that names nothing is only asked about a lone object
            assert r["n_objects"] == 1 and r["category"] in ("color", "shape")
        if r["category"] == "exist" and r["answer"] == "No":  # plausible negatives
            s = r["scene"]["items"]
            assert any(o["color"] == r["fields"]["color"] or o["shape"] == r["fields"]["shape"] for o in s)
    cells = Counter((r["category"], r["wording"]) for r in rows)
    assert set(cells.values()) == {PER_CELL} and len(cells) == 10
    assert Counter(r["answer"] for r in rows if r["category"] == "exist") == {"Yes": PER_CELL, "No": PER_CELL}
    assert Counter(r["answer"] for r in rows if r["category"] == "count") == {str(k): 6 for k in range(1, 5)}
    assert len({r["image"] for r in rows}) == len(rows)  # every question has its own picture


def test_styles_span(oos, rows):
    sizes, formats = set(), Counter()
    for r in rows:
        with PIL.Image.open(oos / r["image"]) as img:
            sizes.add(img.size)
            formats[img.format] += 1
            assert list(img.size) == r["canvas"]
            assert img.format == {"png": "PNG", "jpeg": "JPEG"}[r["format"]]
    assert all(64 <= w <= 640 and 64 <= h <= 640 for w, h in sizes)
    assert any(w > 1.3 * h for w, h in sizes) and any(h > 1.3 * w for w, h in sizes)
    assert max(max(s) for s in sizes) > 300 and min(min(s) for s in sizes) < 100
    assert formats["PNG"] and formats["JPEG"]
    styles = Counter(o["style"] for r in rows for o in r["scene"]["items"])
    assert styles["filled"] and styles["outline"]
    assert {r["samples"] for r in rows} >= {1, 3, 4} and any(r["noise"] for r in rows)
    cs = [r for r in rows if r["category"] in ("color", "shape")]
    assert 0.1 <= sum(r["first_picture"] for r in cs) / len(cs) <= 0.3
    big = [o["size"] / min(r["canvas"]) for r in cs if r["first_picture"] for o in r["scene"]["items"]]
    assert min(big) >= 0.6 and max(big) <= 0.9


def test_vocabulary_and_shades():
    assert set(drawn.SHAPE_NAMES) == set(SHAPES) and set(drawn.COLOR_NAMES) == set(COLORS)
    for name, shades in drawn.SHADES.items():
        for rgb in shades:
            assert rgb not in COLORS.values()
            nearest = min(COLORS, key=lambda c: math.dist(COLORS[c], rgb))
            assert nearest == name, (name, rgb)


def _coverage_from_pixels(img: PIL.Image.Image, bg: int, fg: int, channel: int = 1) -> np.ndarray:
    x = np.asarray(img, dtype=np.float64)[..., channel]
    return (bg - x) / (bg - fg)


@pytest.mark.parametrize("samples,tol", [(4, 0.01), (1, 0.03)])
def test_circle_area(samples, tol):
    item = Item("circle", "red", (200, 30, 30), 100.3, 99.6, 120.0)
    img = render(Drawing(200, 200, (255, 255, 255), samples=samples, items=[item]))
    area = _coverage_from_pixels(img, 255, 30).sum()
    assert abs(area / (math.pi * 60 ** 2) - 1) < tol


def _shoelace(v: np.ndarray) -> float:
    x, y = v[:, 0], v[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


@pytest.mark.parametrize("shape,ratio,angle", [("square", 0, 7), ("triangle", math.sqrt(3) / 2, 0),
                                               ("star", 0.42, 0), ("cross", 0.35, 0), ("diamond", 0.7, 0)])
def test_polygon_areas(shape, ratio, angle):
    item = Item(shape, "blue", (20, 50, 180), 120.2, 110.7, 160.0, ratio=ratio, angle=angle)
    img = render(Drawing(240, 220, (255, 255, 255), samples=4, items=[item]))
    area = _coverage_from_pixels(img, 255, 50).sum()
    assert abs(area / _shoelace(drawn.outline_of(item)) - 1) < 0.02
    assert area < math.pi * 80 ** 2  # inside its circumscribed disc
    mask = _coverage_from_pixels(img, 255, 50) > 0.5
    ys, xs = np.nonzero(mask)
    if shape in ("triangle", "star", "diamond"):  # point up: the top vertex is on the circumscribed circle
        assert abs(ys.min() - (110.7 - 80)) < 2 and abs(xs[ys == ys.min()].mean() - 120.2) < 3
    if shape == "star":
        assert area < 0.5 * math.pi * 80 ** 2


def test_outline_only_is_hollow():
    item = Item("circle", "green", (40, 170, 60), 60.0, 60.0, 100.0, style="outline", stroke=6.0)
    px = np.asarray(render(Drawing(120, 120, (255, 255, 255), samples=3, items=[item])))
    assert tuple(px[60, 60]) == (255, 255, 255)
    assert tuple(px[60, 60 + 47]) == (40, 170, 60)  # in the stroke, 3 px inside the edge


def test_lone_shape_colour(oos, rows):
    """Mean colour over a lone filled shape's interior (away from edges) is its drawn RGB."""
    checked = 0
    for r in rows:
        items = r["scene"]["items"]
        if r["n_objects"] != 1 or items[0]["style"] != "filled":
            continue
        item = Drawing.from_dict(r["scene"]).items[0]
        w, h = r["canvas"]
        d = drawn.signed_distance(item, *np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5))
        inside = d < -(item.stroke + 3)
        if inside.sum() < 30:
            continue
        with PIL.Image.open(oos / r["image"]) as img:
            mean = np.asarray(img.convert("RGB"), dtype=np.float64)[inside].mean(axis=0)
        assert np.abs(mean - np.asarray(item.rgb)).max() < (10 if r["format"] == "jpeg" else 3), r["question_id"]
        checked += 1
    assert checked >= 5


def test_heldout_wordings_never_trained(rows):
    trained = {t for ts in (*TEMPLATES.values(), *VARIED_TEMPLATES.values(), *VARIED_TRAINING_TEMPLATES.values())
               for t in ts}
    trained_lower = {t.lower() for t in trained}
    for category, templates in HELDOUT_TEMPLATES.items():
        for t in templates:
            assert t not in trained and t.lower() not in trained_lower, t
    for r in rows:
        pool = trained_templates(r["category"]) if r["wording"] == "train" else HELDOUT_TEMPLATES[r["category"]]
        assert r["template"] in pool
        if r["wording"] == "heldout":
            assert r["template"] not in trained
    assert {r["wording"] for r in rows} == {"train", "heldout"}


def test_training_chats_never_ask_a_heldout_wording(tmp_path):
    """No question of the varied world's training chats (nor the classic's) is a held-out wording."""
    color, shape, plural = ("(?:" + "|".join(v) + ")" for v in (COLORS, SHAPES, PLURALS.values()))
    values = {"color": color, "shape": shape, "plural": plural, "a": f"{color} {shape}", "b": f"{color} {shape}"}
    heldout = [re.compile("^" + re.sub(r"\\\{(\w+)\\\}", lambda m: values[m[1]], re.escape(t)) + "$", re.IGNORECASE)
               for ts in HELDOUT_TEMPLATES.values() for t in ts]
    asked = set()
    for world in ("classic", "varied"):
        generate(tmp_path / world, seed=0, n=300, eval_n=0, world=world)
        for rec in load_records(tmp_path / world / "instruct.json"):
            for turn in rec["conversations"][::2]:
                asked.add(turn["value"].removeprefix("<image>\n").split("\n")[0])
    assert len(asked) > 500
    assert not [q for q in asked if any(p.match(q) for p in heldout)]


def test_evaluate_and_report(tiny_set):
    import llava

    result = evaluate_out_of_style(llava.load(), tiny_set, batch_size=32)
    assert set(result) == {"train", "heldout", "all", "blank", "after_crop", "count_detail"}
    assert result["all"]["n"] == 20 and result["train"]["n"] == result["heldout"]["n"] == 10
    assert result["blank"]["blank_images"] is True and result["blank"]["n"] == 20
    rows = load_questions(tiny_set / "eval.jsonl")
    assert result["after_crop"]["n"] == sum(map(seen_after_center_crop, rows))
    for category, share in result["after_crop"]["share"].items():
        in_category = [r for r in rows if r["category"] == category]
        assert share == pytest.approx(100 * sum(map(seen_after_center_crop, in_category)) / len(in_category))
    for part in (result[k] for k in ("train", "heldout", "all", "blank")):
        assert set(part["categories"]) == {"color", "shape", "count", "exist", "position"}
        assert "exist" in part and "chance" in part
    # Answered once: the subsets' correct counts add up to the whole.
    assert result["train"]["correct"] + result["heldout"]["correct"] == result["all"]["correct"]
    report = format_report(result)
    assert "heldout" in report and "blank" in report and all(k in report for k in TARGETS)
    assert "a centre crop (square mode) keeps" in report
    counts = [r for r in rows if r["category"] == "count"]
    for key, field in (("by_answer", "answer"), ("by_objects", "n_objects")):
        detail = result["count_detail"][key]
        assert set(detail) == {str(r[field]) for r in counts}
        assert sum(d["n"] for d in detail.values()) == len(counts)
        correct = sum(round(d["accuracy"] * d["n"] / 100) for d in detail.values())
        assert correct == result["all"]["categories"]["count"]["correct"]
    assert "by the true count" in report


def test_count_detail_splits_by_the_true_count_and_the_objects_drawn():
    rows = [{"question_id": i, "category": "count", "answer": a, "n_objects": n}
            for i, (a, n) in enumerate([("1", 1), ("1", 3), ("4", 4), ("4", 6), ("2", 4)])]
    rows.append({"question_id": 9, "category": "color", "answer": "red", "n_objects": 2})
    answers = {0: "1", 1: "one", 2: "3", 3: "There are four.", 4: "2", 9: "red"}
    detail = count_detail(rows, answers)
    assert detail["by_answer"] == {"1": {"accuracy": 100.0, "n": 2}, "2": {"accuracy": 100.0, "n": 1},
                                   "4": {"accuracy": 50.0, "n": 2}}
    assert detail["by_objects"] == {"1": {"accuracy": 100.0, "n": 1}, "3": {"accuracy": 100.0, "n": 1},
                                    "4": {"accuracy": 50.0, "n": 2}, "6": {"accuracy": 100.0, "n": 1}}
    assert count_detail_sentence(detail).startswith("by the true count: 1 100.0 (2), 2 100.0 (1), 4 50.0 (2);")


def _row(category: str, canvas: tuple[int, int], items: list[tuple[str, str, float, float]], **fields: str) -> dict:
    return {"category": category, "canvas": list(canvas), "fields": fields,
            "scene": {"items": [{"shape": s, "color": c, "x": x, "y": y} for s, c, x, y in items]}}


def test_what_a_centre_crop_keeps():
    """A 200x100 picture keeps x in [50, 150] after a centre crop; only the items that decide
    the answer count (an existence "No" has none, so nothing a crop hides can change it)."""
    wide = (200, 100)
    side, middle = ("circle", "red", 20.0, 50.0), ("circle", "blue", 100.0, 50.0)
    square_elsewhere = ("square", "red", 190.0, 50.0)
    assert not seen_after_center_crop(_row("count", wide, [side, middle], shape="circle"))
    assert seen_after_center_crop(_row("count", wide, [middle, square_elsewhere], shape="circle"))
    assert seen_after_center_crop(_row("count", (100, 200), [("circle", "red", 20.0, 100.0)], shape="circle"))
    assert not seen_after_center_crop(_row("count", (100, 200), [("circle", "red", 50.0, 20.0)], shape="circle"))
    assert not seen_after_center_crop(_row("shape", wide, [side, middle], color="red"))
    assert seen_after_center_crop(_row("color", wide, [middle, square_elsewhere], shape="circle"))
    assert seen_after_center_crop(_row("exist", wide, [side], shape="square", color="green"))
    assert not seen_after_center_crop(_row("exist", wide, [side], shape="circle", color="red"))
    assert not seen_after_center_crop(_row("position", wide, [side, middle], a="red circle", b="blue circle"))
    assert seen_after_center_crop(_row("position", (300, 300), [side, middle], a="red circle", b="blue circle"))


def test_cli(tiny_set, capsys):
    assert main(["--data", str(tiny_set), "--batch-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "train %" in out and "position" in out and "exist_f1" in out
