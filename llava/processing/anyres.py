"""LLaVA-1.6 "AnyRes" geometry: parse grid pinpoints, pick a tiling grid, find the unpadded area.

Pure arithmetic on sizes (no torch), so image preprocessing can choose the grid without
depending on the model; `llava.model.anyres` merges the tiles' features on the same grid.
Sizes are always (width, height), as in the original code; transformers' LlavaNext uses
(height, width) for both pinpoints and image sizes, so convert at that boundary.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Sequence
from typing import Any

Size = tuple[int, int]  # (width, height)

ROUNDINGS = ("original", "hf")

_RANGE_RE = re.compile(r"\((\d+)x(\d+)\)")


def _as_list(value: Any) -> Any:
    """A tensor or array as nested lists (duck-typed, so this module never imports torch)."""
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, (str, bytes)) else value


def parse_pinpoints(value: Any, crop_size: int | None = None) -> list[Size]:
    """Normalise grid pinpoints to a list of (width, height) int pairs.

    Accepts a list of pairs, its string form (configs store it either way; the original uses
    `ast.literal_eval`), or the LLaVA-NeXT range form "(1x1),...,(3x3)", which expands to
    every (i*crop, j*crop) grid between the first and last entry and so needs `crop_size`.
    """
    if isinstance(value, str):
        text = value.strip()
        matches = _RANGE_RE.findall(text)
        if matches:
            if crop_size is None:
                raise ValueError(f"pinpoint range {value!r} needs crop_size to expand into resolutions")
            (i0, j0), (i1, j1) = (tuple(map(int, m)) for m in (matches[0], matches[-1]))
            return [(i * crop_size, j * crop_size) for i in range(i0, i1 + 1) for j in range(j0, j1 + 1)]
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"cannot parse image grid pinpoints {value!r}: expected a list of "
                             f"[width, height] pairs or a range like '(1x1),...,(3x3)'") from e
    value = _as_list(value)
    if not isinstance(value, (list, tuple)):  # a bad config value: ValueError, like every other case here
        raise ValueError(f"image grid pinpoints must be a list of [width, height] pairs, got {value!r}")  # noqa: TRY004
    out: list[Size] = []
    for pair in value:
        pair = _as_list(pair)
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"each pinpoint must be a [width, height] pair, got {pair!r}")
        w, h = int(pair[0]), int(pair[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"pinpoint sides must be positive, got {pair!r}")
        out.append((w, h))
    return out


def as_size(image_size: Any) -> Size:
    """(width, height) as Python ints; tensors would make the int() rounding below differ."""
    image_size = _as_list(image_size)
    w, h = int(image_size[0]), int(image_size[1])
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive (width, height), got {tuple(image_size)}")
    return w, h


def select_best_resolution(image_size: Size, candidates: Sequence[Size]) -> Size:
    """The candidate that keeps the most of the image's pixels when fitted inside it.

    Maximise the effective (downscaled, capped at original) pixel count; on a tie take the
    one wasting the least area; on an exact tie the first listed (facts 4.3).
    """
    width, height = as_size(image_size)
    best: Size | None = None
    max_effective, min_wasted = 0, math.inf
    for cand_w, cand_h in candidates:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_w * cand_h - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            best, max_effective, min_wasted = (int(cand_w), int(cand_h)), effective, wasted
    if best is None:
        raise ValueError("select_best_resolution needs at least one candidate resolution")
    return best


def grid_shape(image_size: Size, pinpoints: Any, crop_size: int) -> tuple[int, int]:
    """(tiles across, tiles down) = chosen resolution // crop size."""
    best_w, best_h = select_best_resolution(image_size, parse_pinpoints(pinpoints, crop_size))
    return best_w // crop_size, best_h // crop_size


def check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown unpad rounding {rounding!r}; expected one of {', '.join(ROUNDINGS)}")


def unpadded_extent(rows: int, cols: int, image_size: Size, rounding: str) -> tuple[int, int, int, int]:
    """(row_start, row_stop, col_start, col_stop) of the image content inside a padded grid.

    resize-and-pad letterboxed the image along one axis; undo it on the feature grid. Upstream
    truncates `h*scale`; transformers rounds to 7 decimals first, which can keep one more row
    when the product lands a hair below an integer.
    """
    check_rounding(rounding)
    width, height = as_size(image_size)
    if width / height > cols / rows:  # image wider than the grid: padding on top and bottom
        new = height * (cols / width)
        new_rows = int(round(new, 7)) if rounding == "hf" else int(new)
        pad = (rows - new_rows) // 2
        return pad, rows - pad, 0, cols
    new = width * (rows / height)  # taller (or same shape): padding left and right
    new_cols = int(round(new, 7)) if rounding == "hf" else int(new)
    pad = (cols - new_cols) // 2
    return 0, rows, pad, cols - pad
