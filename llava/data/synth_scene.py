"""The synthetic visual world: scenes of coloured shapes and a printed word, and their rendering.

The world is built to be learnable by a ~1-5M parameter LLaVA trained on a 2-core CPU in
minutes, so everything favours clean signal over realism: a small closed vocabulary of
colours that are far apart in RGB, shapes that differ in silhouette, objects that never
overlap and carry a dark outline (so even yellow stands out on a pale background), and a
word printed large, in bold capitals, in its own band at the top or bottom of the image.

A `Scene` is plain data (it round-trips through JSON), so questions can be derived from
it and checked against it without looking at pixels.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import PIL.Image
from PIL import ImageDraw, ImageFilter, ImageFont

# -- vocabularies ------------------------------------------------------------------------------

# Pairwise RGB distance >= 110: no two colours are confusable after resizing.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 25),
    "yellow": (250, 220, 0),
    "green": (20, 160, 40),
    "blue": (25, 70, 235),
    "purple": (140, 40, 200),
    "pink": (255, 120, 200),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
                           "cross": "crosses", "diamond": "diamonds"}
SIZES: tuple[str, ...] = ("small", "large")
# Short, visually distinct words that are neither colour nor shape names.
WORDS: tuple[str, ...] = ("cat", "dog", "sun", "car", "tree", "book", "fish", "bird", "cup", "hat", "key", "moon")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light gray": (228, 228, 228),
    "light blue": (215, 232, 250),
    "light green": (222, 245, 222),
}
MAX_OBJECTS = 5

OUTLINE = (40, 40, 40)
TEXT_COLOR = (15, 15, 15)
SUPERSAMPLE = 2  # draw at 2x and downsample: smooth edges without blurring small shapes away

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), pixels of the final image


# -- scene data --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Obj:
    """One shape: `x`, `y` its centre and `radius` its circumscribed circle, in image pixels.

    The fields after `radius` are how the varied world (`llava.data.synth_varied`) draws it; their
    defaults draw the classic world's shape (the named colour, filled, a dark outline).
    """

    shape: str
    color: str
    size: str
    x: int
    y: int
    radius: int
    rgb: tuple[int, int, int] | None = None  # a shade of the named colour (None: COLORS[color])
    filled: bool = True  # False: the outline alone, in the object's colour
    edge: str = "dark"  # a filled shape's outline: "dark", "shade" (a darker shade of its colour) or "none"
    stroke: int = 0  # outline width in image pixels (0: the classic width)
    angle: float = 0.0  # rotation, degrees
    variant: float | None = None  # proportions: a triangle's height, a star's inner radius, ... (None: classic)

    @property
    def bbox(self) -> Box:
        return (self.x - self.radius, self.y - self.radius, self.x + self.radius, self.y + self.radius)

    @property
    def name(self) -> str:
        """How questions refer to it: 'red circle'."""
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    """Everything needed to render an image and to know the true answer to any question about it.

    `size` is the canvas width, and its height unless `height` is set. The fields after
    `word_place` are the varied world's; their defaults render the classic world.
    """

    size: int
    background: str
    gradient: int  # brightness change from top to bottom (0 = plain background)
    objects: list[Obj] = field(default_factory=list)
    word: str | None = None
    word_box: Box | None = None  # the band the word is centred in
    word_place: str | None = None  # "top" | "bottom"
    height: int = 0  # canvas height (0: square)
    tint: tuple[int, int, int] | None = None  # background RGB (None: BACKGROUNDS[background])
    noise: float = 0.0  # per-pixel noise (standard deviation, 0-255 scale) over the finished image
    blur: float = 0.0  # Gaussian blur radius over the finished image, pixels
    supersample: int = SUPERSAMPLE  # drawing scale before the box downsample (1: hard edges)
    jpeg: int = 0  # saved as JPEG of this quality (0: PNG)
    seed: int = 0  # the noise's seed: rendering stays a pure function of the scene

    @property
    def width(self) -> int:
        return self.size

    @property
    def canvas(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.size, self.height or self.size

    # Facts that questions are built from --------------------------------------------------------
    def count(self, shape: str | None = None, color: str | None = None) -> int:
        return sum((shape is None or o.shape == shape) and (color is None or o.color == color) for o in self.objects)

    def with_shape(self, shape: str) -> list[Obj]:
        return [o for o in self.objects if o.shape == shape]

    def with_color(self, color: str) -> list[Obj]:
        return [o for o in self.objects if o.color == color]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; fields at their defaults are left out (classic scenes keep their old form)."""
        d = _non_default(self)
        d["objects"] = [_non_default(o) for o in self.objects]
        d["word_box"] = list(self.word_box) if self.word_box else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scene":
        objects = [Obj(**{**o, "rgb": tuple(o["rgb"]) if o.get("rgb") else None}) for o in d["objects"]]
        box = tuple(d["word_box"]) if d.get("word_box") else None
        extra = {k: d[k] for k in _VARIED_SCENE_FIELDS if k in d}
        if extra.get("tint"):
            extra["tint"] = tuple(extra["tint"])
        return cls(size=d["size"], background=d["background"], gradient=d["gradient"], objects=objects,
                   word=d.get("word"), word_box=box, word_place=d.get("word_place"), **extra)  # type: ignore[arg-type]


