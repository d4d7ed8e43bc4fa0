"""An independent renderer of shape pictures, used only for evaluation (never for training).

The training pictures (`llava.data.synth_scene`) are PIL polygons with a dark outline, a few
fixed RGB colours and 96x96 canvases. A model that learnt only those can look good on its own
benchmark and still fail on the first picture a person draws. This module draws the same
vocabulary differently: each shape is a signed distance evaluated on a pixel grid in numpy
(no PIL.ImageDraw), with supersampled or hard edges, filled or outline-only, in shades of
each colour chosen here, on canvases of any size and aspect, plain, tinted or noisy, saved
as PNG or JPEG. A `Drawing` is plain data, so answers are derived from it without pixels.
"""

from __future__ import annotations

import colorsys
import io
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import PIL.Image

RGB = tuple[int, int, int]

SHAPE_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
# Shades a person would give that name to; none is a training colour, none is borderline
# (no orange-ish red, no teal green, no blue-ish purple).
SHADES: dict[str, tuple[RGB, ...]] = {
    "red": ((200, 30, 30), (230, 45, 50), (180, 20, 35), (240, 60, 60), (205, 0, 10)),
    "yellow": ((255, 215, 0), (255, 232, 40), (245, 205, 25), (255, 238, 80), (235, 210, 10)),
    "green": ((40, 170, 60), (30, 130, 45), (90, 190, 70), (60, 155, 40), (20, 115, 30)),
    "blue": ((30, 90, 220), (20, 50, 180), (60, 120, 240), (0, 70, 200), (40, 60, 160)),
    "purple": ((130, 50, 190), (110, 30, 160), (160, 70, 210), (120, 60, 180), (145, 35, 175)),
    "pink": ((250, 130, 190), (240, 100, 170), (255, 160, 210), (230, 110, 180), (255, 145, 200)),
    "gray": ((110, 110, 110), (150, 150, 150), (90, 92, 95), (165, 165, 160), (130, 132, 128)),
}
COLOR_NAMES: tuple[str, ...] = tuple(SHADES)
# Largest size (fraction of the canvas's shorter side) per object count: several only as many as fit.
_MAX_FRACTION = {1: 0.9, 2: 0.55, 3: 0.45, 4: 0.4, 5: 0.35, 6: 0.3}
MIN_FRACTION, MIN_PX = 0.15, 12


@dataclass
class Item:
    """One shape. `x`, `y`: centre in pixels (pixel j spans [j, j+1)); `size`: diameter of the
    circle all its corners lie on; `ratio`: the shape's own proportion (star inner/outer radius,
    cross arm thickness/extent, diamond width/height, triangle base half-width; unused for
    circle and square); `angle`: rotation in degrees (squares only)."""

    shape: str
    color: str
    rgb: RGB
    x: float
    y: float
    size: float
    style: str = "filled"  # "filled" | "outline" (outline only: the stroke's colour is `rgb`)
    stroke: float = 0.0  # outline: stroke width; filled: width of the edge (0 = none)
    edge_rgb: RGB | None = None  # filled shapes' edge colour
    ratio: float = 0.0
    angle: float = 0.0


@dataclass
class Drawing:
    """A whole picture: canvas, background, how it is rasterised and saved, and its items."""

    width: int
    height: int
    background: RGB
    noise: float = 0.0  # sigma of per-pixel Gaussian noise (0 = none)
    noise_seed: int = 0
    samples: int = 1  # supersampling per axis (1 = hard edges)
    fmt: str = "png"  # "png" | "jpeg"
    quality: int = 90
    items: list[Item] = field(default_factory=list)

    def count(self, shape: str | None = None, color: str | None = None) -> int:
        return sum((shape is None or o.shape == shape) and (color is None or o.color == color) for o in self.items)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Drawing:
        items = [Item(**{**o, "rgb": tuple(o["rgb"]),
                         "edge_rgb": tuple(o["edge_rgb"]) if o.get("edge_rgb") else None}) for o in d["items"]]
        return cls(**{**d, "background": tuple(d["background"]), "items": items})


# -- geometry: signed distance (negative inside) -----------------------------------------------


def _unit(vertices: Sequence[tuple[float, float]]) -> np.ndarray:
    """Vertices scaled so the farthest lies on the unit circle (y grows downwards)."""
    v = np.asarray(vertices, dtype=np.float64)
    return v / np.hypot(v[:, 0], v[:, 1]).max()


