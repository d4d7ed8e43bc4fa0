"""Image loading and preprocessing (llava/processing/image.py), checked against transformers' PIL backend."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from llava.processing.image import (
    ImageError,
    ImageProcessor,
    expand2square,
    image_to_base64,
    load_image,
)

V16 = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]  # (width, height)
SIZES = [(640, 480), (337, 1000), (100, 90), (336, 336), (999, 335), (17, 500)]


def _random_image(w: int, h: int, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed + w * 10007 + h)
    return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _hf(name: str, **kwargs):
    """transformers' image processor by name; without torchvision it is the PIL backend."""
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, name)(**kwargs)


def _hf_pixels(processor, img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(processor(img, return_tensors="np")["pixel_values"][0]))


# ---------------------------------------------------------------- parity with transformers
@pytest.mark.parametrize("size", SIZES)
def test_matches_clip_image_processor(size):
    hf = _hf("CLIPImageProcessor", size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    img = _random_image(*size)
    ours = ImageProcessor(aspect="square").preprocess(img)
    theirs = _hf_pixels(hf, img)
    assert ours.shape == theirs.shape == (3, 336, 336) and ours.dtype == torch.float32
    # identical arithmetic (uint8 -> float64 * 1/255 -> float32, float32 normalise): exact in practice
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_matches_clip_with_different_shortest_edge():
    hf = _hf("CLIPImageProcessor", size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224})
    ours = ImageProcessor(crop_size=224, shortest_edge=256, aspect="square")
    for size in [(300, 200), (50, 400)]:
        img = _random_image(*size)
        assert (ours.preprocess(img) - _hf_pixels(hf, img)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("size", [(640, 480), (100, 90), (200, 600)])
def test_matches_siglip_square_resize(size):
    hf = _hf("SiglipImageProcessor", size={"height": 384, "width": 384})
    ours = ImageProcessor(crop_size=384, resize_mode="square", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                          aspect="square")
    img = _random_image(*size)
    assert (ours.preprocess(img) - _hf_pixels(hf, img)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("size", [(640, 480), (1000, 300), (200, 700), (336, 336)])
def test_anyres_matches_llava_next_processor(size):
    hf = _hf("LlavaNextImageProcessor", size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
             image_grid_pinpoints=[[h, w] for w, h in V16])
    img = _random_image(*size)
    tensors, sizes = ImageProcessor(aspect="anyres", pinpoints=V16)([img])
    out = hf(img, return_tensors="np")
    assert sizes == [size] and out["image_sizes"][0].tolist() == [size[1], size[0]]
    assert (tensors[0] - torch.from_numpy(out["pixel_values"][0])).abs().max().item() <= 1e-5


def test_pad_matches_llava_image_processor():
    hf = _hf("LlavaImageProcessor", size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
             do_pad=True)
    for size in [(640, 480), (120, 500)]:
        img = _random_image(*size)
        ours = ImageProcessor(aspect="pad")([img])[0][0]
        assert (ours - _hf_pixels(hf, img)).abs().max().item() <= 1e-5


# ---------------------------------------------------------------- pad / anyres behaviour
def test_pad_background_is_mean_colour():
    proc = ImageProcessor()
    assert proc.background == (122, 116, 104)
    img = PIL.Image.new("RGB", (10, 4), (255, 0, 0))
    sq = expand2square(img, proc.background)
    assert sq.size == (10, 10)
    arr = np.asarray(sq)
    assert (arr[:3] == (122, 116, 104)).all() and (arr[3:7] == (255, 0, 0)).all() and (arr[7:] == (122, 116, 104)).all()
    tall = np.asarray(expand2square(PIL.Image.new("RGB", (3, 8), (0, 0, 255)), (1, 2, 3)))
    assert (tall[:, :2] == (1, 2, 3)).all() and (tall[:, 2:5] == (0, 0, 255)).all() and (tall[:, 5:] == (1, 2, 3)).all()
    assert expand2square(img.resize((5, 5)), (0, 0, 0)).size == (5, 5)


def test_pad_output_of_wide_image_has_background_bands():
    img = PIL.Image.new("RGB", (672, 336), (0, 0, 0))
    pixels = ImageProcessor(aspect="pad")([img])[0][0]
    assert pixels.shape == (1, 3, 336, 336)
    background = ImageProcessor().preprocess(PIL.Image.new("RGB", (4, 4), (122, 116, 104)))[:, 0, 0]
    assert torch.equal(pixels[0, :, 0, 0], background) and torch.equal(pixels[0, :, -1, -1], background)


def test_square_aspect_is_processor_only():
    img = _random_image(640, 480)
    tensors, sizes = ImageProcessor(aspect="square")([img, _random_image(50, 60)])
    assert [t.shape for t in tensors] == [(1, 3, 336, 336)] * 2 and sizes == [(640, 480), (50, 60)]
    assert torch.equal(tensors[0][0], ImageProcessor().preprocess(img))


def test_anyres_shapes_and_tile_order():
    # 672x672 selects the 2x2 grid exactly, so tiles are plain crops in row-major order
    img = _random_image(672, 672)
    proc = ImageProcessor(aspect="anyres", pinpoints=V16)
    tensors, sizes = proc([img, _random_image(1000, 300), _random_image(300, 1000)])
    assert [tuple(t.shape) for t in tensors] == [(5, 3, 336, 336), (4, 3, 336, 336), (4, 3, 336, 336)]
    assert sizes == [(672, 672), (1000, 300), (300, 1000)]
    pixels = tensors[0]
    assert torch.equal(pixels[0], proc.preprocess(img.resize((336, 336), PIL.Image.BICUBIC)))
    boxes = [(0, 0), (336, 0), (0, 336), (336, 336)]  # (left, top): row-major
    for k, (x, y) in enumerate(boxes, start=1):
        assert torch.equal(pixels[k], proc.preprocess(img.crop((x, y, x + 336, y + 336))))


def test_anyres_padding_is_black():
    # 1000x300 -> 1008x336 canvas with the image resized to 1008x303 and pasted at y=16
    img = PIL.Image.new("RGB", (1000, 300), (255, 255, 255))
    proc = ImageProcessor(aspect="anyres", pinpoints=V16)
    tiles = proc([img])[0][0]
    black = proc.preprocess(PIL.Image.new("RGB", (1, 1)))[:, 0, 0]
    white = proc.preprocess(img)[:, 0, 0]
    assert torch.equal(tiles[1, :, 0, 0], black) and torch.equal(tiles[1, :, 20, 0], white)
    assert torch.equal(tiles[3, :, -1, -1], black)


def test_bad_settings():
    with pytest.raises(ValueError, match="pinpoints"):
        ImageProcessor(aspect="anyres")
    with pytest.raises(ValueError, match="aspect"):
        ImageProcessor(aspect="crop")
    with pytest.raises(ValueError, match="resize_mode"):
        ImageProcessor(resize_mode="longest_edge")


# ---------------------------------------------------------------- preprocessor_config.json
def test_from_pretrained_clip_siglip_next(tmp_path):
    clip = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 336},
            "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "resample": 3,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    assert ImageProcessor.from_pretrained(clip) == ImageProcessor()
    siglip = {"image_processor_type": "SiglipImageProcessor", "size": {"height": 384, "width": 384},
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3}
    sp = ImageProcessor.from_pretrained(siglip, aspect="square")
    assert (sp.crop_size, sp.resize_mode, sp.mean, sp.aspect) == (384, "square", (0.5, 0.5, 0.5), "square")
    nxt = dict(clip, image_processor_type="LlavaNextImageProcessor",
               image_grid_pinpoints=[[336, 672], [336, 1008]])  # (height, width)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(nxt))
    np_ = ImageProcessor.from_pretrained(tmp_path)
    assert np_.aspect == "anyres" and np_.pinpoints == [(672, 336), (1008, 336)]
    assert ImageProcessor.from_pretrained(tmp_path / "preprocessor_config.json") == np_
    old_style = {"crop_size": 224, "size": 224}
    assert ImageProcessor.from_pretrained(old_style).crop_size == 224
    with pytest.raises(FileNotFoundError):
        ImageProcessor.from_pretrained(tmp_path / "nope")


@pytest.mark.parametrize("proc", [
    ImageProcessor(),
    ImageProcessor(aspect="square"),
    ImageProcessor(aspect="anyres", pinpoints=V16),
    ImageProcessor(crop_size=384, resize_mode="square", mean=(0.5,) * 3, std=(0.5,) * 3, aspect="square"),
], ids=["pad", "square", "anyres", "siglip"])
def test_to_preprocessor_config_round_trip(tmp_path, proc):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(proc.to_preprocessor_config()))
    assert ImageProcessor.from_pretrained(tmp_path) == proc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    img = _random_image(500, 300)
    theirs = torch.from_numpy(np.asarray(hf(img, return_tensors="np")["pixel_values"]))
    ours = proc([img])[0][0]
    assert (theirs.reshape(ours.shape) - ours).abs().max().item() <= 1e-5


