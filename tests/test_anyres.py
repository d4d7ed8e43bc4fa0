"""AnyRes grid selection, unpadding, merging and token counting (llava/model/anyres.py)."""

from __future__ import annotations

import random

import pytest
import torch

from llava.model.anyres import (
    anyres_feature_count,
    grid_shape,
    merge_anyres_features,
    parse_pinpoints,
    select_best_resolution,
    unpad_features,
)

V16 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # (width, height)
CROP, SIDE, P = 336, 24, 576


def _features(image_size, hidden=4, pinpoints=V16, seed=0):
    npw, nph = grid_shape(image_size, pinpoints, CROP)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1 + npw * nph, P, hidden, generator=g)


# ---------------------------------------------------------------- token counts (facts 4.5)
@pytest.mark.parametrize("size, best, count", [
    ((640, 480), (672, 672), 2340),
    ((480, 640), (672, 672), 2352),
    ((1024, 1024), (672, 672), 2928),
    ((336, 336), (336, 672), 1176),
    ((1000, 300), (1008, 336), 2182),
    ((1024, 899), (672, 672), 2634),
])
def test_worked_examples(size, best, count):
    assert select_best_resolution(size, parse_pinpoints(V16)) == best
    assert anyres_feature_count(size, V16, CROP, SIDE) == count
    newline = torch.zeros(4)
    assert merge_anyres_features(_features(size), size, V16, CROP, "spatial_unpad", newline).shape == (count, 4)


def test_worked_example_grids():
    # 640x480: 2x2 tiles -> 48x48 grid, unpadded to 36 rows; 1000x300: 3x1 -> 22 rows x 72 cols
    grid = torch.zeros(1, 48, 48)
    assert unpad_features(grid, (640, 480)).shape == (1, 36, 48)
    assert unpad_features(torch.zeros(1, 24, 72), (1000, 300)).shape == (1, 22, 72)
    assert unpad_features(torch.zeros(1, 48, 48), (1024, 899)).shape == (1, 42, 48)
    assert unpad_features(torch.zeros(1, 48, 48), (480, 640)).shape == (1, 48, 36)  # tall: columns go
    assert grid_shape((1000, 300), V16, CROP) == (3, 1)
    assert grid_shape((300, 1000), V16, CROP) == (1, 3)


# ---------------------------------------------------------------- select_best_resolution
def test_select_best_tie_rules():
    # equal effective and waste -> the first listed wins
    assert select_best_resolution((336, 336), [(672, 336), (336, 672)]) == (672, 336)
    assert select_best_resolution((336, 336), [(336, 672), (672, 336)]) == (336, 672)
    # equal effective resolution (capped at the original's) -> least waste wins, wherever listed
    assert select_best_resolution((100, 100), [(672, 672), (336, 336)]) == (336, 336)
    # more effective resolution wins despite more waste
    assert select_best_resolution((1000, 1000), [(336, 336), (672, 672)]) == (672, 672)
    # effective uses truncated downscaled sides: 1000x300 into 672x672 keeps 672x201
    assert select_best_resolution((1000, 300), [(672, 672), (1008, 336)]) == (1008, 336)


def test_select_best_errors():
    with pytest.raises(ValueError, match="candidate"):
        select_best_resolution((10, 10), [])
    with pytest.raises(ValueError, match="positive"):
        select_best_resolution((0, 10), V16)


# ---------------------------------------------------------------- parse_pinpoints
def test_parse_pinpoints_forms():
    expected = [tuple(p) for p in V16]
    assert parse_pinpoints(V16) == expected
    assert parse_pinpoints(str(V16)) == expected
    assert parse_pinpoints(tuple(tuple(p) for p in V16)) == expected
    assert parse_pinpoints(torch.tensor(V16)) == expected
    rng = parse_pinpoints("(1x1),...,(2x3)", crop_size=336)
    assert rng == [(336, 336), (336, 672), (336, 1008), (672, 336), (672, 672), (672, 1008)]


@pytest.mark.parametrize("bad", ["not a list", "[[1, 2, 3]]", [[0, 336]], 5, "[(336, 672"])
def test_parse_pinpoints_rejects(bad):
    with pytest.raises(ValueError):
        parse_pinpoints(bad)


def test_parse_range_needs_crop_size():
    with pytest.raises(ValueError, match="crop_size"):
        parse_pinpoints("(1x1),...,(3x3)")


# ---------------------------------------------------------------- merging
def test_merge_shapes_match_count_for_random_sizes():
    rnd = random.Random(1234)
    newline = torch.randn(4)
    for _ in range(40):
        size = (rnd.randint(1, 2500), rnd.randint(1, 2500))
        feats = _features(size, seed=rnd.randint(0, 10**6))
        for merge in ("flat", "spatial", "spatial_unpad"):
            for rounding in ("original", "hf"):
                out = merge_anyres_features(feats, size, V16, CROP, merge, newline, rounding=rounding)
                assert out.shape == (anyres_feature_count(size, V16, CROP, SIDE, merge, rounding), 4), (size, merge)


def test_flat_and_spatial_layout():
    size = (1000, 300)  # 3 tiles across, 1 down
    feats = _features(size)
    assert torch.equal(merge_anyres_features(feats, size, V16, CROP, "flat"), feats.flatten(0, 1))
    out = merge_anyres_features(feats, size, V16, CROP, "spatial")
    assert torch.equal(out[:P], feats[0])
    grid = out[P:].view(SIDE, 3 * SIDE, 4)  # rows x cols of the whole tiled image
    for r, c in [(0, 0), (5, 30), (23, 71), (10, 48)]:
        tile, patch = 1 + c // SIDE, r * SIDE + c % SIDE
        assert torch.equal(grid[r, c], feats[tile, patch])


