"""The varied synthetic world (llava.data.synth_varied): many looks and wordings, answers still true.

The classic world stays byte for byte what the bundled model was trained on; the varied one
must keep every answer derivable from its scene whatever the canvas, shade, stroke or wording.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import random
import string
from collections import Counter
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from llava.data.synth import chat, generate, train_scene
from llava.data.synth_phrasing import (HELDOUT_TEMPLATES, TEMPLATES, VARIED_2_TRAINING_TEMPLATES, VARIED_TEMPLATES,
                                       VARIED_TRAINING_TEMPLATES, compose)
from llava.data.synth_scene import COLORS, PLURALS, SHAPES, Obj, Scene, render, sample_scene
from llava.data.synth_text import CATEGORIES, MC_SUFFIX, SHORT_SUFFIX, make_qa
from llava.data.synth_varied import SHADES, sample_varied_scene
from llava.processing.image import ImageProcessor
from llava.recipe.vision import read_images
from llava.train.data import load_records, validate_record

SEED, N, EVAL_N = 5, 60, 35


@pytest.fixture(scope="module")
def varied(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("varied")
    generate(out, seed=SEED, n=N, eval_n=EVAL_N, world="varied")
    return out


def _scenes(root: Path) -> dict[str, Scene]:
    return {row["image"]: Scene.from_dict(row["scene"]) for row in load_records(root / "scenes.jsonl")}


def test_same_seed_same_bytes_and_the_world_is_recorded(varied, tmp_path):
    generate(tmp_path, seed=SEED, n=N, eval_n=EVAL_N, world="varied")
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    assert digest == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in sorted(varied.rglob("*")) if p.is_file()}
    assert json.loads((varied / "meta.json").read_text())["world"] == "varied"
    with pytest.raises(ValueError, match="unknown synthetic world"):
        generate(tmp_path / "x", seed=0, n=1, eval_n=0, world="photographic")


def test_classic_scenes_keep_their_old_form():
    """The classic world's scenes are written without the varied fields (their data files keep their bytes)."""
    scene = sample_scene(random.Random(0), 96)
    assert set(scene.to_dict()) == {"size", "background", "gradient", "objects", "word", "word_box", "word_place"}
    assert all(set(o) == {"shape", "color", "size", "x", "y", "radius"} for o in scene.to_dict()["objects"])


def test_canvases_looks_and_files_vary(varied):
    scenes = _scenes(varied)
    canvases = [s.canvas for s in scenes.values()]
    assert all(64 <= min(c) and max(c) <= 384 for c in canvases)
    assert sum(w != h for w, h in canvases) > len(canvases) // 4
    objects = [o for s in scenes.values() for o in s.objects]
    assert {o.filled for o in objects} == {True, False} and {o.edge for o in objects} == {"dark", "none", "shade"}
    assert len({o.rgb for o in objects}) > len(objects) // 2  # shades, not seven colours
    assert any(len(s.objects) == 1 and 2 * s.objects[0].radius > 0.5 * min(s.canvas) for s in scenes.values())
    suffixes = Counter(Path(name).suffix for name in scenes)
    assert suffixes[".png"] and suffixes[".jpg"]
    for name, scene in scenes.items():
        with PIL.Image.open(varied / name) as im:
            assert im.size == scene.canvas and im.format == ("JPEG" if scene.jpeg else "PNG")
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


def test_several_shapes_come_small_and_as_large_as_fit():
    """Pictures of several shapes are drawn small or as large as they fit (people draw both),
    each shape whole on its canvas and apart from the others."""
    rng = random.Random(3)
    scenes = [sample_varied_scene(rng, count=rng.randint(1, n), n_objects=n) for n in (2, 3, 4, 5) for _ in range(60)]
    for n in (2, 3, 4, 5):  # radii against the long side: the picture as padded to a square
        largest = [max(o.radius for o in s.objects) / max(s.canvas) for s in scenes if len(s.objects) == n]
        assert max(largest) > (0.2 if n <= 3 else 0.15) and min(largest) < 0.1, (n, max(largest), min(largest))
    for s in scenes:
        width, height = s.canvas
        assert all(o.radius <= o.x <= width - o.radius and o.radius <= o.y <= height - o.radius for o in s.objects)
        assert all(((a.x - b.x) ** 2 + (a.y - b.y) ** 2) ** 0.5 >= a.radius + b.radius
                   for i, a in enumerate(s.objects) for b in s.objects[i + 1:])


