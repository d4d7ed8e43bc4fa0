"""LLaVA-1.6 "AnyRes": merge an image's tile features and count the tokens that yields.

The grid geometry (pinpoints, best resolution, unpadded extent) lives in
`llava.processing.anyres`, where image preprocessing uses it too; it is re-exported here for
code written against this module. Sizes are always (width, height), as in the original code.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from llava.processing.anyres import (
    ROUNDINGS,
    Size,
    as_size,
    check_rounding,
    grid_shape,
    parse_pinpoints,
    select_best_resolution,
    unpadded_extent,
)

MERGE_TYPES = ("flat", "spatial", "spatial_unpad")

__all__ = ["MERGE_TYPES", "ROUNDINGS", "Size", "anyres_feature_count", "grid_shape", "merge_anyres_features",
           "parse_pinpoints", "select_best_resolution", "unpad_features"]  # geometry re-exported from processing


def unpad_features(grid: Tensor, image_size: Size, rounding: str = "original") -> Tensor:
    """Drop the feature rows/columns that only saw resize-and-pad's black border.

    grid is channel-first [C, rows, cols]; image_size is the original (width, height).
    """
    r0, r1, c0, c1 = unpadded_extent(grid.shape[1], grid.shape[2], image_size, rounding)
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
        raise ValueError(f"image {tuple(as_size(image_size))} selects a {tiles_w}x{tiles_h} tile grid, "
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
    check_rounding(rounding)
    tiles_w, tiles_h = grid_shape(image_size, pinpoints, crop_size)
    per_crop = patches_per_side * patches_per_side
    if merge_type != "spatial_unpad":
        return per_crop * (1 + tiles_w * tiles_h)
    r0, r1, c0, c1 = unpadded_extent(tiles_h * patches_per_side, tiles_w * patches_per_side,
                                      image_size, rounding)
    return per_crop + (r1 - r0) * (c1 - c0 + 1)
