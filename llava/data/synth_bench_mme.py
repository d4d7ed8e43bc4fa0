"""Synthetic benchmarks, MME: the release folder of yes/no question pairs, one pair per image.

MME's scorer reads a ground-truth file for every one of its 14 subtasks, so all 14 are here; the
ones with no counterpart in this world ask the nearest thing (see `MME_SUBTASKS`). Built like the
other formats (`llava.data.synth_bench_short`).
"""

from __future__ import annotations

import random
from typing import Any, Callable

from llava.data.synth import answer_vocab, scene_where
from llava.data.synth_bench_short import Bench, position_names, subject
from llava.data.synth_scene import BACKGROUNDS, PLURALS, Scene, sample_scene
from llava.data.synth_text import SHORT_SUFFIX, caption, make_qa

MME_RELEASE = "MME_Benchmark_release_version"
MME_YES_NO = " Please answer yes or no."
# Subtasks whose real release keeps images in images/ and ground truth in questions_answers_YN/.
MME_NESTED = ("artwork", "celebrity", "landmark", "posters", "scene")
FRENCH = {"cat": "chat", "dog": "chien", "sun": "soleil", "car": "voiture", "tree": "arbre", "book": "livre",
          "fish": "poisson", "bird": "oiseau", "cup": "tasse", "hat": "chapeau", "key": "clé", "moon": "lune"}
SIDES = {"triangle": 3, "square": 4, "diamond": 4}
Pair = tuple[str, str]  # (the question whose answer is yes, the one whose answer is no), about one image
Builder = Callable[[random.Random, Scene], Any]


def _other(rng: random.Random, options: list[str], value: str) -> str:
    return rng.choice([o for o in options if o != value])


def _qa_pair(category: str, template: str, options: list[str]) -> Builder:
    """Ask a world question's fact as yes/no: `template` filled with the true answer, then a wrong one."""
    def build(rng: random.Random, scene: Scene) -> Pair | None:
        qa = make_qa(rng, scene, category, canonical=True)
        if qa is None:
            return None
        about = subject(qa) if ":" in qa.key else ""

        def fill(answer: str) -> str:
            return template.format(about=about, plural=PLURALS.get(about, about), answer=answer)
        return fill(qa.answer), fill(_other(rng, options, qa.answer))
    return build


def _scene_pair(fact: Callable[[Scene], str | None], template: str, options: list[str]) -> Builder:
    """A yes/no pair about a fact of the scene itself (its background, where its word is, ...)."""
    def build(rng: random.Random, scene: Scene) -> Pair | None:
        value = fact(scene)
        return None if value is None else (template.format(value), template.format(_other(rng, options, value)))
    return build


def _mme_existence(rng: random.Random, scene: Scene) -> Pair | None:
    yes, no = make_qa(rng, scene, "exist", "Yes", canonical=True), make_qa(rng, scene, "exist", "No", canonical=True)
    return (yes.question, no.question) if yes and no else None


def _mme_position(rng: random.Random, scene: Scene) -> Pair | None:
    qa = make_qa(rng, scene, "position", canonical=True)
    if qa is None:
        return None
    (a, b), side = position_names(qa), qa.answer
    other = _other(rng, ["left", "right"], side)
    return f"Is the {a} on the {side} of the {b}?", f"Is the {a} on the {other} of the {b}?"


def _mme_size(rng: random.Random, scene: Scene) -> Pair | None:
    named = [o for o in scene.objects if scene.count(shape=o.shape, color=o.color) == 1]
    if not named:
        return None
    o = rng.choice(named)
    return f"Is the {o.name} {o.size}?", f"Is the {o.name} {_other(rng, ['small', 'large'], o.size)}?"


def _mme_caption(rng: random.Random, scene: Scene) -> Pair | None:
    mine, other = caption(scene), caption(sample_scene(rng, scene.size))
    return None if mine == other else (f"Does this picture show {mine}?", f"Does this picture show {other}?")