def test_varied_counts_are_not_mostly_one():
    """Scenes of one shape and the odd shapes beside a group make "1" the answer to about half of
    all count questions; the varied chats keep only some of those, so every count has its share."""
    answers = Counter()
    for i in range(600):
        rng, scene = train_scene(SEED, i, world="varied")
        for question, answer in chat(rng, scene, world="varied"):
            if question.endswith(SHORT_SUFFIX) and any(p in question for p in PLURALS.values()) \
                    and answer.isdigit():
                answers[answer] += 1
    total = sum(answers.values())
    assert set(answers) == {"1", "2", "3", "4", "5"}
    assert answers["1"] / total < 0.3 and min(answers.values()) / total > 0.1, answers


# Hue (degrees) a shade of each name keeps: what a person still calls it.
_HUES = {"red": (340, 10), "yellow": (45, 66), "green": (95, 150), "blue": (210, 245), "purple": (262, 310),
         "pink": (310, 350)}  # 340-350: pink where pale, red where saturated


def test_shades_keep_their_name():
    """Every shade a varied scene draws has its name's hue and is saturated (gray: unsaturated)."""
    rng = random.Random(0)
    for _ in range(300):
        for o in sample_varied_scene(rng).objects:
            assert o.rgb is not None and o.color in SHADES
            hue, saturation, _ = colorsys.rgb_to_hsv(*(v / 255 for v in o.rgb))
            if o.color == "gray":
                assert saturation < 0.25, o.rgb
                continue
            lo, hi = _HUES[o.color]
            degrees = hue * 360
            assert saturation > 0.3 and (lo <= degrees <= hi if lo < hi else degrees >= lo or degrees <= hi), \
                (o.color, o.rgb, round(degrees), round(saturation, 2))


def test_pixels_match_the_scene():
    """A filled shape's centre has its colour (within JPEG, blur and noise), drawn in its own canvas."""
    rng = random.Random(1)
    checked = 0
    for _ in range(80):
        scene = sample_varied_scene(rng)
        img = np.asarray(render(scene), dtype=int)
        assert img.shape == (scene.canvas[1], scene.canvas[0], 3)
        for o in scene.objects:
            if o.filled and o.radius >= 8:
                assert np.abs(img[o.y, o.x] - np.array(o.rgb)).max() <= 30, o
                checked += 1
    assert checked > 50


def test_a_varied_cross_runs_from_a_thin_plus_sign_to_a_stout_one():
    """People draw "+" with thin strokes: a varied cross's bars are from a ninth of its span wide to
    nearly half (a model trained on stout crosses alone called thin ones stars)."""
    def bar_share(variant: float) -> float:
        cross = Obj("cross", "blue", "large", 100, 100, 90, rgb=(0, 0, 255), edge="none", variant=variant)
        img = np.asarray(render(Scene(200, "white", 0, [cross], tint=(255, 255, 255))), dtype=int)
        column = img[:, 100 + 60, 2] - img[:, 100 + 60, 0] > 128  # down through the right arm
        row = img[100, :, 2] - img[100, :, 0] > 128  # across the horizontal bar
        return column.sum() / row.sum()

    assert bar_share(0.0) == pytest.approx(1 / 9, abs=0.02)
    assert bar_share(1.0) == pytest.approx(0.42 / 0.9, abs=0.02)


def _truth(scene: Scene, key: str) -> str:
    """The answer to the fact `key` ("color:star", "count:circle", ...) read from the scene alone."""
    kind, _, what = key.partition(":")
    if kind == "color":  # one object of the shape, or a group of it drawn in one colour
        (color,) = {o.color for o in scene.objects if o.shape == what}
        return color
    if kind == "shape":
        (o,) = [o for o in scene.objects if o.color == what]
        return o.shape
    if kind == "count":
        return str(sum(o.shape == what for o in scene.objects))
    if kind == "exist":
        color, shape = what.split()
        return "Yes" if any((o.color, o.shape) == (color, shape) for o in scene.objects) else "No"
    if kind == "word":
        return scene.word
    raise AssertionError(key)


def test_varied_questions_are_answered_truly_in_every_wording():
    rng = random.Random(2)
    used: Counter = Counter()
    for i in range(400):
        scene = sample_varied_scene(rng)
        for category in ("color", "shape", "count", "exist", "word"):
            qa = make_qa(rng, scene, category, pool=VARIED_TEMPLATES)
            if qa is None:
                continue
            used[qa.question] += 1
            assert qa.answer == _truth(scene, qa.key), (qa, scene)
            assert qa.answer.lower() in qa.sentence.lower() or category in ("count", "exist")
            if category == "count":
                assert qa.sentence.startswith("There is one" if qa.answer == "1" else "There are")
            if category == "exist":
                assert qa.sentence.startswith(qa.answer)
        qa = make_qa(rng, scene, "position", pool=VARIED_TEMPLATES)
        if qa is not None:
            a, b = qa.sentence.removeprefix("The ").removesuffix(".").split(f" is to the {qa.answer} of the ")
            xa, xb = ([o.x for o in scene.objects if o.name == name] for name in (a, b))
            assert (xa[0] < xb[0]) == (qa.answer == "left")
    lone = [q for q in used if "{" not in q and any(q == t for k in ("color_single", "shape_single")
                                                    for t in VARIED_TEMPLATES[k])]
    assert len(lone) >= 8, "questions about a lone object that name nothing are asked"
    assert len(used) > 150


def test_varied_templates_extend_the_classic_ones_with_the_same_fields():
    formatter = string.Formatter()
    for category, classic in TEMPLATES.items():
        assert VARIED_TEMPLATES[category][:len(classic)] == classic
        fields = {f for t in classic for _, f, _, _ in formatter.parse(t) if f}
        for template in VARIED_TEMPLATES[category]:
            assert {f for _, f, _, _ in formatter.parse(template) if f} == fields, template
    for template in VARIED_TEMPLATES["color_single"] + VARIED_TEMPLATES["shape_single"]:
        assert "{" not in template
    assert all(len(set(v)) == len(v) for v in VARIED_TEMPLATES.values())


def test_training_pool_adds_composed_paraphrases_with_the_same_fields():
    """Every varied wording stays; composed ones add the words people use (colour, photo, figure,
    a position question that offers no "left or right"); none is a held-out wording; fields match."""
    formatter = string.Formatter()
    heldout = {t.lower() for ts in HELDOUT_TEMPLATES.values() for t in ts}
    for family, base in VARIED_TEMPLATES.items():
        pool = VARIED_TRAINING_TEMPLATES[family]
        assert set(base) - heldout <= set(pool) and len(set(pool)) == len(pool)
        fields = {f for t in base for _, f, _, _ in formatter.parse(t) if f}
        for template in pool:
            assert {f for _, f, _, _ in formatter.parse(template) if f} == fields, template
            assert template.lower() not in heldout, template
    words = " ".join(t for ts in VARIED_TRAINING_TEMPLATES.values() for t in ts)
    for word in ("colour", "photo", "drawing", "figure", "item"):
        assert word in words
    assert any("left" not in t for t in VARIED_TRAINING_TEMPLATES["position"])
    assert compose(("A {C} {I}.",), {"C": ("x", "y"), "I": ("p",)}) == ("A x p.", "A y p.")


def test_varied_chats_mix_short_answers_and_sentences(varied):
    records = load_records(varied / "instruct.json")
    short = sentences = 0
    for rec in records:
        assert validate_record(rec, check_images=False) == []
        conv = rec["conversations"]
        for human, gpt in zip(conv[::2], conv[1::2]):
            text = human["value"].removeprefix("<image>\n")
            if text.endswith(SHORT_SUFFIX):
                short += 1
                assert " " not in gpt["value"].strip() or gpt["value"] in COLORS, gpt
            elif not text.endswith(MC_SUFFIX) and "image" in rec and "detail" not in text.lower():
                sentences += 1
                assert gpt["value"].endswith(".") and len(gpt["value"].split()) >= 3, gpt
    assert short > 2 * sentences > 0  # sentence_p 0.2; prompts for a description count as sentences here


