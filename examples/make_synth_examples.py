"""Render the synthetic-world example images and their questions (examples/synth_questions.jsonl).

    python examples/make_synth_examples.py

Deterministic: each example is the first scene, from its own seeded stream, that allows the
listed question with the listed answer (the same construction as the held-out eval set).
The shipped tiny model's tests ask these questions; the README's first command uses
`examples/circles.png`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from llava.data.synth import png_bytes
from llava.data.synth_scene import sample_scene
from llava.data.synth_text import make_qa

HERE = Path(__file__).parent
# (file name, category, answer, scene hints)
EXAMPLES = [
    ("circles.png", "count", "3", dict(count=3, shape="circle", n_objects=4, word=False)),
    ("word_cat.png", "word", "cat", dict(word="cat")),
    ("color.png", "color", "red", dict(word=False)),
    ("shape.png", "shape", "star", dict(shape="star", count=1)),
    ("exist_yes.png", "exist", "Yes", {}),
    ("exist_no.png", "exist", "No", {}),
    ("position.png", "position", "left", {}),
    ("choice.png", "mc", "B", {}),
]


def build() -> list[dict]:
    rows = []
    for name, category, answer, hints in EXAMPLES:
        rng = random.Random(f"llava-examples:{name}")
        for _ in range(1000):
            scene = sample_scene(rng, 96, **hints)
            qa = make_qa(rng, scene, category, answer, canonical=True)
            if qa is not None:
                break
        else:  # pragma: no cover
            raise RuntimeError(f"no scene for {name}")
        (HERE / name).write_bytes(png_bytes(scene))
        rows.append({"image": f"examples/{name}", "text": qa.text, "answer": qa.answer, "category": category})
    return rows


if __name__ == "__main__":
    rows = build()
    with open(HERE / "synth_questions.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    for r in rows:
        print(f"{r['image']}: {r['text']!r} -> {r['answer']}")