_VARIED_SCENE_FIELDS = ("height", "tint", "noise", "blur", "supersample", "jpeg", "seed")
_CLASSIC_OPTIONAL = ("word", "word_box", "word_place")  # always written, as before the varied world


def _non_default(obj: Any) -> dict[str, Any]:
    """A dataclass as a dict, without the optional fields that hold their defaults."""
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name in _CLASSIC_OPTIONAL or value != f.default:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def radius_for(size_class: str, image_size: int) -> int:
    """Large shapes are ~1.5x small ones: different enough to name, both clearly visible."""
    return max(4, round(image_size * (0.125 if size_class == "large" else 0.085)))


def band_height(image_size: int) -> int:
    return round(image_size * 0.28)


def font_size(image_size: int) -> int:
    return max(10, round(image_size * 0.25))


# -- sampling ----------------------------------------------------------------------------------


def sample_scene(rng: random.Random, image_size: int = 96, *, count: int | None = None, shape: str | None = None,
                 n_objects: int | None = None, word: str | bool | None = None,
                 max_objects: int = MAX_OBJECTS) -> Scene:
    """A random scene; the keyword arguments pin parts of it so balanced questions can be asked.

    One shape appears `count` times (uniform 1 to `max_objects` when not given), so count answers
    cover them all; the other objects (`n_objects` in all, uniform up to `max_objects`) each have a
    different shape, so most shapes in a scene are unique and can be referred to as "the star".
    `word`: a word to print, True/False to force one or none, None for a coin flip. Colours are
    independent. `max_objects` below 5 makes a simpler world: fewer objects to tell apart.
    """
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS}; got {max_objects}")
    k = count if count is not None else rng.randint(1, max_objects)
    main = shape if shape is not None else rng.choice(SHAPES)
    total = n_objects if n_objects is not None else rng.randint(k, max_objects)
    if not 1 <= k <= total <= max_objects:
        raise ValueError(f"need 1 <= count ({k}) <= n_objects ({total}) <= {max_objects}")
    others = rng.sample([s for s in SHAPES if s != main], total - k)
    shapes = [main] * k + others
    rng.shuffle(shapes)
    colors = [rng.choice(tuple(COLORS)) for _ in shapes]
    sizes = [rng.choice(SIZES) for _ in shapes]

    if word is None:
        word = rng.random() < 0.5
    text = rng.choice(WORDS) if word is True else (word or None)
    background = rng.choice(tuple(BACKGROUNDS))
    gradient = rng.choice((0, 0, -18, 18))

    s = image_size
    word_box = place = None
    top, bottom = 0, s
    if text:
        place = rng.choice(("top", "bottom"))
        h = band_height(s)
        word_box = (0, 0, s, h) if place == "top" else (0, s - h, s, s)
        top, bottom = (h, s) if place == "top" else (0, s - h)
    centers = place_centers(rng, [radius_for(z, s) for z in sizes], s, top, bottom)
    if centers is None:  # crowded: small shapes always fit
        sizes = ["small"] * len(shapes)
        centers = place_centers(rng, [radius_for("small", s)] * len(shapes), s, top, bottom, tries=200)
        if centers is None:
            raise RuntimeError(f"cannot place {len(shapes)} objects in a {s}px image; use a larger image size")
    objects = [Obj(sh, c, z, x, y, radius_for(z, s)) for sh, c, z, (x, y) in zip(shapes, colors, sizes, centers)]
    return Scene(size=s, background=background, gradient=gradient, objects=objects, word=text, word_box=word_box,
                 word_place=place)


