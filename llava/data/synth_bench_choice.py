"""Synthetic benchmarks, part 2: the multiple-choice formats (ScienceQA, MMBench, SEED-Bench) and
the judged ones (LLaVA-Bench in-the-wild, MM-Vet), built like part 1 (`llava.data.synth_bench_short`)."""

from __future__ import annotations

import base64
import csv
import io
import random

from llava.data.synth import answer_vocab, ask, image_bytes
from llava.data.synth_bench_short import Bench, plural, sentence, subject
from llava.data.synth_scene import Scene, sample_scene
from llava.data.synth_text import (
    DETAIL_PROMPTS,
    LETTERS,
    MC_SUFFIX,
    QA,
    count_word,
    description,
    make_qa,
    text_mc,
    text_qa,
)


def choices(rng: random.Random, qa: QA, at: int, n: int = len(LETTERS)) -> tuple[list[str], int]:
    """Options for a world question: its answer at index `at % k` among k = min(n, vocabulary size)
    options, the others drawn from the category's vocabulary (left/right questions get two)."""
    vocab = answer_vocab(qa.category)
    k = min(n, len(vocab))
    options = rng.sample([v for v in vocab if v != qa.answer], k - 1)
    options.insert(at % k, qa.answer)
    return options, at % k


def lettered(question: str, options: list[str]) -> str:
    """`question` then one "A. option" line each: how MMBench's answerer and LLaVA's SEED file ask."""
    return "\n".join([question] + [f"{letter}. {option}" for letter, option in zip(LETTERS, options)])


# -- ScienceQA (SQA-IMG) ------------------------------------------------------------------------------

SQA_CATEGORIES = ("color", "shape", "count", "position", "word")


def _text_problem(rng: random.Random, at: int) -> tuple[str, list[str], int]:
    """A text-only problem from the world's general questions (as ScienceQA's image-free ones)."""
    question, short, _ = text_qa(rng)
    prompt, letter = text_mc(rng, question, short)
    options = [line[3:] for line in prompt.split("\n")[1:1 + len(LETTERS)]]  # "A. x" -> "x"
    return question, options, LETTERS.index(letter)


def _sqa_prompt(question: str, options: list[str], hint: str, image: bool) -> str:
    """The human turn of LLaVA's `llava_test_CQM-A.json` (the answerer moves <image> to the front)."""
    listed = " ".join(f"({letter}) {option}" for letter, option in zip(LETTERS, options))
    text = f"Context: {hint or 'N/A'}\nQuestion: {question}\nOptions: {listed}"
    return text + "\n<image>" if image else text


def write_scienceqa(b: Bench) -> int:
    """`problems.json`, `pid_splits.json`, `images/test/{pid}/image.png` and `llava_test_CQM-A.json`;
    every fourth problem is text-only (image null), so IMG-Accuracy covers the other three quarters."""
    problems, rows = {}, []
    for i in range(b.n):
        pid, with_image = str(i + 1), i % 4 != 3
        if with_image:
            rng, scene, qa = b.item(i, SQA_CATEGORIES)
            options, answer = choices(rng, qa, at=i)
            question, category = qa.question, qa.category
            b.png(f"images/test/{pid}/image.png", scene)
        else:
            question, options, answer = _text_problem(b.rng("text", i), at=i)
            category = "general knowledge"
        problems[pid] = {
            "question": question, "choices": options, "answer": answer, "hint": "",
            "image": "image.png" if with_image else None, "task": "closed choice", "grade": "grade2",
            "subject": "natural science", "topic": "shapes" if with_image else "general knowledge",
            "category": category,
            "skill": category, "lecture": "", "solution": "", "split": "test"}
        row = {"id": pid, "conversations": [
            {"from": "human", "value": _sqa_prompt(question, options, "", with_image)},
            {"from": "gpt", "value": f"The answer is {LETTERS[answer]}."}]}
        rows.append({**row, "image": f"{pid}/image.png"} if with_image else row)
    b.json("problems.json", problems)
    b.json("pid_splits.json", {"train": [], "val": [], "test": list(problems), "trainval": [], "minitrain": [],
                               "minival": [], "minitest": []})
    b.json("llava_test_CQM-A.json", rows)
    return len(rows)