# ---------------------------------------------------------------- load_image
def _png_bytes(img: PIL.Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_load_image_sources(tmp_path):
    img = _random_image(40, 30)
    path = tmp_path / "a.png"
    img.save(path)
    for source in (path, str(path), _png_bytes(img), image_to_base64(img),
                   "data:image/png;base64," + image_to_base64(img)):
        loaded = load_image(source)
        assert loaded.mode == "RGB" and np.array_equal(np.asarray(loaded), np.asarray(img))
    rgba = PIL.Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert load_image(rgba).mode == "RGB" and load_image(rgba).getpixel((0, 0)) == (10, 20, 30)
    gray = tmp_path / "g.jpg"
    PIL.Image.new("L", (8, 8), 200).save(gray)
    assert load_image(gray).mode == "RGB"


def test_load_image_missing_file(tmp_path):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(ImageError, match="image file not found: .*missing.jpg"):
        load_image(missing)
    with pytest.raises(ImageError, match="not found"):
        load_image("relative/missing.png")
    long_path = "/data/" + "x" * 80  # long and base64-looking: still reported as a missing file
    with pytest.raises(ImageError, match="image file not found: /data/xxx"):
        load_image(long_path)


def test_load_image_corrupt_and_truncated(tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"this is not an image at all")
    with pytest.raises(ImageError, match=r"corrupt\.jpg is not a readable image"):
        load_image(corrupt)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(_png_bytes(_random_image(64, 64))[:300])
    with pytest.raises(ImageError, match=r"truncated\.png is not a readable image"):
        load_image(truncated)
    with pytest.raises(ImageError, match="<image bytes> is not a readable image"):
        load_image(b"\x89PNG garbage")
    with pytest.raises(ImageError, match="base64"):
        load_image("data:image/png;base64," + base64.b64encode(b"nope" * 20).decode())
    assert isinstance(ImageError("x"), ValueError)


def test_load_image_http(tmp_path):
    payload = _png_bytes(_random_image(20, 10))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            ok = self.path == "/img.png"
            self.send_response(200 if ok else 404)
            self.end_headers()
            if ok:
                self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert load_image(base + "/img.png").size == (20, 10)
        with pytest.raises(ImageError, match="could not download image .*/gone.png"):
            load_image(base + "/gone.png")
    finally:
        server.shutdown()
        server.server_close()