def test_newline_ends_every_row():
    size = (640, 480)  # 2x2 tiles, 48x48 grid, unpadded to rows 6..42
    feats = _features(size)
    newline = torch.full((4,), 7.5)
    out = merge_anyres_features(feats, size, V16, CROP, "spatial_unpad", newline)
    assert torch.equal(out[:P], feats[0])
    rows = out[P:].view(36, 49, 4)
    assert torch.equal(rows[:, -1], newline.expand(36, 4))
    assert not (rows[:, :-1] == 7.5).all(-1).any()
    # first kept row is grid row 6 (tile row 0, patch row 6); column 30 is tile col 1
    assert torch.equal(rows[0, 30], feats[2, 6 * SIDE + 6])
    assert torch.equal(rows[35, 0], feats[3, 17 * SIDE])  # grid row 41 = tile row 1, patch row 17


def test_single_crop_base_only():
    base = torch.randn(1, P, 4)
    newline = torch.randn(4)
    assert torch.equal(merge_anyres_features(base, (10, 10), [], CROP, "spatial"), base[0])
    out = merge_anyres_features(base, (10, 10), [], CROP, "spatial_unpad", newline)
    assert out.shape == (P + 1, 4) and torch.equal(out[-1], newline)


def test_newline_dtype_follows_features():
    size = (640, 480)
    out = merge_anyres_features(_features(size).half(), size, V16, CROP, "spatial_unpad", torch.randn(4))
    assert out.dtype == torch.float16


def test_merge_errors():
    feats = _features((640, 480))
    with pytest.raises(ValueError, match="flat, spatial, spatial_unpad"):
        merge_anyres_features(feats, (640, 480), V16, CROP, "unpad")
    with pytest.raises(ValueError, match="image_newline"):
        merge_anyres_features(feats, (640, 480), V16, CROP, "spatial_unpad")
    with pytest.raises(ValueError, match="2x2 tile grid"):
        merge_anyres_features(feats[:3], (640, 480), V16, CROP, "spatial")
    with pytest.raises(ValueError, match="rounding"):
        anyres_feature_count((640, 480), V16, CROP, SIDE, rounding="nearest")


def test_rounding_modes_can_disagree():
    # 55x176 in a 48x24 grid: 55 * (48/176) = 14.999999999999998 -> upstream keeps 14 columns
    # (pad 5 each side), transformers rounds to 15 and keeps 16 (pad 4): 96 tokens apart.
    assert anyres_feature_count((55, 176), V16, CROP, SIDE) == P + 48 * 15
    assert anyres_feature_count((55, 176), V16, CROP, SIDE, rounding="hf") == P + 48 * 17
    assert anyres_feature_count((640, 480), V16, CROP, SIDE, rounding="hf") == 2340


# ---------------------------------------------------------------- transformers LlavaNext parity
@pytest.fixture(scope="module")
def hf_next():
    transformers = pytest.importorskip("transformers")
    hf_pinpoints = [[h, w] for w, h in V16]  # NeXT configs store (height, width)
    cfg = transformers.LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=8, intermediate_size=16,
                           num_hidden_layers=1, num_attention_heads=2, image_size=CROP, patch_size=14),
        text_config=dict(model_type="llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64),
        image_grid_pinpoints=hf_pinpoints)
    torch.manual_seed(0)
    return transformers.LlavaNextModel(cfg).eval()


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1000, 300), (300, 1000), (1024, 899),
                                  (336, 336), (55, 176), (88, 55), (47, 1128), (1, 1), (2000, 37)])
def test_matches_transformers_pack_image_features(hf_next, size):
    from transformers.models.llava_next import modeling_llava_next as mln

    w, h = size
    feats = _features(size, hidden=16, seed=w * 7919 + h)
    newline = hf_next.image_newline.detach()
    with torch.no_grad():
        packed, lens = hf_next.pack_image_features([feats], torch.tensor([[h, w]]), "default", image_newline=newline)
    ours = merge_anyres_features(feats, size, V16, CROP, "spatial_unpad", newline, rounding="hf")
    assert torch.equal(packed[0], ours)
    assert int(lens[0]) == anyres_feature_count(size, V16, CROP, SIDE, rounding="hf")
    # grid helpers agree too, modulo (h, w) <-> (w, h)
    hf_pins = hf_next.config.image_grid_pinpoints
    assert mln.get_anyres_image_grid_shape((h, w), hf_pins, CROP) == grid_shape(size, V16, CROP)[::-1]
    npw, nph = grid_shape(size, V16, CROP)
    assert mln.image_size_to_num_patches((h, w), hf_pins, CROP) == 1 + npw * nph


def test_matches_transformers_single_crop(hf_next):
    feats = torch.randn(1, P, 16)
    newline = hf_next.image_newline.detach()
    with torch.no_grad():
        packed, _ = hf_next.pack_image_features([feats], torch.tensor([[5, 5]]), "default", image_newline=newline)
    assert torch.equal(packed[0], merge_anyres_features(feats, (5, 5), V16, CROP, "spatial_unpad", newline))