def place_centers(rng: random.Random, radii: Sequence[int], size: int, top: int, bottom: int,
           tries: int = 30) -> list[tuple[int, int]] | None:
    """Non-overlapping centres (with a gap) inside [0, size) x [top, bottom), or None."""
    gap = max(2, size // 32)
    order = sorted(range(len(radii)), key=lambda i: -radii[i])  # big ones first: fewer dead ends
    for _ in range(tries):
        centers: dict[int, tuple[int, int]] = {}
        for i in order:
            r = radii[i]
            lo_x, hi_x, lo_y, hi_y = r + gap, size - r - gap, top + r + gap, bottom - r - gap
            if lo_x > hi_x or lo_y > hi_y:
                return None
            for _ in range(40):
                x, y = rng.randint(lo_x, hi_x), rng.randint(lo_y, hi_y)
                if all(math.dist((x, y), c) >= r + radii[j] + gap for j, c in centers.items()):
                    centers[i] = (x, y)
                    break
            else:
                break
        if len(centers) == len(radii):
            return [centers[i] for i in range(len(radii))]
    return None


# -- rendering ---------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font (no files, works offline); sizes need Pillow >= 10.1 with FreeType."""
    font = ImageFont.load_default(size=px)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("rendering words needs Pillow >= 10.1 built with FreeType (ImageFont.load_default(size=...))")
    return font


def _polygon(shape: str, x: float, y: float, r: float, variant: float | None = None,
             angle: float = 0.0) -> list[tuple[float, float]]:
    """The outline of a non-circle shape inside the circle (x, y, r); `variant` in [0, 1] changes its
    proportions (None: the classic ones) and `angle` (degrees) turns it about its centre."""
    if shape == "square":
        h = r * 0.78
        pts = [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    elif shape == "diamond":
        w = 0.75 if variant is None else 0.55 + 0.35 * variant
        pts = [(x, y - r), (x + r * w, y), (x, y + r), (x - r * w, y)]
    elif shape == "triangle":  # centred on its bounding box, not its centroid, so it fills the bbox
        h = r * 0.95
        w = 1.1 if variant is None else 0.8 + 0.4 * variant
        pts = [(x, y - h), (x + h * w, y + h * 0.85), (x - h * w, y + h * 0.85)]
    elif shape == "star":
        inner = 0.45 if variant is None else 0.36 + 0.2 * variant
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * inner
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((x + rad * math.cos(a), y + rad * math.sin(a) + r * 0.08))
    elif shape == "cross":  # varied: from a thin plus sign (bars a ninth of its span wide) to a stout one
        a, t = r * 0.9, r * (0.33 if variant is None else 0.1 + 0.32 * variant)
        pts = [(x - t, y - a), (x + t, y - a), (x + t, y - t), (x + a, y - t), (x + a, y + t), (x + t, y + t),
               (x + t, y + a), (x - t, y + a), (x - t, y + t), (x - a, y + t), (x - a, y - t), (x - t, y - t)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    if not angle:
        return pts
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(x + (px - x) * c - (py - y) * s, y + (px - x) * s + (py - y) * c) for px, py in pts]


def _background(scene: Scene, width: int, height: int) -> PIL.Image.Image:
    base = scene.tint or BACKGROUNDS[scene.background]
    if not scene.gradient:
        return PIL.Image.new("RGB", (width, height), base)
    # A one-pixel-wide column stretched sideways: a vertical gradient for the cost of one resize.
    ramp = np.linspace(0.0, float(scene.gradient), height, dtype=np.float32)[:, None, None]
    column = np.clip(np.array(base, dtype=np.float32)[None, None, :] + ramp, 0, 255).round().astype(np.uint8)
    return PIL.Image.fromarray(column, "RGB").resize((width, height), PIL.Image.Resampling.NEAREST)


def _edge_color(o: Obj, fill: tuple[int, int, int]) -> tuple[int, int, int] | None:
    if o.edge == "dark":
        return OUTLINE
    if o.edge == "shade":
        return (round(fill[0] * 0.6), round(fill[1] * 0.6), round(fill[2] * 0.6))
    return None


def _draw_object(draw: ImageDraw.ImageDraw, o: Obj, k: int, classic_width: int) -> None:
    x, y, r = o.x * k, o.y * k, o.radius * k
    color = o.rgb or COLORS[o.color]
    width = o.stroke * k if o.stroke else classic_width
    fill, outline = (color, _edge_color(o, color)) if o.filled else (None, color)
    if o.shape == "circle":
        draw.ellipse((x - r * 0.92, y - r * 0.92, x + r * 0.92, y + r * 0.92), fill=fill, outline=outline,
                     width=width)
    else:
        draw.polygon(_polygon(o.shape, x, y, r, o.variant, o.angle), fill=fill, outline=outline, width=width)


def render(scene: Scene) -> PIL.Image.Image:
    """The scene as an RGB image of `scene.canvas` pixels (deterministic: the noise is seeded by the scene)."""
    k = scene.supersample
    width, height = scene.canvas
    img = _background(scene, width * k, height * k)
    draw = ImageDraw.Draw(img)
    classic_width = max(1, k * min(width, height) // 64)  # outline width in supersampled pixels
    for o in scene.objects:
        _draw_object(draw, o, k, classic_width)
    if scene.word and scene.word_box:
        x0, y0, x1, y1 = (v * k for v in scene.word_box)
        draw.text(((x0 + x1) / 2, (y0 + y1) / 2), scene.word.upper(),
                  font=_font(font_size(min(width, height)) * k), fill=TEXT_COLOR, anchor="mm", stroke_width=k,
                  stroke_fill=TEXT_COLOR)
    if k != 1:
        img = img.resize((width, height), PIL.Image.Resampling.BOX)
    if scene.blur:
        img = img.filter(ImageFilter.GaussianBlur(scene.blur))
    if scene.noise:
        noise = np.random.default_rng(scene.seed).normal(0.0, scene.noise, (height, width, 1))
        img = PIL.Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).round().astype(np.uint8))
    return img
