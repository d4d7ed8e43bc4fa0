"""Questions, answers, captions and conversations about synthetic scenes.

Every question is derived from a `Scene` and is only asked when its answer is unique and
unambiguous ("What color is the star?" needs exactly one star; a position question needs
two objects that can be named unambiguously and whose centres are clearly apart).
Answers are short and canonical, in the style of the original's VQA data: lowercase single
words, digits for counts ("3"), "Yes"/"No" for existence, a capital letter for multiple
choice. Eval uses the first (canonical) phrasing of each question; training also sees a few
paraphrases so the model learns the question, not one string.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from llava.data.synth_phrasing import CAPTION_PROMPTS, DETAIL_PROMPTS, TEMPLATES, VARIED_TEMPLATES
from llava.data.synth_scene import COLORS, MAX_OBJECTS, PLURALS, SHAPES, Obj, Scene

SHORT_SUFFIX = "\nAnswer the question using a single word or phrase."
MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
CATEGORIES: tuple[str, ...] = ("color", "shape", "count", "exist", "position", "word", "mc")
LETTERS = "ABCD"
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
MIN_DX = 0.15  # position questions: centres at least this fraction of the image width apart

@dataclass(frozen=True)
class QA:
    """One question about a scene: `question` without suffix, `text` as asked, canonical `answer`."""

    category: str
    question: str
    answer: str
    key: str  # the fact asked about: a chat asks each fact once, whatever the phrasing
    suffix: str = SHORT_SUFFIX
    sentence: str = ""  # the answer as a sentence, for the question asked without the short-answer suffix

    @property
    def text(self) -> str:
        return self.question + self.suffix


Pool = Mapping[str, tuple[str, ...]]


def _template(rng: random.Random, category: str, canonical: bool, pool: Pool | None = None,
              objects: Sequence[Obj] = ()) -> str:
    """The canonical wording, or a paraphrase: the classic world's half the time, any of `pool`'s
    (the varied world's) uniformly; when `objects` (the scene's) is a lone object, half of those
    questions use the wordings that name nothing ("What shape is the object?")."""
    if canonical:
        return TEMPLATES[category][0]
    if pool is None:
        options = TEMPLATES[category]
        return options[0] if rng.random() < 0.5 else rng.choice(options[1:])
    if len(objects) == 1 and f"{category}_single" in pool and rng.random() < 0.5:
        return rng.choice(pool[f"{category}_single"])
    return rng.choice(pool[category])


# -- one question per category -----------------------------------------------------------------
# Each maker returns None when the scene cannot support the question (with that answer).


def color_qa(rng: random.Random, scene: Scene, target: str | None = None, canonical: bool = False,
             pool: Pool | None = None) -> QA | None:
    """Colour of the only object of some shape; with a pool that words it (`color_group`), also of
    several objects of one shape drawn in one colour ("What color are the squares?")."""
    objs = [o for o in scene.objects if scene.count(shape=o.shape) == 1 and target in (None, o.color)]
    if pool is not None and "color_group" in pool and not canonical:
        objs += [o for o in _alike_groups(scene) if target in (None, o.color)]
    if not objs:
        return None
    o = rng.choice(objs)
    k = scene.count(shape=o.shape)
    if k > 1:
        question = rng.choice(pool["color_group"]).format(plural=PLURALS[o.shape])
        alone = k == len(scene.objects)
        sentence = f"They are {o.color}." if alone else f"The {PLURALS[o.shape]} are {o.color}."
        return QA("color", question, o.color, f"color:{o.shape}", sentence=sentence)
    question = _template(rng, "color", canonical, pool, scene.objects).format(shape=o.shape)
    sentence = f"It is {o.color}." if len(scene.objects) == 1 else f"The {o.shape} is {o.color}."
    return QA("color", question, o.color, f"color:{o.shape}", sentence=sentence)


def _alike_groups(scene: Scene) -> list[Obj]:
    """One object of each shape that appears more than once, all of it in one colour."""
    groups: dict[str, list[Obj]] = {}
    for o in scene.objects:
        groups.setdefault(o.shape, []).append(o)
    return [g[0] for g in groups.values() if len(g) > 1 and len({o.color for o in g}) == 1]


def shape_qa(rng: random.Random, scene: Scene, target: str | None = None, canonical: bool = False,
             pool: Pool | None = None) -> QA | None:
    """Shape of the only object of some colour."""
    objs = [o for o in scene.objects if scene.count(color=o.color) == 1 and target in (None, o.shape)]
    if not objs:
        return None
    o = rng.choice(objs)
    question = _template(rng, "shape", canonical, pool, scene.objects).format(color=o.color)
    sentence = f"It is a {o.shape}." if len(scene.objects) == 1 else f"The {o.color} object is a {o.shape}."
    return QA("shape", question, o.shape, f"shape:{o.color}", sentence=sentence)


def count_qa(rng: random.Random, scene: Scene, target: str | None = None, canonical: bool = False,
             pool: Pool | None = None) -> QA | None:
    """Number (1-5) of objects of a shape.

    A count value is picked first, weighted by itself: most scenes have some shape exactly
    once, and picking uniformly would make "1" the answer to half of all count questions.
    """
    by_count: dict[int, list[str]] = {}
    for shape in sorted({o.shape for o in scene.objects}, key=SHAPES.index):
        by_count.setdefault(scene.count(shape=shape), []).append(shape)
    if target is not None:
        by_count = {k: v for k, v in by_count.items() if str(k) == target}
    if not by_count:
        return None
    values = sorted(by_count)
    k = rng.choices(values, weights=values)[0]
    shape = rng.choice(by_count[k])
    question = _template(rng, "count", canonical, pool).format(plural=PLURALS[shape])
    sentence = f"There is one {shape}." if k == 1 else f"There are {count_word(k)} {PLURALS[shape]}."
    return QA("count", question, str(k), f"count:{shape}", sentence=sentence)


def exist_qa(rng: random.Random, scene: Scene, target: str | None = None, canonical: bool = False,
             pool: Pool | None = None) -> QA | None:
    """Is there a <colour> <shape>? Negatives are plausible: the shape or the colour is in the scene."""
    if target is None:
        target = rng.choice(("Yes", "No"))
    present = {(o.color, o.shape) for o in scene.objects}
    if target == "Yes":
        pairs = sorted(present)
    else:
        near = {(c, s) for c in COLORS for s in SHAPES
                if (c, s) not in present and (scene.count(shape=s) or scene.count(color=c))}
        far = {(c, s) for c in COLORS for s in SHAPES} - present
        pairs = sorted(near if near and rng.random() < 0.8 else far)
    if not pairs:
        return None
    color, shape = rng.choice(pairs)
    question = _template(rng, "exist", canonical, pool).format(color=color, shape=shape)
    sentence = f"Yes, there is a {color} {shape}." if target == "Yes" else f"No, there is no {color} {shape}."
    return QA("exist", question, target, f"exist:{color} {shape}", sentence=sentence)


def _nameable(scene: Scene) -> list[Obj]:
    """Objects that "the <colour> <shape>" names unambiguously."""
    return [o for o in scene.objects if scene.count(shape=o.shape, color=o.color) == 1]


def position_qa(rng: random.Random, scene: Scene, target: str | None = None, canonical: bool = False,
                pool: Pool | None = None) -> QA | None:
    """Is A to the left or right of B, for two nameable objects whose centres are clearly apart."""
    objs = _nameable(scene)
    pairs = [(a, b) for i, a in enumerate(objs) for b in objs[i + 1:] if abs(a.x - b.x) >= MIN_DX * scene.size]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    if target is None:
        target = rng.choice(("left", "right"))
    if (a.x < b.x) != (target == "left"):
        a, b = b, a
    question = _template(rng, "position", canonical, pool).format(a=a.name, b=b.name)
    return QA("position", question, target, "position:" + "/".join(sorted((a.name, b.name))),
              sentence=f"The {a.name} is to the {target} of the {b.name}.")


def word_qa(rng: random.Random, scene: Scene, target: str | None = None, canonical: bool = False,
            pool: Pool | None = None) -> QA | None:
    if not scene.word or target not in (None, scene.word):
        return None
    return QA("word", _template(rng, "word", canonical, pool), scene.word, "word",
              sentence=f"The word is '{scene.word}'.")


MC_KINDS: dict[str, tuple[Callable[..., QA | None], list[str]]] = {
    "color": (color_qa, list(COLORS)),
    "shape": (shape_qa, list(SHAPES)),
    "count": (count_qa, [str(k) for k in range(1, MAX_OBJECTS + 1)]),
}


def mc_qa(rng: random.Random, scene: Scene, target: str | None = None, canonical: bool = False,
          pool: Pool | None = None) -> QA | None:
    """A colour, shape or count question with four lettered options; `target` is the right letter."""
    letter = target if target is not None else rng.choice(LETTERS)
    kinds = list(MC_KINDS)
    rng.shuffle(kinds)
    for kind in kinds:
        make, vocab = MC_KINDS[kind]
        base = make(rng, scene, None, canonical, pool)
        if base is None:
            continue
        options = rng.sample([v for v in vocab if v != base.answer], len(LETTERS) - 1)
        options.insert(LETTERS.index(letter), base.answer)
        lines = [base.question] + [f"{L}. {v}" for L, v in zip(LETTERS, options)]
        return QA("mc", "\n".join(lines), letter, base.key, MC_SUFFIX)
    return None


MAKERS: dict[str, Callable[..., QA | None]] = {
    "color": color_qa, "shape": shape_qa, "count": count_qa, "exist": exist_qa, "position": position_qa,
    "word": word_qa, "mc": mc_qa,
}


def make_qa(rng: random.Random, scene: Scene, category: str, target: str | None = None,
            canonical: bool = False, pool: Pool | None = None) -> QA | None:
    """A question of `category` (with answer `target` when given) about the scene, or None; `pool`:
    the wordings paraphrases come from (None: the classic world's `TEMPLATES`)."""
    return MAKERS[category](rng, scene, target, canonical, pool)


# -- captions and descriptions -----------------------------------------------------------------


def count_word(k: int) -> str:
    return NUMBER_WORDS[k] if 0 <= k < len(NUMBER_WORDS) else str(k)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _left_to_right(scene: Scene) -> list[Obj]:
    return sorted(scene.objects, key=lambda o: (o.x, o.y))


def caption(scene: Scene) -> str:
    """One-line caption like the original's pretraining captions: objects left to right, grouped."""
    groups: dict[tuple[str, str], int] = {}
    for o in _left_to_right(scene):
        groups[(o.color, o.shape)] = groups.get((o.color, o.shape), 0) + 1
    parts = [f"a {c} {s}" if k == 1 else f"{count_word(k)} {c} {PLURALS[s]}" for (c, s), k in groups.items()]
    text = f"{_join(parts)} on a {scene.background} background"
    if scene.word:
        text += f" with the word '{scene.word}'"
    return text


def horizontal(scene: Scene, o: Obj) -> str:
    third = scene.size / 3
    return "on the left" if o.x < third else "on the right" if o.x >= 2 * third else "in the middle"


def description(scene: Scene) -> str:
    """A detailed description: how many objects, then each with size, colour, shape and place."""
    n = len(scene.objects)
    noun = "object" if n == 1 else "objects"
    verb = "is" if n == 1 else "are"
    sentences = [f"There {verb} {count_word(n)} {noun} on a {scene.background} background."]
    places: dict[str, list[str]] = {}
    for o in _left_to_right(scene):
        places.setdefault(horizontal(scene, o), []).append(f"a {o.size} {o.color} {o.shape}")
    for place, items in places.items():
        verb = "is" if len(items) == 1 else "are"
        sentences.append(f"{place.capitalize()}, there {verb} {_join(items)}.")
    if scene.word:
        sentences.append(f"The word '{scene.word}' is written at the {scene.word_place}.")
    return " ".join(sentences)


# -- conversations -----------------------------------------------------------------------------

# How often each question type is drawn for training conversations. Types with few askable
# facts per scene (colour, the word) get more weight so every category gets a similar share;
# the skills the tiny model learns last (counting, left/right, picking a letter) get the most.
WEIGHTS: dict[str, float] = {"color": 2.0, "shape": 1.0, "count": 2.5, "exist": 1.0, "position": 2.5, "word": 2.0,
                             "mc": 2.5}


def conversation(rng: random.Random, scene: Scene, min_qa: int = 3, max_qa: int = 6,
                 detail_p: float = 0.2, pool: Pool | None = None, sentence_p: float = 0.0,
                 count_one_keep: float = 1.0) -> list[tuple[str, str]]:
    """(human, gpt) turns about one image: sometimes a detailed description, then short-answer questions.

    Each fact is asked once; existence questions alternate towards the rarer answer so that
    "Yes" and "No" stay balanced even though absent things outnumber present ones. `pool`: the
    wordings (None: the classic world's); `sentence_p`: the share of questions asked without the
    short-answer instruction and answered in a sentence ("The circle is red."); `count_one_keep`:
    the share of count questions answered "1" that are kept (scenes of one shape, and the odd
    shapes beside a group, make "1" the answer to half of them otherwise).
    """
    turns: list[tuple[str, str]] = []
    if rng.random() < detail_p:
        turns.append((rng.choice(DETAIL_PROMPTS), description(scene)))
    want = rng.randint(min_qa, max_qa)
    asked: set[str] = set()
    yes_no = {"Yes": 0, "No": 0}
    cats, weights = list(WEIGHTS), list(WEIGHTS.values())
    for _ in range(4 * want):
        if len(asked) >= want:
            break
        category = rng.choices(cats, weights)[0]
        target = None
        if category == "exist":
            target = min(yes_no, key=lambda a: (yes_no[a], rng.random()))
        qa = make_qa(rng, scene, category, target, pool=pool)
        if qa is None or qa.key in asked:
            continue
        asked.add(qa.key)
        # (a keep of 1 draws nothing: the classic world's chats keep their bytes)
        if category == "count" and qa.answer == "1" and count_one_keep < 1.0 and rng.random() >= count_one_keep:
            continue
        if category == "exist":
            yes_no[qa.answer] += 1
        if sentence_p and qa.sentence and rng.random() < sentence_p:
            turns.append((qa.question, qa.sentence))
        else:
            turns.append((qa.text, qa.answer))
    if not turns:  # a scene too uniform for any unambiguous question still has a description
        turns.append((rng.choice(DETAIL_PROMPTS), description(scene)))
    return turns


# Text-only facts: consistent with the world (colour mixing, shapes' sides, small arithmetic).
_MIXES = {("blue", "yellow"): "green", ("red", "blue"): "purple", ("red", "white"): "pink",
          ("black", "white"): "gray", ("red", "yellow"): "orange"}
_SIDES = {"triangle": 3, "square": 4, "diamond": 4}


def text_qa(rng: random.Random) -> tuple[str, str, str]:
    """(question, short answer, sentence answer) of a general question that needs no image."""
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(0, 5), rng.randint(0, 5)
        return f"What is {a} plus {b}?", str(a + b), f"{a} plus {b} is {a + b}."
    if kind == 1:
        a = rng.randint(1, 9)
        b = rng.randint(0, a)
        return f"What is {a} minus {b}?", str(a - b), f"{a} minus {b} is {a - b}."
    if kind == 2:
        shape, k = rng.choice(sorted(_SIDES.items()))
        return f"How many sides does a {shape} have?", str(k), f"A {shape} has {k} sides."
    if kind == 3:
        (a, b), c = rng.choice(sorted(_MIXES.items()))
        return (f"What color do you get when you mix {a} and {b}?", c, f"Mixing {a} and {b} gives {c}.")
    if kind == 4:
        if rng.random() < 0.5:
            x, what = rng.choice(list(COLORS)), "color"
        else:
            x, what = rng.choice(SHAPES), "shape"
        return f"Is {x} a color or a shape?", what, f"{x.capitalize()} is a {what}."
    k = rng.randint(1, 9)
    return f"What number comes after {count_word(k)}?", str(k + 1), f"The number after {k} is {k + 1}."


def _text_options(short: str) -> list[str]:
    """The answers a text question's lettered options are drawn from (its own kind of answer)."""
    if short.isdigit():
        return [str(k) for k in range(11)]
    if short in ("color", "shape"):
        return ["color", "shape", "number", "word"]
    return list(COLORS)


def text_mc(rng: random.Random, question: str, short: str) -> tuple[str, str]:
    """A text question as four lettered options (image-mc's format); (prompt with MC_SUFFIX, letter)."""
    letter = rng.choice(LETTERS)
    options = rng.sample([v for v in _text_options(short) if v != short], len(LETTERS) - 1)
    options.insert(LETTERS.index(letter), short)
    lines = [question] + [f"{L}. {v}" for L, v in zip(LETTERS, options)]
    return "\n".join(lines) + MC_SUFFIX, letter


def text_conversation(rng: random.Random, mc: float = 0.0) -> list[tuple[str, str]]:
    """A short text-only chat: general questions answered as a word (with the suffix) or a sentence.

    `mc`: the share of questions asked as lettered multiple choice instead. The tiny LM never
    learnt to pick a letter from image questions alone (chance after six epochs); the same
    skill on questions it can answer from text bootstraps it (0 keeps older datasets' bytes).
    """
    turns: list[tuple[str, str]] = []
    asked: set[str] = set()
    for _ in range(rng.randint(1, 3)):
        q, short, sentence = text_qa(rng)
        if q in asked:
            continue
        asked.add(q)
        if mc and rng.random() < mc:
            turns.append(text_mc(rng, q, short))
        else:
            turns.append((q + SHORT_SUFFIX, short) if rng.random() < 0.5 else (q, sentence))
    return turns


__all__ = ["SHORT_SUFFIX", "MC_SUFFIX", "CATEGORIES", "LETTERS", "CAPTION_PROMPTS", "DETAIL_PROMPTS", "TEMPLATES",
           "VARIED_TEMPLATES",
           "QA", "make_qa", "caption", "description", "conversation", "text_conversation", "text_mc", "MIN_DX"]