# -- MMBench ------------------------------------------------------------------------------------------

MMBENCH_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "source", "l2-category",
                   "comment", "split", "image"]
# world category -> (MMBench category, l2-category)
MMBENCH_CATEGORIES = {
    "color": ("attribute_recognition", "finegrained_perception (instance-level)"),
    "shape": ("attribute_recognition", "finegrained_perception (instance-level)"),
    "count": ("object_localization", "finegrained_perception (instance-level)"),
    "word": ("ocr", "finegrained_perception (instance-level)"),
    "position": ("spatial_relationship", "finegrained_perception (cross-instance)"),
}


def write_mmbench(b: Bench) -> int:
    """`mmbench_dev_synth.tsv` (images base64 in the TSV). Left/right questions have two options
    (C, D empty), and every fourth question a hint. Circular evaluation needs no extra rows: the
    answerer's --all-rounds rotates the options and the scorer groups rounds by index."""
    out = io.StringIO()
    writer = csv.writer(out, delimiter="\t", lineterminator="\n")
    writer.writerow(MMBENCH_COLUMNS)
    for i in range(b.n):
        rng, scene, qa = b.item(i, tuple(MMBENCH_CATEGORIES))
        options, answer = choices(rng, qa, at=i)
        hint = f"The image has a {scene.background} background." if i % 4 == 3 else ""
        category, l2 = MMBENCH_CATEGORIES[qa.category]
        cells = options + [""] * (len(LETTERS) - len(options))
        image = base64.b64encode(image_bytes(scene)).decode("ascii")
        writer.writerow([i, qa.question, hint, *cells, LETTERS[answer], category, "synth", l2, "", "dev", image])
    b.write("mmbench_dev_synth.tsv", out.getvalue())
    return b.n


# -- SEED-Bench ---------------------------------------------------------------------------------------

SEED_QUESTION_TYPES = {
    "Scene Understanding": 1, "Instance Identity": 2, "Instance Attributes": 3, "Instance Location": 4,
    "Instances Counting": 5, "Spatial Relation": 6, "Instance Interaction": 7, "Visual Reasoning": 8,
    "Text Understanding": 9, "Action Recognition": 10, "Action Prediction": 11, "Procedure Understanding": 12,
}
SEED_CATEGORIES = {"color": "Instance Attributes", "shape": "Instance Identity", "count": "Instances Counting",
                   "word": "Text Understanding"}


def write_seed(b: Bench) -> int:
    """`SEED-Bench.json` (question_type + questions with choice_a..d and the answer letter),
    `SEED-Bench-image/` and LLaVA's `llava-seed-bench.jsonl` (options and letter suffix in the text)."""
    questions, rows = [], []
    for i in range(b.n):
        rng, scene, qa = b.item(i, tuple(SEED_CATEGORIES))
        options, answer = choices(rng, qa, at=i)
        qid, data_id, kind = str(i), f"synth_{i:05d}.png", SEED_CATEGORIES[qa.category]
        b.png(f"SEED-Bench-image/{data_id}", scene)
        questions.append({"answer": LETTERS[answer], **{f"choice_{c.lower()}": o for c, o in zip(LETTERS, options)},
                          "data_id": data_id, "data_type": "image", "question": qa.question, "question_id": qid,
                          "question_type_id": SEED_QUESTION_TYPES[kind]})
        rows.append({"image": f"SEED-Bench-image/{data_id}", "text": lettered(qa.question, options) + MC_SUFFIX,
                     "category": kind, "question_id": qid})
    b.json("SEED-Bench.json", {"question_type": SEED_QUESTION_TYPES, "questions": questions})
    b.jsonl("llava-seed-bench.jsonl", rows)
    return len(rows)


# -- LLaVA-Bench (in-the-wild) ------------------------------------------------------------------------

CONV_CATEGORIES = ("color", "shape", "count", "exist", "word")


