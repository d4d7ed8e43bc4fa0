"""Generate the synthetic LLaVA dataset: images, pretrain captions, instruct chats and an eval set.

    from llava.data.synth import generate
    meta = generate("data/synth", seed=0, n=5000)          # or: llava data synth --out data/synth --seed 0 --n 5000

writes, under `out_dir` (which is also the `image_folder` for every file):

- `images/NNNNNN.png` (training scenes) and `images/eval_NNNNN.png` (held-out eval scenes; `.jpg`
  for the varied world's JPEG pictures);
- `pretrain.json`: LLaVA-Pretrain-style captions, one per training image (stage 1);
- `instruct.json`: LLaVA-Instruct-style multi-turn chats about the same images, plus some
  text-only chats (stage 2);
- `eval.jsonl`: one question per line, `{"question_id", "image", "text", "answer",
  "category"}`, categories in equal numbers and answers balanced within each;
- `scenes.jsonl`: the `Scene` behind every image, so any answer can be re-derived;
- `meta.json`: seed, sizes, vocabularies and sha256 of every file.

Output is a pure function of the arguments (same bytes for the same seed): every image has
its own `random.Random` seeded from (seed, split, index), so the first k scenes of a large
set are the scenes of a small one, and eval scenes never come from the training stream.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterable

import PIL

from llava.data.synth_phrasing import VARIED_2_TRAINING_TEMPLATES, VARIED_TRAINING_TEMPLATES
from llava.data.synth_scene import BACKGROUNDS, COLORS, MAX_OBJECTS, SHAPES, SIZES, WORDS, Scene, render, sample_scene
from llava.data.synth_text import (
    CAPTION_PROMPTS,
    CATEGORIES,
    LETTERS,
    MC_SUFFIX,
    QA,
    SHORT_SUFFIX,
    caption,
    conversation,
    make_qa,
    text_conversation,
)
from llava.data.synth_varied import BACKGROUND_TINTS, sample_varied_2_scene, sample_varied_scene

FORMAT_VERSION = 1
DEFAULT_IMAGE_SIZE = 96
DEFAULT_EVAL_N = 1400  # 200 per category
# The classic world (one look, a few wordings: what the bundled model was first trained on), the
# varied one (`llava.data.synth_varied`: many looks, canvases and wordings, sentence answers too) and
# its second edition (smaller small shapes, groups drawn alike and asked their colour).
WORLDS: dict[str, Callable[..., Scene]] = {"classic": sample_scene, "varied": sample_varied_scene,
                                           "varied-2": sample_varied_2_scene}
POOLS = {"varied": VARIED_TRAINING_TEMPLATES, "varied-2": VARIED_2_TRAINING_TEMPLATES}  # the worlds' wordings
VARIED_SENTENCE_SHARE = 0.2  # varied chats: questions asked without the short-answer instruction
VARIED_COUNT_ONE_KEEP = 0.2  # varied chats: the share of count questions answered "1" that are asked

__all__ = ["generate", "load_scenes", "eval_items", "train_scene", "answer_vocab", "image_bytes", "image_name",
           "chat", "DEFAULT_IMAGE_SIZE", "DEFAULT_EVAL_N", "WORLDS"]


def _rng(seed: int, split: str, index: int) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`: stable across runs and PYTHONHASHSEED.
    return random.Random(f"llava-synth:{seed}:{split}:{index}")


def _world(name: str) -> Callable[..., Scene]:
    try:
        return WORLDS[name]
    except KeyError:
        raise ValueError(f"unknown synthetic world {name!r}; valid: {', '.join(WORLDS)}") from None


def train_scene(seed: int, index: int, image_size: int = DEFAULT_IMAGE_SIZE, max_objects: int = MAX_OBJECTS,
                world: str = "classic") -> tuple[random.Random, Scene]:
    """Training scene `index` of a seed, and its rng positioned for writing its texts."""
    rng = _rng(seed, "train", index)
    return rng, _world(world)(rng, image_size, max_objects=max_objects)


def chat(rng: random.Random, scene: Scene, world: str = "classic") -> list[tuple[str, str]]:
    """A training conversation about the scene, worded as its world words them."""
    if world in POOLS:
        return conversation(rng, scene, pool=POOLS[world], sentence_p=VARIED_SENTENCE_SHARE,
                            count_one_keep=VARIED_COUNT_ONE_KEEP)
    return conversation(rng, scene)


def answer_vocab(category: str, max_objects: int = MAX_OBJECTS) -> list[str]:
    """Every answer a category's eval questions can have (eval targets cycle through it)."""
    return {
        "color": list(COLORS), "shape": list(SHAPES), "count": [str(k) for k in range(1, max_objects + 1)],
        "exist": ["Yes", "No"], "position": ["left", "right"], "word": list(WORDS), "mc": list(LETTERS),
    }[category]


