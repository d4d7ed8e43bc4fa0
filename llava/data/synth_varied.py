"""The varied world: the classic world's objects and facts, drawn and framed in many more ways.

A model trained on one renderer learns that renderer: the classic world's shapes always carry a
dark outline, come in two sizes and seven exact colours, on a square 96-pixel canvas, and the
bundled model trained on it called plain upright triangles drawn by someone else "circle". Here
every scene draws its own canvas (64-384 px, up to 2:1 either way, as a user's picture goes
through the image processor's pad and resize), object scale (one shape filling most of the
image, several small ones or several as large as fit), shade of each named colour, fill or
outline, edge, proportions and a slight turn of each shape, background tint, gradient, blur,
noise, hard or smooth edges, and PNG or JPEG. Every choice keeps the answers true: no flips
(left/right), no colour shifts past a name, no turn that makes a square a diamond.

A varied scene is still a `Scene` (its extra fields are plain data), so every question maker of
`llava.data.synth_text` works on it unchanged.
"""

from __future__ import annotations

import random
from typing import Any

from llava.data.synth_scene import COLORS, MAX_OBJECTS, SHAPES, WORDS, Obj, Scene, band_height, place_centers

# Shades a person still calls by the name (the first is the classic world's own).
SHADES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": ((215, 25, 25), (240, 30, 30), (190, 15, 30), (255, 0, 0), (205, 45, 50), (170, 20, 20)),
    "yellow": ((250, 220, 0), (255, 236, 60), (242, 205, 25), (255, 250, 0), (235, 215, 45), (255, 225, 90)),
    "green": ((20, 160, 40), (40, 185, 65), (0, 128, 0), (70, 170, 70), (30, 140, 60), (90, 200, 80)),
    "blue": ((25, 70, 235), (30, 110, 225), (0, 0, 255), (60, 90, 200), (20, 50, 170), (70, 130, 240)),
    "purple": ((140, 40, 200), (128, 0, 128), (150, 70, 195), (110, 40, 170), (165, 85, 215), (100, 20, 140)),
    "pink": ((255, 120, 200), (255, 105, 180), (240, 145, 200), (250, 160, 215), (230, 95, 165), (255, 130, 170)),
    "gray": ((128, 128, 128), (110, 110, 110), (150, 150, 150), (95, 98, 102), (165, 165, 165), (135, 130, 125)),
}
BACKGROUND_TINTS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255), "off-white": (249, 246, 238), "light gray": (228, 228, 228),
    "light blue": (215, 232, 250), "light green": (222, 245, 222), "light yellow": (252, 248, 214),
    "light pink": (252, 230, 238),
}
SINGLE_OBJECT_SHARE = 0.25  # scenes of one shape: the picture a user draws first
LARGE_SEVERAL_SHARE = 0.4  # scenes of several shapes drawn as large as they fit
# Radii of several small shapes against the long side (the picture as padded to a square).
SMALL_RADII = (0.065, 0.18)
# The second edition (`sample_varied_2_scene`): small shapes down to 9% of the picture across, not 13% (the
# smallest tenth of a user's shapes, as the out-of-style set draws them, were smaller than any trained on), and
# a third of the groups of one shape drawn in one colour, as people draw them ("three green squares").
SMALL_RADII_2 = (0.045, 0.18)
ALIKE_GROUP_SHARE_2 = 0.3
# The largest radius of n such shapes, as a fraction of the canvas's shorter side (room for all n).
LARGEST_OF_SEVERAL: dict[int, float] = {2: 0.27, 3: 0.23, 4: 0.2, 5: 0.18}


def _shade(rng: random.Random, color: str) -> tuple[int, int, int]:
    """A mix of two of the colour's shades plus a little jitter."""
    a, b = rng.sample(SHADES[color], 2)
    t = rng.random()
    return tuple(max(0, min(255, round(x * (1 - t) + y * t + rng.uniform(-10, 10)))) for x, y in zip(a, b))


def _canvas(rng: random.Random) -> tuple[int, int]:
    long = rng.randint(80, 384)
    if rng.random() < 0.45:
        return long, long
    short = max(64, round(long / rng.uniform(1.15, 2.0)))
    return (long, short) if rng.random() < 0.5 else (short, long)


def _object(rng: random.Random, shape: str, color: str, x: int, y: int, r: int, short_side: int) -> Obj:
    filled = rng.random() < 0.8
    edge = "dark" if not filled else rng.choices(("dark", "none", "shade"), (0.45, 0.4, 0.15))[0]
    stroke = max(2, round(r * rng.uniform(0.12, 0.22))) if not filled else max(1, round(r * rng.uniform(0.04, 0.14)))
    angle = round(rng.uniform(-12, 12), 1) if shape != "circle" and rng.random() < 0.5 else 0.0
    size = "large" if r >= 0.105 * short_side else "small"
    return Obj(shape, color, size, x, y, r, rgb=_shade(rng, color), filled=filled, edge=edge, stroke=stroke,
               angle=angle, variant=round(rng.random(), 3))