def _complex(rng: random.Random, scene: Scene) -> tuple[str, str]:
    """A two-step question (count, then subtract) and its reasoned reference answer."""
    qa = make_qa(rng, scene, "count", canonical=True)
    shape, k, n = subject(qa), int(qa.answer), len(scene.objects)
    question = f"If all the {plural(shape, 2)} were removed, how many objects would be left in the image?"
    answer = (f"The image has {count_word(n)} {plural('object', n)}, and {count_word(k)} of them "
              f"{'is a' if k == 1 else 'are'} {plural(shape, k)}. Without {'it' if k == 1 else 'them'}, "
              f"{count_word(n - k)} would be left.")
    return question, answer


def write_llava_bench(b: Bench) -> int:
    """`questions.jsonl` (conv/detail/complex about each image), `context.jsonl` (each image's
    description, the judge's context) and `answers_gpt4.jsonl` (references from the ground truth)."""
    questions, contexts, references = [], [], []
    for j in range(max(1, round(b.n / 3))):
        rng, scene, qa = b.item(j, CONV_CATEGORIES)
        image = f"{j + 1:03d}.png"
        b.png(f"images/{image}", scene)
        contexts.append({"id": f"{j + 1:03d}", "image": image, "caption": description(scene)})
        asked = [("conv", qa.question, sentence(qa)), ("detail", rng.choice(DETAIL_PROMPTS), description(scene)),
                 ("complex", *_complex(rng, scene))]
        for category, text, reference in asked:
            qid = len(questions)
            questions.append({"image": image, "text": text, "category": category, "question_id": qid})
            references.append({"question_id": qid, "prompt": text, "text": reference, "answer_id": f"synth-ref-{qid}",
                               "model_id": "gpt-4-0314", "metadata": {}})
    b.jsonl("questions.jsonl", questions)
    b.jsonl("context.jsonl", contexts)
    b.jsonl("answers_gpt4.jsonl", references)
    return len(questions)


# -- MM-Vet -------------------------------------------------------------------------------------------

# kind -> MM-Vet capabilities; the first five are world question categories
MMVET_KINDS = {"color": ["rec"], "shape": ["rec"], "count": ["rec"], "word": ["ocr"], "position": ["rec", "spat"],
               "math": ["rec", "math"], "describe": ["rec", "gen"]}


def _mmvet_item(b: Bench, i: int) -> tuple[Scene, str, str]:
    """(scene, question, ground-truth answer; alternatives joined by MM-Vet's <OR>) of question i."""
    kinds = list(MMVET_KINDS)
    kind, rng = kinds[i % len(kinds)], b.rng(i)
    if kind in ("math", "describe"):
        scene = sample_scene(rng, b.image_size)
        if kind == "describe":
            return scene, rng.choice(DETAIL_PROMPTS), description(scene)
        total = len(scene.objects) + 2
        question = "How many objects would there be in the image if two more were added?"
        return scene, question, f"{total}<OR>{count_word(total)}"
    vocab = answer_vocab(kind)
    scene, qa = ask(rng, b.image_size, kind, vocab[(i // len(kinds)) % len(vocab)])
    answer = f"{qa.answer}<OR>{count_word(int(qa.answer))}" if kind == "count" else qa.answer
    return scene, qa.question, answer


def write_mm_vet(b: Bench) -> int:
    """`llava-mm-vet.jsonl` (no suffix, as LLaVA asks MM-Vet) and the `mm-vet.json` ground truth."""
    rows, truth = [], {}
    for i in range(b.n):
        scene, question, answer = _mmvet_item(b, i)
        image = f"v1_{i}.png"
        b.png(f"images/{image}", scene)
        rows.append({"question_id": i, "image": image, "text": question})
        truth[f"v1_{i}"] = {"imagename": image, "question": question, "answer": answer,
                            "capability": MMVET_KINDS[list(MMVET_KINDS)[i % len(MMVET_KINDS)]]}
    b.jsonl("llava-mm-vet.jsonl", rows)
    b.json("mm-vet.json", truth)
    return len(rows)