def _mme_sides(rng: random.Random, scene: Scene) -> Pair | None:
    qa = make_qa(rng, scene, "shape", canonical=True)
    if qa is None or qa.answer not in SIDES:
        return None
    k = str(SIDES[qa.answer])
    right, wrong = (f"Does the {subject(qa)} object have {n} sides?" for n in (k, _other(rng, ["3", "4", "5", "6"], k)))
    return right, wrong


def _mme_sum(rng: random.Random, scene: Scene) -> Pair | None:
    total, m = len(scene.objects), rng.randint(1, 4)
    right, wrong = (f"Is the number of objects in the image plus {m} equal to {t}?"
                    for t in (total + m, total + m + rng.choice((-1, 1))))
    return right, wrong


# subtask -> (builder of its yes/no pair, hints for the scene sampler). Every one of MME's 14 subtasks
# is here because the MME scorer needs a file for each; those with no counterpart in this world get
# the nearest thing (documented in llava.data.synth_benchmarks).
MME_SUBTASKS: dict[str, tuple[Builder, dict]] = {
    "existence": (_mme_existence, {}),
    "count": (_qa_pair("count", "Is the number of {plural} in the image {answer}?", answer_vocab("count")), {}),
    "position": (_mme_position, {}),
    "color": (_qa_pair("color", "Is the {about} {answer}?", answer_vocab("color")), {}),
    "posters": (_mme_caption, {}),
    "celebrity": (_qa_pair("shape", "Is the {about} object a {answer}?", answer_vocab("shape")), {}),
    "scene": (_scene_pair(lambda s: s.background, "Is the background of this image {}?",
                          list(BACKGROUNDS)), {}),
    "landmark": (_scene_pair(lambda s: s.word_place, "Is the word written at the {} of the image?",
                             ["top", "bottom"]), {"word": True}),
    "artwork": (_mme_size, {}),
    "OCR": (_qa_pair("word", 'Is the word in the image "{answer}"?', answer_vocab("word")), {"word": True}),
    "commonsense_reasoning": (_mme_sides, {}),
    "numerical_calculation": (_mme_sum, {}),
    "text_translation": (_scene_pair(lambda s: FRENCH[s.word] if s.word else None,
                                     'Does the word in the image mean "{}" in French?', list(FRENCH.values())),
                         {"word": True}),
    "code_reasoning": (_scene_pair(lambda s: str(len(s.word)) if s.word else None,
                                   "If word is the word in the image, does print(len(word)) print {}?",
                                   ["2", "3", "4", "5"]), {"word": True}),
}


def write_mme(b: Bench) -> int:
    """The MME release folder (per image: the png and a two-line `question\\tYes|No` file; the five
    "nested" subtasks in images/ + questions_answers_YN/, as the real release) + `llava_mme.jsonl`.

    At least one image per subtask (so >= 28 questions). Question ids are `{image}#1`/`#2`: the
    answerer wants unique ids and the MME converter reads the ground-truth file name up to the first '.'.
    """
    tasks = list(MME_SUBTASKS)
    rows = []
    for j in range(max(len(tasks), b.n // 2)):
        task = tasks[j % len(tasks)]
        build, hints = MME_SUBTASKS[task]
        scene, (yes, no) = scene_where(b.rng(task, j), b.image_size, build, **hints)
        stem, nested = f"{j:04d}", task in MME_NESTED
        image = f"{task}/images/{stem}.png" if nested else f"{task}/{stem}.png"
        b.png(f"{MME_RELEASE}/{image}", scene)
        truth = f"{task}/questions_answers_YN/{stem}.txt" if nested else f"{task}/{stem}.txt"
        b.write(f"{MME_RELEASE}/{truth}", f"{yes}{MME_YES_NO}\tYes\n{no}{MME_YES_NO}\tNo\n")
        for k, question in enumerate((yes, no), 1):
            rows.append({"question_id": f"{image}#{k}", "image": image, "text": question + MME_YES_NO + SHORT_SUFFIX,
                         "category": task})
    b.jsonl("llava_mme.jsonl", rows)
    return len(rows)
