"""Synthetic benchmarks, part 1: shared helpers and the short-answer formats (POPE, VQAv2, GQA).

Each writer takes a `Bench` (its folder, seed, size) and writes the real benchmark's files, so
that the project's answerer and scorer for that benchmark run on them unchanged. Scenes and
questions come from the synthetic world (`sample_scene`, `make_qa`); only the file formats are
new here. `llava.data.synth_benchmarks` calls the writers and writes the suite file.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llava.data.synth import answer_vocab, ask, image_bytes, scene_where
from llava.data.synth_scene import PLURALS, Scene
from llava.data.synth_text import QA, TEMPLATES, count_word, make_qa

# The canonical position question, as a pattern that gives back its two object names.
_POSITION = re.compile(
    re.escape(TEMPLATES["position"][0]).replace(r"\{a\}", "(.+)").replace(r"\{b\}", "(.+)") + "$")


# -- helpers shared by every writer -------------------------------------------------------------------


def subject(qa: QA) -> str:
    """What a question is about, from its key: 'star' for "color:star", 'red star' for "exist:red star"."""
    return qa.key.split(":", 1)[1]


def position_names(qa: QA) -> tuple[str, str]:
    """(a, b) of a canonical "Is the a to the left or right of the b?" question."""
    match = _POSITION.match(qa.question)
    if match is None:
        raise ValueError(f"not a canonical position question: {qa.question!r}")
    return match.group(1), match.group(2)


def plural(noun: str, k: int) -> str:
    return noun if k == 1 else PLURALS.get(noun, noun + "s")


def sentence(qa: QA) -> str:
    """The answer as a full sentence (GQA's fullAnswer, judged benchmarks' references)."""
    about, answer = subject(qa) if ":" in qa.key else "", qa.answer
    if qa.category == "color":
        return f"The {about} is {answer}."
    if qa.category == "shape":
        return f"The {about} object is a {answer}."
    if qa.category == "count":
        k = int(answer)
        return f"There {'is' if k == 1 else 'are'} {count_word(k)} {plural(about, k)}."
    if qa.category == "exist":
        return f"Yes, there is a {about} in the image." if answer == "Yes" else f"No, there is no {about} in the image."
    if qa.category == "position":
        a, b = position_names(qa)
        return f"The {a} is to the {answer} of the {b}."
    return f"The word '{answer}' is written in the image."


@dataclass
class Bench:
    """One benchmark being written: its folder, seed, size, and a private random stream per item."""

    name: str
    root: Path
    seed: int
    n: int
    image_size: int

    def rng(self, *index: object) -> random.Random:
        # String seeds are hashed (SHA-512): stable across runs, and apart from the training/eval streams.
        return random.Random(f"llava-synth-bench:{self.seed}:{self.name}:" + ":".join(map(str, index)))

    def item(self, i: int, categories: tuple[str, ...]) -> tuple[random.Random, Scene, QA]:
        """Question i: category i % len(categories), its answer cycling through the category's vocabulary."""
        category = categories[i % len(categories)]
        vocab = answer_vocab(category)
        rng = self.rng(i)
        scene, qa = ask(rng, self.image_size, category, vocab[(i // len(categories)) % len(vocab)])
        return rng, scene, qa

    def png(self, rel: str, scene: Scene) -> bytes:
        data = image_bytes(scene)
        self.write(rel, data)
        return data

    def write(self, rel: str, data: str | bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)

    def json(self, rel: str, data: Any) -> None:
        self.write(rel, json.dumps(data, indent=1, ensure_ascii=False) + "\n")

    def jsonl(self, rel: str, rows: list[dict]) -> None:
        self.write(rel, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# -- POPE ---------------------------------------------------------------------------------------------

POPE_CATEGORIES = ("adversarial", "popular", "random")


def _pope_fits(category: str, scene: Scene, no: QA) -> bool:
    """Negatives by category: adversarial names a shape that IS in the scene (in another colour),
    popular a colour that is in it, random whatever `exist_qa` picks."""
    color, shape = subject(no).split(" ")
    if category == "adversarial":
        return scene.count(shape=shape) > 0
    return category == "random" or scene.count(color=color) > 0


def _pope_pair(category: str) -> Callable[[random.Random, Scene], tuple[QA, QA] | None]:
    def build(rng: random.Random, scene: Scene) -> tuple[QA, QA] | None:
        yes = make_qa(rng, scene, "exist", "Yes", canonical=True)
        for _ in range(20):
            no = make_qa(rng, scene, "exist", "No", canonical=True)
            if yes and no and _pope_fits(category, scene, no):
                return yes, no
        return None
    return build


def write_pope(b: Bench) -> int:
    """`llava_pope_test.jsonl` + `annotations/coco_pope_{category}.json` (labels in question order)."""
    per_category = max(1, round(b.n / 6))  # images per category, one yes and one no question each
    questions: list[dict] = []
    for category in POPE_CATEGORIES:
        labels = []
        for j in range(per_category):
            rng = b.rng(category, j)
            scene, pair = scene_where(rng, b.image_size, _pope_pair(category))
            image = f"{len(questions) // 2:06d}.png"
            b.png(f"images/{image}", scene)
            for qa in (pair if rng.random() < 0.5 else pair[::-1]):
                qid = len(questions) + 1
                questions.append({"question_id": qid, "image": image, "text": qa.text, "category": category})
                labels.append({"question_id": qid, "image": image, "text": qa.question, "label": qa.answer.lower()})
        b.jsonl(f"annotations/coco_pope_{category}.json", labels)
    b.jsonl("llava_pope_test.jsonl", questions)
    return len(questions)


# -- VQAv2 --------------------------------------------------------------------------------------------

VQA_CATEGORIES = ("color", "shape", "count", "exist", "position", "word")
_VQA_TYPES = {"color": ("what color is the", "other"), "shape": ("what shape is the", "other"),
              "count": ("how many", "number"), "exist": ("is there a", "yes/no"),
              "position": ("is the", "other"), "word": ("what word is", "other")}


def answer_variants(qa: QA) -> tuple[list[str], list[str]]:
    """(answers a VQA normaliser maps to the canonical one, other answers a person might give)."""
    answer, about = qa.answer.lower(), subject(qa) if ":" in qa.key else ""
    if qa.category == "count":
        k = int(answer)
        return [count_word(k), count_word(k).capitalize()], [f"{k} {plural(about, k)}", f"{count_word(k)} of them"]
    if qa.category == "exist":
        return [answer.capitalize(), f"{answer}."], (["yes, there is", "i think so"] if answer == "yes"
                                                     else ["no, there is not", "nope"])
    if qa.category == "position":
        return [answer.capitalize(), f"{answer}."], [f"on the {answer}", f"to the {answer}"]
    if qa.category == "word":
        return [answer.upper(), f"the {answer}"], [f"the word {answer}", f"{answer} sign"]
    if qa.category == "color":
        return [answer.capitalize(), f"{answer}."], [f"a {answer} {about}", f"dark {answer}"]
    return [answer.capitalize(), f"a {answer}"], [PLURALS[answer], f"{about} {answer}"]


def vqa_answers(rng: random.Random, qa: QA) -> list[str]:
    """Ten human answers: 4 canonical + 3 equivalent spellings (so the canonical answer scores 100%)
    + 3 other phrasings (each scores at most 90%), in random order."""
    same, other = answer_variants(qa)
    answers = [qa.answer.lower()] * 4 + [rng.choice(same) for _ in range(3)] + [rng.choice(other) for _ in range(3)]
    rng.shuffle(answers)
    return answers


def write_vqav2(b: Bench) -> int:
    """LLaVA's test-dev question JSONL (and the full test2015 list the converter needs) plus
    VQA-style questions and annotations with ten answers each, for the converter's local accuracy."""
    questions, vqa_questions, annotations = [], [], []
    for i in range(b.n):
        rng, scene, qa = b.item(i, VQA_CATEGORIES)
        image_id = i + 1
        qid = image_id * 1000
        image = f"COCO_test2015_{image_id:012d}.png"
        b.png(f"test2015/{image}", scene)
        questions.append({"question_id": qid, "image": image, "text": qa.text, "category": "default"})
        vqa_questions.append({"image_id": image_id, "question": qa.question, "question_id": qid})
        question_type, answer_type = _VQA_TYPES[qa.category]
        annotations.append({
            "question_id": qid, "image_id": image_id, "question_type": question_type, "answer_type": answer_type,
            "multiple_choice_answer": qa.answer.lower(),
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                        for k, a in enumerate(vqa_answers(rng, qa))]})
    b.jsonl("llava_vqav2_mscoco_test-dev2015.jsonl", questions)
    b.jsonl("llava_vqav2_mscoco_test2015.jsonl", questions)
    b.json("v2_OpenEnded_mscoco_test-dev2015_questions.json",
           {"task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "test-dev2015",
            "questions": vqa_questions})
    b.json("v2_mscoco_test-dev2015_annotations.json", {"data_type": "mscoco", "data_subtype": "test-dev2015",
                                                      "annotations": annotations})
    return len(questions)


# -- GQA ----------------------------------------------------------------------------------------------

GQA_CATEGORIES = ("color", "shape", "exist", "position")
# category -> (structural, semantic, detailed type, global answer group)
_GQA_TYPES = {"color": ("query", "attr", "queryAttr", "color"), "shape": ("query", "cat", "categoryThat", "shape"),
              "exist": ("verify", "obj", "existAttr", None), "position": ("choose", "rel", "relChooser", None)}


def _op(operation: str, argument: str, *dependencies: int) -> dict:
    return {"operation": operation, "dependencies": list(dependencies), "argument": argument}


def gqa_semantic(qa: QA) -> list[dict]:
    """The question's functional program, GQA style (the scorer counts its reasoning steps)."""
    about = subject(qa)
    if qa.category == "color":
        return [_op("select", f"{about} (0)"), _op("query", "color", 0)]
    if qa.category == "shape":
        return [_op("select", "object (0)"), _op("filter color", about, 0), _op("query", "name", 1)]
    if qa.category == "exist":
        color, shape = about.split(" ")
        return [_op("select", f"{shape} (0)"), _op("filter color", color, 0), _op("exist", "?", 1)]
    a, b = position_names(qa)
    return [_op("select", f"{a} (0)"), _op("select", f"{b} (1)"),
            _op("choose rel", "to the left of|to the right of", 0, 1)]


def write_gqa(b: Bench) -> int:
    """LLaVA's `llava_gqa_testdev_balanced.jsonl` + GQA's `testdev_balanced_questions.json` (answers
    lowercase, as GQA's; exact match after LLaVA's `rstrip('.').lower()`)."""
    questions, gqa = [], {}
    for i in range(b.n):
        _, scene, qa = b.item(i, GQA_CATEGORIES)
        qid, image_id = f"{20100000 + i}", f"n{100000 + i}"
        b.png(f"images/{image_id}.png", scene)
        questions.append({"question_id": qid, "image": f"{image_id}.png", "text": qa.text})
        structural, semantic, detailed, group = _GQA_TYPES[qa.category]
        program = gqa_semantic(qa)
        gqa[qid] = {
            "semantic": program, "entailed": [], "equivalent": [qid], "question": qa.question,
            "imageId": image_id, "isBalanced": True, "groups": {"global": group, "local": f"10q-{qa.key}"},
            "answer": qa.answer.lower(),
            "semanticStr": " -> ".join(f"{o['operation']}: {o['argument']}" for o in program),
            "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
            "types": {"structural": structural, "semantic": semantic, "detailed": detailed},
            "fullAnswer": sentence(qa)}
    b.jsonl("llava_gqa_testdev_balanced.jsonl", questions)
    b.json("testdev_balanced_questions.json", gqa)
    return len(questions)