def _layout(rng: random.Random, n: int, word: bool, small_radii: tuple[float, float]):
    """(canvas, radii, centres, word band, its place) for `n` objects, or None when they do not fit."""
    width, height = _canvas(rng)
    word_box = place = None
    top, bottom = 0, height
    if word:
        place = rng.choice(("top", "bottom"))
        h = band_height(min(width, height))
        word_box = (0, 0, width, h) if place == "top" else (0, height - h, width, height)
        top, bottom = (h, height) if place == "top" else (0, height - h)
    room, long = min(width, bottom - top), max(width, height)
    # Several shapes are either small ones (relative to the long side: the model sees the canvas
    # padded to a square of that side) or as large as they fit on the short side, as people draw them.
    large = n > 1 and rng.random() < LARGE_SEVERAL_SHARE
    for scale in (1.0, 0.85, 0.7, 0.6):
        if n == 1:
            radii = [max(6, round(room * rng.uniform(0.12, 0.46) * scale))]
        elif large:
            radii = [max(5, round(room * rng.uniform(0.12, LARGEST_OF_SEVERAL[n]) * scale)) for _ in range(n)]
        else:
            radii = [max(5, round(long * rng.uniform(*small_radii) * scale)) for _ in range(n)]
        centers = place_centers(rng, radii, width, top, bottom)
        if centers is not None:
            return (width, height), radii, centers, word_box, place
    return None


def sample_varied_scene(rng: random.Random, image_size: int = 0, *, count: int | None = None,
                        shape: str | None = None, n_objects: int | None = None, word: str | bool | None = None,
                        max_objects: int = MAX_OBJECTS, small_radii: tuple[float, float] = SMALL_RADII,
                        alike_share: float = 0.0) -> Scene:
    """A random varied scene; the hints pin parts of it as in `sample_scene` (`image_size` is
    ignored: the canvas is part of what varies). `small_radii`: the range of several small shapes'
    radii against the long side; `alike_share`: the share of groups of one shape drawn in one colour
    (0 draws nothing from `rng`: the first edition's scenes keep their bytes)."""
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS}; got {max_objects}")
    single = count in (None, 1) and n_objects in (None, 1) and rng.random() < SINGLE_OBJECT_SHARE
    k = 1 if single else count if count is not None else rng.randint(1, max_objects)
    main = shape if shape is not None else rng.choice(SHAPES)
    total = 1 if single else n_objects if n_objects is not None else rng.randint(k, max_objects)
    if not 1 <= k <= total <= max_objects:
        raise ValueError(f"need 1 <= count ({k}) <= n_objects ({total}) <= {max_objects}")
    shapes = [main] * k + rng.sample([s for s in SHAPES if s != main], total - k)
    rng.shuffle(shapes)
    colors = [rng.choice(tuple(COLORS)) for _ in shapes]
    if alike_share and k > 1 and rng.random() < alike_share:
        alike = rng.choice(tuple(COLORS))
        colors = [alike if s == main else c for s, c in zip(shapes, colors)]

    text = None
    if word is True or (word is None and not single and rng.random() < 0.4):
        text = rng.choice(WORDS)
    elif isinstance(word, str):
        text = word
    for _ in range(20):  # a crowded scene on a narrow canvas may not fit: draw another canvas
        layout = _layout(rng, len(shapes), text is not None, small_radii)
        if layout is not None:
            break
    else:
        raise RuntimeError(f"cannot place {total} objects on any canvas")  # pragma: no cover - 5 fit a 2:1 canvas
    (width, height), radii, centers, word_box, place = layout
    short = min(width, height)
    objects = [_object(rng, sh, c, x, y, r, short) for sh, c, r, (x, y) in zip(shapes, colors, radii, centers)]
    background = rng.choice(tuple(BACKGROUND_TINTS))
    tint = tuple(min(255, max(200, v + rng.randint(-8, 8))) for v in BACKGROUND_TINTS[background])
    return Scene(size=width, height=0 if height == width else height, background=background,
                 gradient=rng.choice((0, 0, 0, -14, 14)), objects=objects, word=text, word_box=word_box,
                 word_place=place, tint=tint, noise=round(rng.uniform(2, 7), 1) if rng.random() < 0.3 else 0.0,
                 blur=round(rng.uniform(0.4, 1.0), 2) if rng.random() < 0.15 else 0.0,
                 supersample=rng.choice((1, 2, 2, 3)), jpeg=rng.randint(55, 90) if rng.random() < 0.3 else 0,
                 seed=rng.getrandbits(32))


def sample_varied_2_scene(rng: random.Random, image_size: int = 0, **hints: Any) -> Scene:
    """A scene of the varied world's second edition: smaller small shapes, some groups drawn alike."""
    return sample_varied_scene(rng, image_size, small_radii=SMALL_RADII_2, alike_share=ALIKE_GROUP_SHARE_2, **hints)


__all__ = ["sample_varied_scene", "sample_varied_2_scene", "SHADES", "BACKGROUND_TINTS", "SINGLE_OBJECT_SHARE",
           "LARGE_SEVERAL_SHARE", "LARGEST_OF_SEVERAL", "SMALL_RADII", "SMALL_RADII_2", "ALIKE_GROUP_SHARE_2"]