def outline_of(item: Item) -> np.ndarray:
    """The polygon of a non-circle shape, in pixels. All shapes point up."""
    r = item.ratio
    if item.shape == "square":
        a = math.radians(item.angle)
        v = _unit([(math.cos(a + k * math.pi / 2 + math.pi / 4), math.sin(a + k * math.pi / 2 + math.pi / 4))
                   for k in range(4)])
    elif item.shape == "triangle":
        v = _unit([(0.0, -1.0), (r, 0.5), (-r, 0.5)])
    elif item.shape == "star":
        v = _unit([((1.0 if k % 2 == 0 else r) * math.sin(k * math.pi / 5),
                    -(1.0 if k % 2 == 0 else r) * math.cos(k * math.pi / 5)) for k in range(10)])
    elif item.shape == "cross":
        t = r / 2
        v = _unit([(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t),
                   (-1, -t), (-t, -t)])
    elif item.shape == "diamond":
        v = _unit([(0.0, -1.0), (r, 0.0), (0.0, 1.0), (-r, 0.0)])
    else:
        raise ValueError(f"not a polygon shape: {item.shape!r}")
    return v * (item.size / 2) + np.array([item.x, item.y])


def _polygon_sdf(v: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Distance to the polygon's boundary, negative inside (even-odd ray casting for the sign)."""
    d2 = np.full(x.shape, np.inf)
    inside = np.zeros(x.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(v, np.roll(v, -1, axis=0)):
        ex, ey = x1 - x0, y1 - y0
        wx, wy = x - x0, y - y0
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        d2 = np.minimum(d2, (wx - ex * t) ** 2 + (wy - ey * t) ** 2)
        if y0 != y1:
            inside ^= ((y0 > y) != (y1 > y)) & (x < x0 + ex * (y - y0) / ey)
    return np.where(inside, -1.0, 1.0) * np.sqrt(d2)


def signed_distance(item: Item, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if item.shape == "circle":
        return np.hypot(x - item.x, y - item.y) - item.size / 2
    return _polygon_sdf(outline_of(item), x, y)


def coverage(item: Item, x0: int, y0: int, x1: int, y1: int, samples: int, inset: float = 0.0,
             band: float | None = None) -> np.ndarray:
    """Fraction of each pixel of the box [x0, x1) x [y0, y1) covered by the region
    d <= -inset (and d > -band, for an outline's stroke), from samples x samples points per pixel."""
    xs = x0 + (np.arange((x1 - x0) * samples) + 0.5) / samples
    ys = y0 + (np.arange((y1 - y0) * samples) + 0.5) / samples
    d = signed_distance(item, *np.meshgrid(xs, ys))
    hit = d <= -inset
    if band is not None:
        hit &= d > -band
    return hit.reshape(y1 - y0, samples, x1 - x0, samples).mean(axis=(1, 3))


# -- rendering ---------------------------------------------------------------------------------


def _paint(canvas: np.ndarray, item: Item, samples: int) -> None:
    """Alpha-composite one item onto the float canvas, in its bounding box only."""
    h, w = canvas.shape[:2]
    pad = 2
    x0, y0 = max(0, int(item.x - item.size / 2) - pad), max(0, int(item.y - item.size / 2) - pad)
    x1, y1 = min(w, int(item.x + item.size / 2) + pad + 1), min(h, int(item.y + item.size / 2) + pad + 1)
    box = canvas[y0:y1, x0:x1]
    layers: list[tuple[np.ndarray, RGB]] = []
    if item.style == "outline":
        layers.append((coverage(item, x0, y0, x1, y1, samples, band=item.stroke), item.rgb))
    else:
        if item.stroke > 0 and item.edge_rgb is not None:
            layers.append((coverage(item, x0, y0, x1, y1, samples), item.edge_rgb))
        layers.append((coverage(item, x0, y0, x1, y1, samples, inset=item.stroke), item.rgb))
    for alpha, rgb in layers:
        a = alpha[..., None]
        box[:] = box * (1 - a) + np.asarray(rgb, dtype=np.float64) * a


def render(drawing: Drawing) -> PIL.Image.Image:
    """The picture, deterministic: the same Drawing always gives the same pixels."""
    canvas = np.empty((drawing.height, drawing.width, 3), dtype=np.float64)
    canvas[:] = drawing.background
    for item in drawing.items:
        _paint(canvas, item, drawing.samples)
    if drawing.noise > 0:
        canvas += np.random.default_rng(drawing.noise_seed).normal(0.0, drawing.noise, canvas.shape)
    return PIL.Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")


def encode(drawing: Drawing) -> bytes:
    """The picture as file bytes, in the drawing's format (PNG, or JPEG at its quality)."""
    buf = io.BytesIO()
    if drawing.fmt == "jpeg":
        render(drawing).save(buf, format="JPEG", quality=drawing.quality)
    else:
        render(drawing).save(buf, format="PNG")
    return buf.getvalue()


# -- sampling ----------------------------------------------------------------------------------


def shade(rng: random.Random, color: str) -> RGB:
    """One of the colour's shades, jittered a little per channel."""
    base = rng.choice(SHADES[color])
    return tuple(min(255, max(0, c + rng.randint(-6, 6))) for c in base)  # type: ignore[return-value]


def _canvas(rng: random.Random) -> tuple[int, int]:
    """Width and height in 64..640, a quarter square, the rest up to 2:1 either way."""
    aspect = 1.0 if rng.random() < 0.25 else math.exp(rng.uniform(-math.log(2), math.log(2)))
    short = round(math.exp(rng.uniform(math.log(64), math.log(480))))
    long = min(640, round(short * max(aspect, 1 / aspect)))
    return (long, short) if aspect >= 1 else (short, long)


def _background(rng: random.Random, plain: bool) -> tuple[RGB, float]:
    """White, off-white or a light tint of any hue; light noise on some unless `plain`."""
    kind = rng.random()
    if kind < 0.4 or (plain and kind < 0.7):
        rgb: RGB = (255, 255, 255)
    elif kind < 0.6 or plain:
        rgb = (rng.randint(245, 252), rng.randint(243, 250), rng.randint(235, 245))
    else:
        r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.04, 0.14), rng.uniform(0.93, 1.0))
        rgb = (round(r * 255), round(g * 255), round(b * 255))
    noise = 0.0 if plain or rng.random() > 0.3 else round(rng.uniform(3.0, 8.0), 2)
    return rgb, noise


def _ratio(rng: random.Random, shape: str) -> float:
    if shape == "star":
        return rng.uniform(0.38, 0.5)
    if shape == "cross":
        return rng.uniform(0.3, 0.4)
    if shape == "diamond":
        return rng.uniform(0.6, 0.85)
    if shape == "triangle":  # equilateral half the time, else isosceles
        return math.sqrt(3) / 2 if rng.random() < 0.5 else rng.uniform(0.6, 1.0)
    return 0.0


def _place(rng: random.Random, sizes: Sequence[float], w: int, h: int, gap: float) -> list[tuple[float, float]] | None:
    """Centres with every item inside the canvas by `gap` and no two closer than `gap`."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    centres: dict[int, tuple[float, float]] = {}
    for i in order:
        r = sizes[i] / 2
        if 2 * (r + gap) > min(w, h):
            return None
        for _ in range(60):
            x, y = rng.uniform(r + gap, w - r - gap), rng.uniform(r + gap, h - r - gap)
            if all(math.dist((x, y), c) >= r + sizes[j] / 2 + gap for j, c in centres.items()):
                centres[i] = (round(x, 2), round(y, 2))
                break
        else:
            return None
    return [centres[i] for i in range(len(sizes))]


def make_item(rng: random.Random, shape: str, color: str, x: float, y: float, size: float) -> Item:
    """An item with this module's style choices: a quarter outline-only, the rest filled, some edged."""
    rgb = shade(rng, color)
    item = Item(shape, color, rgb, x, y, round(size, 2), ratio=round(_ratio(rng, shape), 4),
                angle=round(rng.uniform(-10, 10), 2) if shape == "square" and rng.random() < 0.5 else 0.0)
    if rng.random() < 0.25:
        item.style = "outline"
        item.stroke = round(rng.uniform(max(2.0, 0.06 * size), max(2.5, 0.12 * size)), 2)
    elif rng.random() < 0.5:
        item.stroke = round(max(1.0, rng.uniform(0.02, 0.04) * size), 2)
        item.edge_rgb = (tuple(round(c * 0.55) for c in rgb) if rng.random() < 0.5  # type: ignore[assignment]
                         else (rng.randint(25, 70),) * 3)
    return item


def sample_drawing(rng: random.Random, specs: Sequence[tuple[str, str]], *, large: bool = False,
                   plain: bool = False, tries: int = 100) -> Drawing:
    """A picture of the given (shape, colour) items at random sizes and places.

    `large`: sizes 60-90% of the shorter side (one big shape filling the picture); `plain`: a
    white or off-white background without noise. A canvas too small for the items is redrawn.
    """
    n = len(specs)
    for _ in range(tries):
        w, h = _canvas(rng)
        short = min(w, h)
        lo, hi = (0.6, 0.9) if large else (MIN_FRACTION, _MAX_FRACTION.get(n, 0.3))
        sizes = [max(MIN_PX, rng.uniform(lo, hi) * short) for _ in specs]
        centres = _place(rng, sizes, w, h, gap=max(2.0, 0.03 * short))
        if centres is None:
            continue
        background, noise = _background(rng, plain)
        items = [make_item(rng, s, c, x, y, z) for (s, c), (x, y), z in zip(specs, centres, sizes)]
        fmt = "jpeg" if rng.random() < 0.4 else "png"
        return Drawing(w, h, background, noise, rng.getrandbits(32), rng.choice((1, 1, 3, 4, 4)), fmt,
                       rng.randint(60, 90) if fmt == "jpeg" else 90, items)
    raise RuntimeError(f"could not place {n} items in {tries} canvases")


__all__ = ["SHAPE_NAMES", "COLOR_NAMES", "SHADES", "Item", "Drawing", "render", "encode", "sample_drawing",
           "make_item", "signed_distance", "coverage", "outline_of", "shade"]