def scene_where(rng: random.Random, size: int, build: Callable[[random.Random, Scene], Any],
                max_objects: int = MAX_OBJECTS, world: str = "classic", **hints: Any) -> tuple[Scene, Any]:
    """A scene for which `build(rng, scene)` is not None, and what it built (scenes are drawn until one fits)."""
    sample = _world(world)
    for _ in range(1000):
        scene = sample(rng, size, max_objects=max_objects, **hints)
        made = build(rng, scene)
        if made is not None:
            return scene, made
    raise RuntimeError(f"no scene fits {build!r} with hints {hints}")  # pragma: no cover - all builders are reachable


def ask(rng: random.Random, size: int, category: str, target: str | None = None,
        max_objects: int = MAX_OBJECTS, world: str = "classic") -> tuple[Scene, QA]:
    """A scene and its canonical question of `category` (answer `target` when given), sampled with
    hints where chance alone is too rare, until the question can be asked about it unambiguously."""
    hints: dict[str, Any] = {}
    if category in ("count", "shape", "word") and target is not None:
        hints[category] = int(target) if category == "count" else target
    elif category == "word":
        hints["word"] = True
    return scene_where(rng, size, lambda r, s: make_qa(r, s, category, target, canonical=True), max_objects, world,
                       **hints)


def eval_items(seed: int, eval_n: int, image_size: int = DEFAULT_IMAGE_SIZE, max_objects: int = MAX_OBJECTS,
               world: str = "classic") -> Iterable[tuple[Scene, QA]]:
    """The eval set's (scene, question) pairs: category i % 7, its answer cycling through the vocabulary,
    each question with its own scene (`ask`)."""
    for i in range(eval_n):
        category = CATEGORIES[i % len(CATEGORIES)]
        vocab = answer_vocab(category, max_objects)
        yield ask(_rng(seed, "eval", i), image_size, category, vocab[(i // len(CATEGORIES)) % len(vocab)], max_objects,
                  world)


def load_scenes(folder: str | os.PathLike, split: str | None = None) -> dict[str, Scene]:
    """The scenes of a generated folder (`scenes.jsonl`), by image path, in file order; `split`:
    only "train" or only "eval" scenes."""
    with open(os.path.join(folder, "scenes.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["image"]: Scene.from_dict(r["scene"]) for r in rows if split in (None, r["split"])}


def image_bytes(scene: Scene) -> bytes:
    """The rendered scene as PNG bytes (JPEG when the scene says so); PIL writes no timestamps, so
    equal scenes give equal bytes."""
    buf = io.BytesIO()
    if scene.jpeg:
        render(scene).save(buf, format="JPEG", quality=scene.jpeg)
    else:
        render(scene).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def image_name(stem: str, scene: Scene) -> str:
    return f"images/{stem}.{'jpg' if scene.jpeg else 'png'}"


def _write_images(root: Path, jobs: list[tuple[str, Scene]], workers: int) -> list[str]:
    """Render and save every (name, scene); returns "name sha256" lines in job order.

    Rendering is most of the time, so it is spread over `workers` processes ("spawn": safe
    even when the caller has torch threads running); files are written here, in order.
    """
    (root / "images").mkdir(parents=True, exist_ok=True)
    if workers > 1 and len(jobs) >= 512:  # below that, starting processes costs more than it saves
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            blobs = pool.imap(image_bytes, [scene for _, scene in jobs], chunksize=64)
            return [_save(root, name, data) for (name, _), data in zip(jobs, blobs)]
    return [_save(root, name, image_bytes(scene)) for name, scene in jobs]


def _save(root: Path, name: str, data: bytes) -> str:
    (root / name).write_bytes(data)
    return f"{name} {hashlib.sha256(data).hexdigest()}"


def _json_list(rows: list[dict]) -> str:
    """A JSON list with one record per line: valid JSON, yet greppable and diffable."""
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n"


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _conv(turns: list[tuple[str, str]], image: bool) -> list[dict[str, str]]:
    out = []
    for j, (q, a) in enumerate(turns):
        out.append({"from": "human", "value": ("<image>\n" + q) if image and j == 0 else q})
        out.append({"from": "gpt", "value": a})
    return out


def generate(out_dir: str | os.PathLike, seed: int, n: int, image_size: int = DEFAULT_IMAGE_SIZE,
             eval_n: int = DEFAULT_EVAL_N, text_only: int | None = None, workers: int = 1,
             text_mc: float = 0.0, max_objects: int = MAX_OBJECTS, world: str = "classic") -> dict[str, Any]:
    """Write the dataset (see the module docstring) and return its meta.json contents.

    `world`: "classic" (one look, a few wordings) or "varied" (`llava.data.synth_varied`: canvases,
    scales, shades, strokes, backgrounds, noise, JPEG, many wordings and sentence answers; its
    images are PNG or JPEG, and `image_size` is ignored as the canvas varies), or "varied-2" (its
    second edition: smaller small shapes, groups drawn alike and asked their colour).

    `text_only`: number of image-free instruct chats (default n // 10); `text_mc`: the share of
    their questions asked as lettered multiple choice (`text_conversation`); `max_objects`: at
    most this many objects a scene (2-5; fewer make a simpler world); `workers`: processes
    that render images (the output does not depend on it). They are started with "spawn",
    so a script that calls this with workers > 1 needs the usual `if __name__ == "__main__":`
    guard (without it every worker re-runs the script and the pool never starts).
    """
    if n < 0 or eval_n < 0:
        raise ValueError("n and eval_n must be >= 0")
    if not 0.0 <= text_mc <= 1.0:
        raise ValueError(f"text_mc is a share of questions, in [0, 1]; got {text_mc}")
    if not 2 <= max_objects <= MAX_OBJECTS:  # left/right questions need two objects
        raise ValueError(f"max_objects must be in 2..{MAX_OBJECTS}; got {max_objects}")
    _world(world)
    if image_size < 48:
        raise ValueError(f"image_size {image_size} is too small for five shapes and a word; use >= 48")
    root = Path(out_dir)
    jobs: list[tuple[str, Scene]] = []
    text_only = n // 10 if text_only is None else text_only

    pretrain, instruct, scenes = [], [], []
    for i in range(n):
        rng, scene = train_scene(seed, i, image_size, max_objects, world)
        name = image_name(f"{i:06d}", scene)
        jobs.append((name, scene))
        scenes.append({"image": name, "split": "train", "scene": scene.to_dict()})
        rid = f"synth-{i:06d}"
        pretrain.append({"id": rid, "image": name, "conversations": _conv(
            [(rng.choice(CAPTION_PROMPTS), caption(scene))], image=True)})
        instruct.append({"id": rid, "image": name, "conversations": _conv(chat(rng, scene, world), image=True)})
    for j in range(text_only):
        rng = _rng(seed, "text", j)
        instruct.append({"id": f"synth-text-{j:05d}", "conversations": _conv(text_conversation(rng, text_mc), image=False)})

    questions = []
    for i, (scene, qa) in enumerate(eval_items(seed, eval_n, image_size, max_objects, world)):
        name = image_name(f"eval_{i:05d}", scene)
        jobs.append((name, scene))
        scenes.append({"image": name, "split": "eval", "scene": scene.to_dict()})
        questions.append({"question_id": i, "image": name, "text": qa.text, "answer": qa.answer,
                          "category": qa.category})

    digests = _write_images(root, jobs, workers)
    texts = {"pretrain.json": _json_list(pretrain), "instruct.json": _json_list(instruct),
             "eval.jsonl": _jsonl(questions), "scenes.jsonl": _jsonl(scenes)}
    files = {}
    for fname, text in texts.items():
        data = text.encode("utf-8")
        (root / fname).write_bytes(data)
        files[fname] = hashlib.sha256(data).hexdigest()
    meta = {
        "format": "llava-synth", "version": FORMAT_VERSION, "seed": seed, "n": n, "eval_n": eval_n,
        "text_only": text_only, "text_mc": text_mc, "image_size": image_size,
        **({"world": world} if world != "classic" else {}),  # classic meta.json keeps its old bytes
        "pillow": PIL.__version__,  # rendering (font rasterisation) is byte-stable for one Pillow version
        "vocab": {"colors": {k: list(v) for k, v in COLORS.items()}, "shapes": list(SHAPES), "sizes": list(SIZES),
                  "words": list(WORDS), "backgrounds": list(BACKGROUND_TINTS if world != "classic" else BACKGROUNDS),
                  "max_objects": max_objects},
        "categories": list(CATEGORIES), "suffixes": {"short": SHORT_SUFFIX, "mc": MC_SUFFIX},
        "eval_per_category": {c: sum(q["category"] == c for q in questions) for c in CATEGORIES},
        "files": files,
        # One digest over "name sha256" lines of every image, in write order (per-image hashes
        # for thousands of files would dwarf the rest of this file).
        "images": {"count": len(digests), "sha256": hashlib.sha256("\n".join(digests).encode()).hexdigest()},
    }
    (root / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta
