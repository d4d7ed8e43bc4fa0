"""The synthetic world (llava.data.synth) and its scorer (llava.eval.synth).

Answers are re-derived here from the saved scenes with independent code (regexes over the
question text), so a bug in the question writers cannot hide behind itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from llava.data.synth import answer_vocab, generate
from llava.data.synth_cli import add_synth_command
from llava.data.synth_scene import COLORS, PLURALS, SHAPES, WORDS, Scene, render, sample_scene
from llava.data.synth_text import CATEGORIES, MC_SUFFIX, MIN_DX, SHORT_SUFFIX, TEMPLATES, conversation, count_word
from llava.eval.synth import (chance_levels, check_targets, evaluate, grounding_check, load_questions,
                              normalize_answer, score)
from llava.train.data import load_records, validate_record

SEED, N, EVAL_N = 3, 24, 70


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate(out, seed=SEED, n=N, eval_n=EVAL_N)
    return out


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _scenes(root: Path) -> dict[str, Scene]:
    return {row["image"]: Scene.from_dict(row["scene"]) for row in load_records(root / "scenes.jsonl")}


# -- generation -------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_differs(synth, tmp_path):
    generate(tmp_path / "again", seed=SEED, n=N, eval_n=EVAL_N)
    assert _files(tmp_path / "again") == _files(synth)
    generate(tmp_path / "other", seed=SEED + 1, n=N, eval_n=EVAL_N)
    other, same = _files(tmp_path / "other"), _files(synth)
    for name in ("pretrain.json", "instruct.json", "eval.jsonl", "images/000000.png", "images/eval_00000.png"):
        assert other[name] != same[name], name


def test_smaller_set_is_a_prefix(synth, tmp_path):
    generate(tmp_path / "small", seed=SEED, n=5, eval_n=7)
    small, big = _files(tmp_path / "small"), _files(synth)
    assert all(small[f"images/{i:06d}.png"] == big[f"images/{i:06d}.png"] for i in range(5))
    assert load_records(tmp_path / "small" / "eval.jsonl") == load_records(synth / "eval.jsonl")[:7]


def test_simpler_world_has_fewer_objects_and_still_every_question(synth, tmp_path):
    """`max_objects` caps the objects a scene in training and eval data alike; the questions stay
    answerable from the scene and counts only go as high as the cap (that the default of 5 changes no
    byte of the eval set is pinned by test_shipped_model's check of the card's eval SHA-256)."""
    generate(tmp_path, seed=SEED, n=N, eval_n=EVAL_N, max_objects=2)
    assert json.loads((tmp_path / "meta.json").read_text())["vocab"]["max_objects"] == 2
    assert json.loads((synth / "meta.json").read_text())["vocab"]["max_objects"] == 5
    scenes = _scenes(tmp_path)
    assert {len(s.objects) for s in scenes.values()} == {1, 2}
    questions = load_questions(tmp_path / "eval.jsonl")
    assert {q["category"] for q in questions} == set(CATEGORIES)
    assert {q["answer"] for q in questions if q["category"] == "count"} == {"1", "2"} == set(answer_vocab("count", 2))
    for q in questions:
        if q["category"] == "mc":
            _check_mc(scenes[q["image"]], q["text"], q["answer"])
        else:
            assert _derive(scenes[q["image"]], q["text"][: -len(SHORT_SUFFIX)]) == q["answer"], q
    for bad in (1, 6):
        with pytest.raises(ValueError, match="max_objects"):
            generate(tmp_path / "bad", seed=SEED, n=1, eval_n=0, max_objects=bad)


def test_meta_records_hashes(synth):
    meta = json.loads((synth / "meta.json").read_text())
    assert (meta["seed"], meta["n"], meta["eval_n"], meta["image_size"]) == (SEED, N, EVAL_N, 96)
    for name, digest in meta["files"].items():
        assert hashlib.sha256((synth / name).read_bytes()).hexdigest() == digest
    assert meta["images"]["count"] == N + EVAL_N
    assert set(meta["vocab"]["shapes"]) == set(SHAPES) and set(meta["vocab"]["colors"]) == set(COLORS)


def test_every_row_is_valid_llava_data(synth):
    pretrain = load_records(synth / "pretrain.json")
    instruct = load_records(synth / "instruct.json")
    assert len(pretrain) == N and sum("image" in r for r in instruct) == N
    assert any("image" not in r for r in instruct), "some text-only chats"
    for i, rec in enumerate(pretrain + instruct):
        assert validate_record(rec, synth, index=i) == [], rec["id"]
    scenes = _scenes(synth)
    numbers = {"a": 1, "two": 2, "three": 3, "four": 4, "five": 5}
    for rec in pretrain:  # "a red circle and two blue squares on a white background[ with the word 'cat']"
        human, gpt = rec["conversations"]
        assert human["value"].startswith("<image>\n")
        scene = scenes[rec["image"]]
        objects, rest = gpt["value"].split(" on a ")
        assert rest.startswith(scene.background) and (f"'{scene.word}'" in rest) == bool(scene.word)
        assert sum(numbers[part.split()[0]] for part in re.split(r", | and ", objects)) == len(scene.objects)
    questions = load_questions(synth / "eval.jsonl")
    assert len(questions) == EVAL_N
    for q in questions:
        assert set(q) == {"question_id", "image", "text", "answer", "category"}
        assert (synth / q["image"]).is_file() and "<image>" not in q["text"]
    train_images = {r["image"] for r in pretrain}
    assert not train_images & {q["image"] for q in questions}, "eval images are held out"


# Independent re-derivation of eval answers from the scene.
_STEMS = [
    ("color", re.compile(r"^What color is the (\w+)\?$")),
    ("shape", re.compile(r"^What shape is the (\w+) object\?$")),
    ("count", re.compile(r"^How many (\w+) are there\?$")),
    ("exist", re.compile(r"^Is there a (\w+) (\w+) in the image\?$")),
    ("position", re.compile(r"^Is the (\w+) (\w+) to the left or right of the (\w+) (\w+)\?$")),
    ("word", re.compile(r"^What word is written in the image\?$")),
]
_SINGULAR = {v: k for k, v in PLURALS.items()}


def _only(objs: list, what: str):
    assert len(objs) == 1, f"'{what}' must name exactly one object, names {len(objs)}"
    return objs[0]


def _derive(scene: Scene, stem: str) -> str:
    for kind, pattern in _STEMS:
        m = pattern.match(stem)
        if not m:
            continue
        g = m.groups()
        if kind == "color":
            return _only([o for o in scene.objects if o.shape == g[0]], g[0]).color
        if kind == "shape":
            return _only([o for o in scene.objects if o.color == g[0]], g[0]).shape
        if kind == "count":
            k = sum(o.shape == _SINGULAR[g[0]] for o in scene.objects)
            assert 1 <= k <= 5
            return str(k)
        if kind == "exist":
            return "Yes" if any(o.color == g[0] and o.shape == g[1] for o in scene.objects) else "No"
        if kind == "position":
            a = _only([o for o in scene.objects if (o.color, o.shape) == g[:2]], " ".join(g[:2]))
            b = _only([o for o in scene.objects if (o.color, o.shape) == g[2:]], " ".join(g[2:]))
            assert abs(a.x - b.x) >= MIN_DX * scene.size
            return "left" if a.x < b.x else "right"
        assert scene.word is not None
        return scene.word
    raise AssertionError(f"unexpected question {stem!r}")


def test_eval_answers_follow_from_the_scene(synth):
    scenes = _scenes(synth)
    for q in load_questions(synth / "eval.jsonl"):
        scene = scenes[q["image"]]
        if q["category"] == "mc":
            _check_mc(scene, q["text"], q["answer"])
        else:
            assert q["text"].endswith(SHORT_SUFFIX)
            stem = q["text"][: -len(SHORT_SUFFIX)]
            assert q["category"] == next(kind for kind, p in _STEMS if p.match(stem))
            assert _derive(scene, stem) == q["answer"], q


def _canonical(stem: str) -> str:
    """The eval phrasing of a training paraphrase (matched against the template table)."""
    for variants in TEMPLATES.values():
        for v in variants:
            m = re.match("^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[\\w ]+?)", re.escape(v)) + "$", stem)
            if m:
                return variants[0].format(**m.groupdict())
    raise AssertionError(f"unexpected question {stem!r}")


def _check_mc(scene: Scene, text: str, answer: str) -> None:
    assert text.endswith(MC_SUFFIX)
    stem, *options = text[: -len(MC_SUFFIX)].split("\n")
    assert [o[:3] for o in options] == ["A. ", "B. ", "C. ", "D. "]
    values = [o[3:] for o in options]
    truth = _derive(scene, _canonical(stem))
    assert values.count(truth) == 1 and len(set(values)) == 4
    assert answer == "ABCD"[values.index(truth)]


def test_instruct_answers_follow_from_the_scene(synth):
    scenes = _scenes(synth)
    checked = Counter()
    for rec in load_records(synth / "instruct.json"):
        if "image" not in rec:
            continue
        scene = scenes[rec["image"]]
        conv = rec["conversations"]
        for human, gpt in zip(conv[::2], conv[1::2]):
            text = human["value"].removeprefix("<image>\n")
            if text.endswith(MC_SUFFIX):
                _check_mc(scene, text, gpt["value"])
                checked["mc"] += 1
            elif text.endswith(SHORT_SUFFIX):
                assert _derive(scene, _canonical(text[: -len(SHORT_SUFFIX)])) == gpt["value"], (rec["id"], text)
                checked["short"] += 1
            else:  # a detailed description
                n = len(scene.objects)
                assert gpt["value"].startswith(f"There {'is' if n == 1 else 'are'} {count_word(n)} object")
                checked["detail"] += 1
    assert checked["short"] > 2 * N and checked["mc"] and checked["detail"]


_MIXES = {frozenset(("blue", "yellow")): "green", frozenset(("red", "blue")): "purple",
          frozenset(("red", "white")): "pink", frozenset(("black", "white")): "gray",
          frozenset(("red", "yellow")): "orange"}
_NUMBER_WORDS = {w: i for i, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                              "nine"])}


def _text_answer(question: str) -> str:
    """The answer to a text-only question, derived from its wording alone."""
    if m := re.fullmatch(r"What is (\d) (plus|minus) (\d)\?", question):
        a, b = int(m[1]), int(m[3])
        return str(a + b if m[2] == "plus" else a - b)
    if m := re.fullmatch(r"How many sides does a (\w+) have\?", question):
        return {"triangle": "3", "square": "4", "diamond": "4"}[m[1]]
    if m := re.fullmatch(r"What color do you get when you mix (\w+) and (\w+)\?", question):
        return _MIXES[frozenset((m[1], m[2]))]
    if m := re.fullmatch(r"Is (\w+) a color or a shape\?", question):
        return "color" if m[1] in COLORS else "shape"
    if m := re.fullmatch(r"What number comes after (\w+)\?", question):
        return str(_NUMBER_WORDS[m[1]] + 1)
    raise AssertionError(f"unknown text question {question!r}")


def test_text_only_multiple_choice_letters_name_the_right_answer(synth, tmp_path):
    """`text_mc` asks the image-free questions as lettered options (image mc's format); the
    image rows and the captions stay byte for byte those of a run without it."""
    generate(tmp_path, seed=SEED, n=N, eval_n=EVAL_N, text_only=60, text_mc=1.0)
    assert json.loads((tmp_path / "meta.json").read_text())["text_mc"] == 1.0
    assert (tmp_path / "pretrain.json").read_bytes() == (synth / "pretrain.json").read_bytes()
    records = load_records(tmp_path / "instruct.json")
    assert [r for r in records if "image" in r] == [r for r in load_records(synth / "instruct.json") if "image" in r]
    letters = Counter()
    for rec in (r for r in records if "image" not in r):
        assert validate_record(rec, check_images=False) == []
        conv = rec["conversations"]
        for human, gpt in zip(conv[::2], conv[1::2]):
            question, *options = human["value"].removesuffix(MC_SUFFIX).split("\n")
            assert human["value"].endswith(MC_SUFFIX) and [o[:3] for o in options] == ["A. ", "B. ", "C. ", "D. "]
            values = [o[3:] for o in options]
            assert len(set(values)) == 4 and values["ABCD".index(gpt["value"])] == _text_answer(question), rec
            letters[gpt["value"]] += 1
    assert sum(letters.values()) > 60 and set(letters) == set("ABCD")
    with pytest.raises(ValueError, match="text_mc"):
        generate(tmp_path / "bad", seed=SEED, n=1, eval_n=0, text_mc=1.5)


def test_pixels_match_the_scene(synth):
    for name, scene in _scenes(synth).items():
        img = np.asarray(PIL.Image.open(synth / name).convert("RGB"), dtype=int)
        assert img.shape == (scene.size, scene.size, 3)
        for o in scene.objects:
            assert np.abs(img[o.y, o.x] - COLORS[o.color]).max() <= 12, (name, o)
        if scene.word:  # dark text pixels inside the word's band only
            x0, y0, x1, y1 = scene.word_box
            assert (img[y0:y1, x0:x1].max(axis=2) < 60).sum() > 30


def test_eval_is_balanced(synth):
    questions = load_questions(synth / "eval.jsonl")
    per = Counter(q["category"] for q in questions)
    assert set(per) == set(CATEGORIES) and max(per.values()) - min(per.values()) <= 1
    for cat in CATEGORIES:
        answers = Counter(q["answer"] for q in questions if q["category"] == cat)
        assert set(answers) <= set(answer_vocab(cat))
        assert max(answers.values()) - min(answers.values()) <= 1 or len(answers) < len(answer_vocab(cat))
    exist = Counter(q["answer"] for q in questions if q["category"] == "exist")
    assert exist["Yes"] == exist["No"]


def test_training_questions_are_balanced():
    answers: dict[str, Counter] = {"exist": Counter(), "position": Counter(), "mc": Counter()}
    for i in range(400):
        rng = random.Random(i)
        for q, a in conversation(rng, sample_scene(rng, 96)):
            kind = "mc" if q.endswith(MC_SUFFIX) else "position" if "left or" in q else \
                "exist" if a in ("Yes", "No") else None
            if kind:
                answers[kind][a] += 1
    for kind, counts in answers.items():
        shares = [v / sum(counts.values()) for v in counts.values()]
        assert min(shares) > 0.7 / len(counts), (kind, counts)  # deterministic; a skew would be far lower


def test_a_scene_with_no_unambiguous_question_still_gets_a_conversation():
    # four triangles in two colours, no word: every colour / shape / position question is ambiguous
    # (training row 14671 of seed 0 once came out empty and stopped `llava train` at its data check)
    scene = Scene.from_dict({"size": 96, "background": "light gray", "gradient": -18, "word": None,
                             "word_box": None, "word_place": None, "objects": [
                                 {"shape": "triangle", "color": c, "size": z, "x": x, "y": y, "radius": r}
                                 for c, z, x, y, r in [("pink", "small", 20, 84, 8), ("blue", "small", 55, 49, 8),
                                                       ("blue", "large", 78, 77, 12), ("pink", "large", 37, 19, 12)]]})
    for i in range(50):
        turns = conversation(random.Random(i), scene)
        assert turns and all(q and a for q, a in turns)


def test_render_is_deterministic_and_every_shape_and_word_fit():
    rng = random.Random(0)
    for k in range(1, 6):
        for shape in SHAPES:
            scene = sample_scene(rng, 64, count=k, shape=shape, word=True)
            assert scene.count(shape=shape) == k and scene.word in WORDS
            boxes = [o.bbox for o in scene.objects]
            for i, a in enumerate(boxes):
                assert 0 <= a[0] and a[2] <= 64 and 0 <= a[1] and a[3] <= 64
                o = scene.objects[i]  # shapes are drawn inside their circumscribed circles: disjoint
                assert all(math.dist((o.x, o.y), (p.x, p.y)) > o.radius + p.radius for p in scene.objects[i + 1:])
                assert a[1] >= scene.word_box[3] or a[3] <= scene.word_box[1], "shapes stay out of the word band"
            assert render(scene).tobytes() == render(Scene.from_dict(scene.to_dict())).tobytes()


def test_cli_registers_under_data(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    data = sub.add_parser("data").add_subparsers(dest="data_command")
    add_synth_command(data)
    args = parser.parse_args(["data", "synth", "--out", str(tmp_path), "--seed", "1", "--n", "3", "--eval-n", "7",
                              "--image-size", "64", "--text-only", "2", "--text-mc", "0.5",
                              "--max-objects", "3"])
    assert args.func(args) == 0
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert (meta["n"], meta["eval_n"], meta["image_size"], meta["text_only"], meta["text_mc"]) == (3, 7, 64, 2, 0.5)
    assert PIL.Image.open(tmp_path / "images" / "000000.png").size == (64, 64)
    assert meta["vocab"]["max_objects"] == 3


# -- scoring ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, category, expected", [
    ("Yes.", None, "yes"), ("YES", "exist", "yes"), ("No, there is not.", "exist", "no"),
    ("There is not one", "exist", "no"), ("Three", "count", "3"), ("3.", "count", "3"),
    ("There are 4 stars.", "count", "4"), ("two", None, "2"), ("Red.", None, "red"), ("the circle", None, "circle"),
    ("'cat'", None, "cat"), ("  left\nbecause...", None, "left"), ("grey", None, "gray"),
    ("B", "mc", "B"), ("B.", "mc", "B"), ("(C) red", "mc", "C"), ("A. blue", "mc", "A"), ("d", "mc", "D"),
    ("The answer is D.", "mc", "D"), ("a circle", "mc", "circle"), ("", None, ""),
])
def test_normalize_answer(text, category, expected):
    assert normalize_answer(text, category) == expected


def _questions() -> list[dict]:
    return [{"question_id": i, "image": f"images/eval_{i:05d}.png", "text": "?", "answer": a, "category": c}
            for i, (c, a) in enumerate([("color", "red"), ("color", "blue"), ("exist", "Yes"), ("exist", "No"),
                                        ("exist", "Yes"), ("exist", "No"), ("mc", "A"), ("mc", "C")])]


def test_score_perfect_missing_and_pope_metrics():
    qs = _questions()
    perfect = score(qs, {q["question_id"]: q["answer"] + "." for q in qs})
    assert perfect["overall"] == 100.0 and perfect["missing"] == 0
    assert all(v == 100.0 for v in perfect["accuracy"].values())
    assert perfect["exist"]["f1"] == 1.0 and perfect["exist"]["yes_ratio"] == 0.5
    answers = {0: "red", 2: "yes", 3: "yes", 4: "no", 5: "no", 6: "A"}  # 1 and 7 missing
    r = score(qs, {str(k): v for k, v in answers.items()})  # string ids work too
    assert r["missing"] == 2
    assert r["categories"]["color"] == {"accuracy": 50.0, "n": 2, "correct": 1, "missing": 1, "answered": 1}
    assert r["exist"] == {"accuracy": 50.0, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5}
    assert r["overall"] == pytest.approx(100 * 4 / 8)


def test_score_on_eval_set_perfect_and_constant(synth):
    questions = load_questions(synth / "eval.jsonl")
    perfect = score(questions, {q["question_id"]: q["answer"] for q in questions})
    assert perfect["overall"] == 100.0 and all(c["ok"] for c in check_targets(perfect).values())
    chance = chance_levels(questions)
    assert chance["exist"] == 50.0 and chance["position"] == 50.0
    for answer_of in (lambda c: answer_vocab(c)[0], lambda c: answer_vocab(c)[-1]):
        const = score(questions, {q["question_id"]: answer_of(q["category"]) for q in questions})
        for cat in CATEGORIES:
            assert const["accuracy"][cat] <= chance[cat] + 1e-9
            assert const["accuracy"][cat] >= 100 / len(answer_vocab(cat)) - 15
        assert not check_targets(const)["exist_f1"]["ok"]


def test_grounding_check_counts_guesses_not_declines():
    """On blank pictures, accuracy among the answers from the category's set must lie within 10 points
    of chance either way; an answer outside the set (a decline) is no guess, and few guesses pass."""
    qs = [{"question_id": i, "category": "position", "answer": "left" if i % 2 else "right"} for i in range(40)]
    chance = chance_levels(qs)
    assert chance["position"] == 50.0

    def check(answer_of):
        result = score(qs, {q["question_id"]: answer_of(q) for q in qs})
        return grounding_check(result, chance)["position"]

    always_left = check(lambda q: "Left.")  # a side prior that is no better than chance: fine
    assert always_left["ok"] and always_left["answered"] == 40 and always_left["answered_accuracy"] == 50.0
    assert not check(lambda q: q["answer"])["ok"]  # answers without a picture: it does not look
    assert not check(lambda q: "right" if q["answer"] == "left" else "left")["ok"]  # the question leaks, inverted
    # 22 declines, 18 guesses of which 9 right: declines are not counted against it
    declining = check(lambda q: "No." if q["question_id"] < 22 else ("left" if q["question_id"] < 30 else "right"))
    assert declining["ok"] and declining["answered"] == 18 and declining["accuracy"] < 40
    assert declining["answered_accuracy"] == 50.0
    # a prior among few guesses cannot be told from noise: too few to fail
    assert check(lambda q: q["answer"] if q["question_id"] < 5 else "none")["ok"]
    assert not grounding_check(score(qs, {q["question_id"]: q["answer"] if q["question_id"] < 12 else "none"
                                          for q in qs}), chance)["position"]["ok"]


class _StubPipe:
    """Answers from the ground truth (decorated, to exercise normalisation); nothing on blank images."""

    name = "stub"

    def __init__(self, questions: list[dict], image_folder: Path) -> None:
        self.truth = {(q["text"], str(image_folder / q["image"])): q for q in questions}
        self.calls: list[dict] = []

    def generate(self, prompts, images=None, **sampling):
        self.calls.append({"n": len(prompts), "images": list(images), **sampling})
        out = []
        for text, image in zip(prompts, images):
            if isinstance(image, PIL.Image.Image):
                assert image.size == (96, 96) and image.getextrema() == ((255, 255),) * 3
                out.append("No")
                continue
            q = self.truth[(text, str(image))]
            answer = q["answer"]
            out.append({"count": f"{answer} ", "exist": answer + ".", "mc": f"{answer}."}.get(q["category"],
                                                                                               answer.capitalize()))
        return out


def test_evaluate_with_a_stub_pipe(synth, tmp_path):
    questions = load_questions(synth / "eval.jsonl")
    pipe = _StubPipe(questions, synth)
    result = evaluate(pipe, synth / "eval.jsonl", synth, batch_size=16, answers_file=tmp_path / "a" / "answers.jsonl")
    assert result["overall"] == 100.0 and result["n"] == EVAL_N and result["model_id"] == "stub"
    assert [c["n"] for c in pipe.calls] == [16, 16, 16, 16, 6]
    assert all(c["temperature"] == 0 and c["max_new_tokens"] == 8 for c in pipe.calls)
    rows = load_records(tmp_path / "a" / "answers.jsonl")
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in questions]
    assert set(rows[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert rows[0]["prompt"] == questions[0]["text"] and len({r["answer_id"] for r in rows}) == len(rows)

    blind = evaluate(pipe, synth / "eval.jsonl", synth, blank_images=True)
    assert blind["blank_images"] and blind["accuracy"]["exist"] == 50.0 and blind["exist"]["yes_ratio"] == 0.0
    assert blind["overall"] <= blind["chance"]["overall"]
    assert blind["answered"]["exist"] == blind["categories"]["exist"]["n"] and blind["answered"]["color"] == 0
    assert all(c["ok"] for c in grounding_check(blind, blind["chance"]).values())  # it declines or says "No"
