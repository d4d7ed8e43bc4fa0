"""Hard negative captions for stage 0's tower: a caption with one colour, shape or group size changed, so
the contrastive loss (and the binding check) must tell which object has which attribute."""

from __future__ import annotations

import random

from llava.data.synth_scene import COLORS, PLURALS, SHAPES

_NUMBERS = ("two", "three", "four", "five")
_SINGULAR = {v: k for k, v in PLURALS.items()}


def perturb_caption(caption: str, rng: random.Random, kind: str | None = None) -> str | None:
    """The caption with one colour, shape or group size of its objects changed (never the
    background's or the word's), so it no longer describes the image; None if nothing can change.
    `kind`: "color", "shape" or "count" to force one."""
    head, sep, tail = caption.partition(" on a ")
    words = head.split(" ")
    slots = [(i, k) for i, w in enumerate(words) for k, vocab in
             (("color", COLORS), ("shape", SHAPES), ("shape", _SINGULAR), ("count", _NUMBERS)) if w.strip(",") in vocab]
    slots = [(i, k) for i, k in slots if kind in (None, k)]
    if not slots:
        return None
    i, k = rng.choice(slots)
    w = words[i].strip(",")
    comma = "," if words[i].endswith(",") else ""
    if k == "color":
        new = rng.choice([c for c in COLORS if c != w])
    elif k == "count":
        new = rng.choice([n for n in _NUMBERS if n != w])
    elif w in SHAPES:
        new = rng.choice([x for x in SHAPES if x != w])
    else:
        new = PLURALS[rng.choice([x for x in SHAPES if x != _SINGULAR[w]])]
    words[i] = new + comma
    return " ".join(words) + sep + tail


NEGATIVE_KINDS = ("shape", "color", "count", "shape")  # the k-th negative of a caption changes this


def hard_negatives(captions: list[str], seed: int, per_caption: int = 1) -> list[str]:
    """`per_caption` perturbed captions per caption, caption-major (k-th changes NEGATIVE_KINDS[k % 4],
    or anything where that cannot change; the caption itself where nothing can)."""
    rng = random.Random(seed)
    out = []
    for c in captions:
        for k in range(per_caption):
            kind = NEGATIVE_KINDS[k % len(NEGATIVE_KINDS)] if per_caption > 1 else None
            out.append(perturb_caption(c, rng, kind) or perturb_caption(c, rng) or c)
    return out
