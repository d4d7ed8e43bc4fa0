"""LLaVA-1.6 "AnyRes": pick a tiling grid for an image and merge the tiles' features.

Pure functions (torch only) shared by the model (merging projected features) and the
prompt builder (counting how many placeholder tokens an image needs *before* the forward
pass). Sizes are always (width, height), as in the original code; transformers' LlavaNext
uses (height, width) for both pinpoints and image sizes, so convert at that boundary.
"""

from __future__ import annotations

import ast
import math
import re
from typing import Any, Sequence

import torch
from torch import Tensor

Size = tuple[int, int]  # (width, height)

MERGE_TYPES = ("flat", "spatial", "spatial_unpad")
ROUNDINGS = ("original", "hf")

_RANGE_RE = re.compile(r"\((\d+)x(\d+)\)")


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
    if isinstance(value, Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"image grid pinpoints must be a list of [width, height] pairs, got {value!r}")
    out: list[Size] = []
    for pair in value:
        if isinstance(pair, Tensor):
            pair = pair.tolist()
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"each pinpoint must be a [width, height] pair, got {pair!r}")
        w, h = int(pair[0]), int(pair[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"pinpoint sides must be positive, got {pair!r}")
        out.append((w, h))
    return out


def _as_size(image_size: Any) -> Size:
    """(width, height) as Python ints; tensors would make the int() rounding below differ."""
    if isinstance(image_size, Tensor):
        image_size = image_size.tolist()
    w, h = int(image_size[0]), int(image_size[1])
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive (width, height), got {tuple(image_size)}")
    return w, h


def select_best_resolution(image_size: Size, candidates: Sequence[Size]) -> Size:
    """The candidate that keeps the most of the image's pixels when fitted inside it.

    Maximise the effective (downscaled, capped at original) pixel count; on a tie take the
    one wasting the least area; on an exact tie the first listed (facts 4.3).
    """
    width, height = _as_size(image_size)
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


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown unpad rounding {rounding!r}; expected one of {', '.join(ROUNDINGS)}")


def _unpadded_extent(rows: int, cols: int, image_size: Size, rounding: str) -> tuple[int, int, int, int]:
    """(row_start, row_stop, col_start, col_stop) of the image content inside a padded grid.

    resize-and-pad letterboxed the image along one axis; undo it on the feature grid. Upstream
    truncates `h*scale`; transformers rounds to 7 decimals first, which can keep one more row
    when the product lands a hair below an integer.
    """
    _check_rounding(rounding)
    width, height = _as_size(image_size)
    if width / height > cols / rows:  # image wider than the grid: padding on top and bottom
        new = height * (cols / width)
        new_rows = int(round(new, 7)) if rounding == "hf" else int(new)
        pad = (rows - new_rows) // 2
        return pad, rows - pad, 0, cols
    new = width * (rows / height)  # taller (or same shape): padding left and right
    new_cols = int(round(new, 7)) if rounding == "hf" else int(new)
    pad = (cols - new_cols) // 2
    return 0, rows, pad, cols - pad


def unpad_features(grid: Tensor, image_size: Size, rounding: str = "original") -> Tensor:
    """Drop the feature rows/columns that only saw resize-and-pad's black border.

    grid is channel-first [C, rows, cols]; image_size is the original (width, height).
    """
    r0, r1, c0, c1 = _unpadded_extent(grid.shape[1], grid.shape[2], image_size, rounding)
    return grid[:, r0:r1, c0:c1]


def _patches_per_side(n_patches: int) -> int:
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ValueError(f"spatial merging needs a square patch grid per crop, got {n_patches} patches")
    return side


def _check_merge_type(merge_type: str) -> None:
    if merge_type not in MERGE_TYPES:
        raise ValueError(f"unknown mm_patch_merge_type {merge_type!r}; expected one of {', '.join(MERGE_TYPES)}")


def merge_anyres_features(features: Tensor, image_size: Size, pinpoints: Any, crop_size: int,
                          merge_type: str, image_newline: Tensor | None = None,
                          rounding: str = "original") -> Tensor:
    """Turn one image's per-crop features [1 + n_crops, P, H] into its token sequence [N, H].

    - flat: every crop's patches in order (v1.5 style).
    - spatial: base crop, then the tiles laid out as one big patch grid, row-major.
    - spatial_unpad (v1.6): same grid with the padding removed and `image_newline` appended
      after every grid row, so the LM can see where rows end.
    A lone crop (no tiling) is just the base, plus one newline for spatial_unpad.
    """
    _check_merge_type(merge_type)
    if features.dim() != 3:
        raise ValueError(f"features must be [crops, patches, hidden], got shape {tuple(features.shape)}")
    if merge_type == "flat":
        return features.flatten(0, 1)
    unpad = merge_type == "spatial_unpad"
    if unpad and image_newline is None:
        raise ValueError("spatial_unpad merging needs the image_newline vector")
    base = features[0]
    if features.shape[0] == 1:
        if unpad:
            return torch.cat([base, image_newline[None].to(base)], dim=0)
        return base

    n_crops, n_patches, hidden = features.shape
    side = _patches_per_side(n_patches)
    tiles_w, tiles_h = grid_shape(image_size, pinpoints, crop_size)
    if n_crops - 1 != tiles_w * tiles_h:
        raise ValueError(f"image {tuple(_as_size(image_size))} selects a {tiles_w}x{tiles_h} tile grid, "
                         f"but {n_crops - 1} tile features were given (plus the base)")
    tiles = features[1:].view(tiles_h, tiles_w, side, side, hidden)
    if not unpad:
        # (tile row, patch row, tile col, patch col) -> one row-major grid of patches
        grid_tokens = tiles.permute(0, 2, 1, 3, 4).reshape(-1, hidden)
    else:
        grid = tiles.permute(4, 0, 2, 1, 3).reshape(hidden, tiles_h * side, tiles_w * side)
        grid = unpad_features(grid, image_size, rounding)
        newline = image_newline.to(grid)[:, None, None].expand(hidden, grid.shape[1], 1)
        grid = torch.cat([grid, newline], dim=2)
        grid_tokens = grid.flatten(1, 2).transpose(0, 1)
    return torch.cat([base, grid_tokens], dim=0)


def anyres_feature_count(image_size: Size, pinpoints: Any, crop_size: int, patches_per_side: int,
                         merge_type: str = "spatial_unpad", rounding: str = "original") -> int:
    """How many feature rows `merge_anyres_features` yields for an anyres-processed image.

    Computed from sizes only so `<image>` placeholders can be expanded before the forward pass.
    """
    _check_merge_type(merge_type)
    _check_rounding(rounding)
    tiles_w, tiles_h = grid_shape(image_size, pinpoints, crop_size)
    per_crop = patches_per_side * patches_per_side
    if merge_type != "spatial_unpad":
        return per_crop * (1 + tiles_w * tiles_h)
    r0, r1, c0, c1 = _unpadded_extent(tiles_h * patches_per_side, tiles_w * patches_per_side,
                                      image_size, rounding)
    return per_crop + (r1 - r0) * (c1 - c0 + 1)