def test_eval_set_is_the_canonical_wording_in_every_category(varied):
    rows = [json.loads(line) for line in (varied / "eval.jsonl").read_text().splitlines()]
    assert Counter(r["category"] for r in rows) == Counter({c: EVAL_N // len(CATEGORIES) for c in CATEGORIES})
    scenes = _scenes(varied)
    for r in rows:
        if r["category"] in ("color", "shape", "count", "exist"):
            stem = r["text"].removesuffix(SHORT_SUFFIX)
            assert any(_matches(t, stem) for t in TEMPLATES[r["category"]][:1]), stem
            assert r["image"] in scenes


def _matches(template: str, text: str) -> bool:
    words = set(COLORS) | set(SHAPES) | set(PLURALS.values())
    return any(template.format(shape=w, color=w, plural=w) == text for w in words) or \
        any(template.format(color=c, shape=s) == text for c in COLORS for s in SHAPES)


def test_training_stream_is_the_written_dataset(varied):
    """`train_scene` + `chat` (what the LM's stage-0 docs read) are the written chats, scene for scene."""
    records = {r["id"]: r for r in load_records(varied / "instruct.json")}
    for i in (0, 7, N - 1):
        rng, scene = train_scene(SEED, i, world="varied")
        rng.choice(["a"] * 11)  # the caption prompt's draw, as generate makes it
        turns = chat(rng, scene, "varied")
        assert [t["value"] for t in records[f"synth-{i:06d}"]["conversations"]][1] == turns[0][1]


def test_tower_sees_a_picture_as_the_llava_processor_does(tmp_path):
    """The tower's pretraining pixels for a non-square picture are the VLM processor's ('pad'), un-normalised."""
    scene = Scene(size=200, height=90, background="white", gradient=0, tint=(250, 240, 230),
                  objects=[Obj("star", "red", "large", 60, 45, 30, rgb=(230, 20, 20))])
    render(scene).save(tmp_path / "x.png")
    pixels = read_images(str(tmp_path), ["x.png"], 96)[0]
    processor = ImageProcessor(crop_size=96, aspect="pad")
    with PIL.Image.open(tmp_path / "x.png") as im:
        tensor = processor([im])[0][0][0]
    expect = (pixels.astype(np.float32) / 255 - np.array(processor.mean, dtype=np.float32)) / \
        np.array(processor.std, dtype=np.float32)
    assert pixels.shape == (96, 96, 3)
    assert np.allclose(tensor.numpy().transpose(1, 2, 0), expect, atol=1e-5)
    assert (pixels[:20] == processor.background).all()  # the padding band above the picture


def test_reading_pictures_in_threads_keeps_their_pixels_and_order(tmp_path):
    rng = np.random.default_rng(0)
    names = []
    for i in range(300):  # over read_images' threshold for threads; sizes vary so some are padded and resized
        name = f"{i:03d}.png"
        PIL.Image.fromarray(rng.integers(0, 256, (20 + i % 7, 30 - i % 5, 3), dtype=np.uint8)).save(tmp_path / name)
        names.append(name)
    one = read_images(str(tmp_path), names, 32, threads=1)
    assert one.shape == (300, 32, 32, 3)
    assert np.array_equal(read_images(str(tmp_path), names, 32, threads=2), one)


def test_the_second_edition_draws_smaller_shapes_and_groups_alike_and_asks_their_colour():
    """People draw a group in one colour and ask "What color are the squares?": the second edition
    ("varied-2") draws some groups alike and asks their colour in plural wordings (never about a
    group of two colours), and draws small shapes smaller; the first edition asks no such question."""
    asked, small = [], []
    for i in range(400):
        rng, scene = train_scene(SEED, i, world="varied-2")
        small += [o.radius / max(scene.canvas) for o in scene.objects] if len(scene.objects) > 1 else []
        for _ in range(3):
            qa = make_qa(rng, scene, "color", pool=VARIED_2_TRAINING_TEMPLATES)
            if qa is not None and scene.count(shape=qa.key.partition(":")[2]) > 1:
                asked.append(qa)
                assert qa.answer == _truth(scene, qa.key) and qa.answer in qa.sentence
                assert any(p in qa.question for p in PLURALS.values()), qa.question
    assert len(asked) > 20 and len({qa.question for qa in asked}) > 10
    assert min(small) < 0.06  # the first edition's smallest: 0.065 of the long side
    heldout = {t.lower() for ts in HELDOUT_TEMPLATES.values() for t in ts}
    assert not heldout & {t.lower() for t in VARIED_2_TRAINING_TEMPLATES["color_group"]}
    for i in range(200):
        rng, scene = train_scene(SEED, i, world="varied")
        qa = make_qa(rng, scene, "color", pool=VARIED_TRAINING_TEMPLATES)
        assert qa is None or scene.count(shape=qa.key.partition(":")[2]) == 1
