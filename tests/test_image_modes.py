"""Every PIL mode and odd source reaching load_image / ImageProcessor: right pixels or a clear error.

Expected pixels are computed here with numpy (or colorsys) from known 8-bit arrays, not by
asking PIL to convert, so a conversion that clips, blanks or rescales wrongly fails.
"""

from __future__ import annotations

import colorsys
import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageCms
import PIL.ImageOps
import pytest
import torch

import llava.processing.image as image_mod
from llava.errors import ImageError, ImageNotFound, InputTypeError, LlavaError
from llava.processing import image_io
from llava.processing.image import V16_PINPOINTS, ImageProcessor, load_image, max_pixels, to_rgb

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(21)
RGB8 = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)  # (H, W, C): not square, so rotations show
L8 = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
A8 = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
A8[0, 0], A8[0, 1] = 0, 255  # fully transparent and opaque pixels


def _encode(img: PIL.Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _rgb(source) -> np.ndarray:
    out = load_image(source)
    assert out.mode == "RGB"
    return np.asarray(out)


def _grey(arr: np.ndarray) -> np.ndarray:
    return np.repeat(arr[..., None], 3, axis=2)


def _png(arr: np.ndarray, bit_depth: int, colour_type: int, size: tuple[int, int] | None = None) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB/RGBA); `size` fakes the header's."""
    height, width = arr.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + arr[y].astype(dtype).tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", *(size or (width, height)), bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- 8-bit modes
def test_rgb_l_1_rgbx():
    assert np.array_equal(_rgb(_encode(PIL.Image.fromarray(RGB8), "PNG")), RGB8)
    assert np.array_equal(_rgb(_encode(PIL.Image.fromarray(L8), "PNG")), _grey(L8))
    bits = L8 > 127
    assert np.array_equal(_rgb(_encode(PIL.Image.fromarray(bits), "PNG")), _grey(bits.astype(np.uint8) * 255))
    rgbx = PIL.Image.frombytes("RGBX", (7, 5), np.dstack([RGB8, A8]).tobytes())
    assert np.array_equal(_rgb(rgbx), RGB8)


def test_alpha_is_dropped_keeping_the_stored_colour():
    """Upstream parity: a plain convert("RGB") keeps the colour under the alpha, even at alpha 0."""
    rgba = PIL.Image.fromarray(np.dstack([RGB8, A8]), "RGBA")
    for source in (rgba, _encode(rgba, "PNG"), _encode(rgba, "TIFF")):
        assert np.array_equal(_rgb(source), RGB8)
    la = PIL.Image.fromarray(np.dstack([L8, A8]), "LA")
    for source in (la, _encode(la, "PNG"), _encode(la, "TIFF")):
        assert np.array_equal(_rgb(source), _grey(L8))
    assert np.array_equal(_rgb(_png(np.dstack([L8, A8]), 8, 4)), _grey(L8))  # grey+alpha PNG from outside PIL


def test_premultiplied_la_and_rgba_are_unpremultiplied():
    alpha = np.maximum(A8, 128)
    alpha[0, 0] = 0
    premul_l = (L8.astype(int) * alpha // 255).astype(np.uint8)
    la = PIL.Image.frombytes("La", (7, 5), np.dstack([premul_l, alpha]).tobytes())
    expected = np.where(alpha > 0, np.minimum(255, np.round(premul_l * 255.0 / np.maximum(alpha, 1))), 0)
    assert np.abs(_rgb(la)[..., 0].astype(int) - expected).max() <= 1
    premul = (RGB8.astype(int) * alpha[..., None] // 255).astype(np.uint8)
    rgba = PIL.Image.frombytes("RGBa", (7, 5), np.dstack([premul, alpha]).tobytes())
    straight = np.minimum(255, np.round(premul * 255.0 / np.maximum(alpha, 1)[..., None]))
    expected = np.where(alpha[..., None] > 0, straight, 0)
    assert np.abs(_rgb(rgba).astype(int) - expected).max() <= 1


PALETTE = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
INDEX = RNG.integers(0, 256, (5, 7), dtype=np.uint8)


def _palette_image(transparency=None) -> PIL.Image.Image:
    img = PIL.Image.fromarray(INDEX, "P")
    img.putpalette(PALETTE.tobytes())
    if transparency is not None:
        img.info["transparency"] = transparency
    return img


_TRANSPARENCY = {"opaque": None, "index": int(INDEX[0, 0]), "alphas": bytes(range(256))}


@pytest.mark.parametrize("fmt,kind", [(f, k) for f in ("PIL", "PNG", "GIF", "TIFF") for k in _TRANSPARENCY
                                      if (f, k) != ("GIF", "alphas")])  # GIF: one transparent index only
def test_palette_with_and_without_transparency(fmt, kind):
    transparency = _TRANSPARENCY[kind]
    img = _palette_image(transparency)
    kwargs = {} if transparency is None else {"transparency": transparency}
    source = img if fmt == "PIL" else _encode(img, fmt, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Palette images with Transparency expressed in bytes" warning
        out = _rgb(source)
    assert np.array_equal(out, PALETTE[INDEX])  # transparent entries keep their palette colour


def test_palette_with_alpha_pa():
    pa = PIL.Image.fromarray(np.dstack([INDEX, A8]), "PA")
    pa.putpalette(PALETTE.tobytes())
    for source in (pa, _encode(pa, "TIFF")):
        assert np.array_equal(_rgb(source), PALETTE[INDEX])


def test_cmyk_uses_the_naive_formula():
    cmyk = RNG.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    c, k = cmyk[..., :3].astype(float), cmyk[..., 3:].astype(float)
    expected = (255 - c) * (255 - k) / 255
    img = PIL.Image.frombytes("CMYK", (7, 5), cmyk.tobytes())
    for source in (img, _encode(img, "TIFF")):
        assert np.abs(_rgb(source) - expected).max() <= 1


def _pillow_reads_back(data: bytes) -> bool:
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            img.load()
        return True
    except OSError:
        return False


def test_ycbcr_hsv_lab():
    y, cb, cr = (RNG.integers(16, 240, (5, 7)).astype(float) for _ in range(3))
    jfif = np.dstack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                      y + 1.772 * (cb - 128)])
    ycbcr = PIL.Image.frombytes("YCbCr", (7, 5), np.dstack([y, cb, cr]).astype(np.uint8).tobytes())
    sources = [ycbcr]
    if _pillow_reads_back(_encode(ycbcr, "TIFF")):  # Pillow 12.x writes YCbCr TIFFs it cannot read back
        sources.append(_encode(ycbcr, "TIFF"))
    for source in sources:
        assert np.abs(_rgb(source) - np.clip(jfif, 0, 255)).max() <= 2

    hsv = np.array([[colorsys.rgb_to_hsv(*(RGB8[i, j] / 255.0)) for j in range(7)] for i in range(5)])
    hsv_img = PIL.Image.frombytes("HSV", (7, 5), np.round(hsv * 255).astype(np.uint8).tobytes())
    assert np.abs(_rgb(hsv_img).astype(int) - RGB8).max() <= 4  # HSV quantised to 8 bits

    # LAB: the neutral axis is grey, white and black are white and black, and a round trip holds
    neutral = np.dstack([np.linspace(0, 255, 7, dtype=np.uint8)[None].repeat(5, 0), np.zeros((5, 7, 2), np.uint8)])
    out = _rgb(_encode(PIL.Image.frombytes("LAB", (7, 5), neutral.tobytes()), "TIFF")).astype(int)
    assert np.abs(out - out[..., :1]).max() <= 2 and np.all(np.diff(out[0, :, 0]) > 0)
    assert out[0, 0].max() <= 2 and out[0, -1].min() >= 252
    cms = PIL.ImageCms
    to_lab = cms.buildTransform(cms.createProfile("sRGB"), cms.createProfile("LAB"), "RGB", "LAB")
    lab = PIL.ImageCms.applyTransform(PIL.Image.fromarray(RGB8), to_lab)
    error = np.abs(_rgb(_encode(lab, "TIFF")).astype(int) - RGB8)
    assert lab.mode == "LAB" and error.max() <= 12 and error.mean() < 2  # 8-bit LAB is coarse in dark blues


def test_lab_without_pillow_converter_uses_littlecms(monkeypatch):
    """Pillow < 11 cannot convert LAB -> RGB itself; the LittleCMS fallback gives the same pixels."""
    lab = PIL.Image.frombytes("LAB", (7, 5), RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8).tobytes())
    native = _rgb(lab)
    real = PIL.Image.Image.convert

    def old_convert(self, mode=None, *args, **kwargs):
        if self.mode == "LAB" and mode == "RGB":
            raise ValueError("conversion from LAB to RGB not supported")
        return real(self, mode, *args, **kwargs)

    monkeypatch.setattr(PIL.Image.Image, "convert", old_convert)
    assert np.abs(_rgb(lab).astype(int) - native).max() <= 1


def test_a_failing_pil_conversion_is_an_image_error(monkeypatch):
    def broken(self, mode=None, *args, **kwargs):
        raise OSError("decoder broke")

    monkeypatch.setattr(PIL.Image.Image, "convert", broken)
    with pytest.raises(ImageError, match="<PIL image> has image mode 'CMYK', which could not .*OSError: decoder broke"):
        load_image(PIL.Image.new("CMYK", (2, 2)))


# ---------------------------------------------------------------- high bit depth
V16 = RNG.integers(0, 65536, (5, 7)).astype(np.uint16)
V16[0, 0] = 65535


def test_16bit_grey_png_keeps_its_picture():
    """The bug of issue 21: a 16-bit PNG used to come out all white (convert clips at 255)."""
    img = PIL.Image.fromarray(V16)
    assert img.mode == "I;16"
    data = _encode(img, "PNG")
    assert PIL.Image.open(io.BytesIO(data)).mode == "I;16"
    assert np.array_equal(_rgb(data), _grey((V16 >> 8).astype(np.uint8)))
    circles = np.asarray(PIL.Image.open(ROOT / "examples" / "circles.png").convert("L"))
    wide = PIL.Image.fromarray(circles.astype(np.uint16) * 257)  # the same picture as 16-bit
    out = _rgb(_encode(wide, "PNG"))
    assert np.array_equal(out, _grey(circles)) and out.min() < 255


@pytest.mark.parametrize("mode,dtype", [("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2"), ("I;16N", "=u2")])
def test_16bit_modes(mode, dtype):
    img = PIL.Image.frombytes(mode, (7, 5), V16.astype(dtype).tobytes())
    expected = _grey((V16 >> 8).astype(np.uint8))
    assert np.array_equal(_rgb(img), expected)
    if mode in ("I;16", "I;16B"):
        assert np.array_equal(_rgb(_encode(img, "TIFF")), expected)


def test_16bit_rgb_and_rgba_png():
    rgb16 = RNG.integers(0, 65536, (5, 7, 3))
    assert np.array_equal(_rgb(_png(rgb16, 16, 2)), (rgb16 >> 8).astype(np.uint8))
    rgba16 = RNG.integers(0, 65536, (5, 7, 4))
    assert np.array_equal(_rgb(_png(rgba16, 16, 6)), (rgba16[..., :3] >> 8).astype(np.uint8))
    la16 = RNG.integers(0, 65536, (5, 7, 2))
    assert np.array_equal(_rgb(_png(la16, 16, 4)), _grey((la16[..., 0] >> 8).astype(np.uint8)))


def test_mode_i_is_read_as_16bit():
    pgm = b"P5 7 5 65535\n" + V16.astype(">u2").tobytes()  # 16-bit PGM opens as mode I
    assert PIL.Image.open(io.BytesIO(pgm)).mode == "I"
    assert np.array_equal(_rgb(pgm), _grey((V16 >> 8).astype(np.uint8)))
    i32 = PIL.Image.fromarray(V16.astype(np.int32))
    assert i32.mode == "I" and np.array_equal(_rgb(_encode(i32, "TIFF")), _grey((V16 >> 8).astype(np.uint8)))
    assert np.array_equal(_rgb(PIL.Image.new("I", (3, 2), 0)), np.zeros((2, 3, 3), np.uint8))  # black is black
    for values, pattern in (([[-5, 1000]], r"-5\.\.1000"), ([[0, 70000]], r"0\.\.70000"), ([[0, 200]], "8-bit data")):
        with pytest.raises(ImageError, match=rf"mode 'I'.*{pattern}"):
            load_image(PIL.Image.fromarray(np.int32(values)))
    with pytest.raises(ImageError, match="mode 'I;16'.*8-bit data"):  # would be black as 16-bit
        load_image(PIL.Image.fromarray(L8.astype(np.uint16)))


def test_float_images():
    unit = RNG.random((5, 7), dtype=np.float32)
    expected = _grey(np.floor(unit * 255 + 0.5).astype(np.uint8))
    for source in (PIL.Image.fromarray(unit), _encode(PIL.Image.fromarray(unit), "TIFF")):
        assert np.array_equal(_rgb(source), expected)
    assert np.array_equal(_rgb(PIL.Image.fromarray(L8.astype(np.float32))), _grey(L8))  # 0..255 floats
    for bad, pattern in ((np.nan, "NaN"), (np.inf, "infinite"), (-0.5, "-0.5"), (300.0, "300")):
        arr = unit.copy()
        arr[2, 3] = bad
        with pytest.raises(ImageError, match=f"mode 'F'.*{pattern}"):
            load_image(_encode(PIL.Image.fromarray(arr), "TIFF"))


def test_processor_sees_scaled_pixels():
    """The tensor that reaches the model, for an image in a high-bit-depth mode."""
    proc = ImageProcessor()
    expected_rgb = PIL.Image.fromarray(_grey((V16 >> 8).astype(np.uint8)))
    want = proc([expected_rgb])[0][0]
    assert torch.equal(proc([load_image(_encode(PIL.Image.fromarray(V16), "PNG"))])[0][0], want)
    assert torch.equal(proc([PIL.Image.fromarray(V16)])[0][0], want)  # a PIL I;16 image given straight to it
    assert torch.equal(proc.preprocess(PIL.Image.fromarray(V16)), proc.preprocess(expected_rgb))


# ---------------------------------------------------------------- orientation, frames
ORIENTED = {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud,
            5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
            7: lambda a: np.rot90(a, 2).transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("orientation", sorted(ORIENTED))
def test_exif_orientation_is_applied(orientation):
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    img = PIL.Image.fromarray(RGB8)
    data = _encode(img, "PNG", exif=exif.tobytes())
    out = _rgb(data)
    assert np.array_equal(out, ORIENTED[orientation](RGB8))
    assert np.array_equal(out, np.asarray(PIL.ImageOps.exif_transpose(PIL.Image.open(io.BytesIO(data)))))
    assert np.array_equal(np.asarray(load_image(data, exif=False)), RGB8)  # upstream's stored order
    # a JPEG photo: flat 8x8 blocks so compression noise stays small
    blocks = np.kron(RGB8, np.ones((8, 8, 1), np.uint8))
    jpeg = _rgb(_encode(PIL.Image.fromarray(blocks), "JPEG", quality=100, subsampling=0, exif=exif.tobytes()))
    assert np.abs(jpeg.astype(int) - ORIENTED[orientation](blocks)).mean() < 3


def test_pil_image_passed_in_is_not_reoriented():
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    opened = PIL.Image.open(io.BytesIO(_encode(PIL.Image.fromarray(RGB8), "PNG", exif=exif.tobytes())))
    assert np.array_equal(_rgb(opened), RGB8)  # already decoded by the caller: pixels as given


def test_broken_exif_is_ignored():
    img = PIL.Image.fromarray(RGB8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL: "Corrupt EXIF data"
        assert np.array_equal(_rgb(_encode(img, "PNG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")), RGB8)


@pytest.mark.parametrize("fmt,kwargs", [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {}), ("TIFF", {})],
                         ids=["gif", "webp", "apng", "tiff"])
def test_animated_first_frame(fmt, kwargs):
    frames = [PIL.Image.new("RGB", (6, 4), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], **kwargs)
    assert PIL.Image.open(io.BytesIO(data)).n_frames == 3
    assert np.array_equal(_rgb(data), np.full((4, 6, 3), (255, 0, 0), np.uint8))


# ---------------------------------------------------------------- sources, sizes, bombs
def test_paths_that_are_not_image_files(tmp_path):
    with pytest.raises(ImageNotFound, match=f"^{tmp_path} is a directory, not an image file$"):
        load_image(tmp_path)
    with pytest.raises(ImageNotFound, match=f"^image file not found: {tmp_path}/nope.png$"):
        load_image(str(tmp_path / "nope.png"))
    assert issubclass(ImageNotFound, ImageError) and issubclass(ImageNotFound, FileNotFoundError)
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "pipe.png"
        os.mkfifo(fifo)
        with pytest.raises(ImageNotFound, match="pipe.png is not a regular file"):  # and no blocking read
            load_image(fifo)
    eps = tmp_path / "x.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    with pytest.raises(ImageError, match="x.eps is not a readable image"):  # EPS would run Ghostscript
        load_image(eps)


@pytest.mark.parametrize("source", [123, 1.5, None, ["a.png"], {"url": "x"}, np.zeros((2, 2, 3), np.uint8)])
def test_unsupported_source_types(source):
    with pytest.raises(InputTypeError, match=f"unsupported image source type {type(source).__name__}"):
        load_image(source)


def test_memoryview_and_bytearray_sources():
    data = _encode(PIL.Image.fromarray(RGB8), "PNG")
    assert np.array_equal(_rgb(bytearray(data)), RGB8) and np.array_equal(_rgb(memoryview(data)), RGB8)


def test_zero_size_images_are_refused():
    for size in ((0, 5), (5, 0), (0, 0)):
        with pytest.raises(ImageError, match="zero size"):
            load_image(PIL.Image.new("RGB", size))
        with pytest.raises(ImageError, match="zero size"):
            ImageProcessor()([PIL.Image.new("L", size)])
    with pytest.raises(ImageError, match="<image bytes>"):
        load_image(_png(np.zeros((3, 0), np.uint8), 8, 0))


def test_decompression_bombs(monkeypatch):
    huge = _png(np.zeros((1, 1), np.uint8), 8, 0, size=(100_000, 100_000))
    with pytest.raises(ImageError, match="too large|decompression bomb"):  # refused from the header alone
        load_image(huge)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    assert max_pixels() == 2000
    with pytest.warns(PIL.Image.DecompressionBombWarning):  # PIL's warning band: loaded
        assert load_image(_encode(PIL.Image.new("L", (40, 40)), "PNG")).size == (40, 40)
    with pytest.raises(ImageError, match="<image bytes>.*(too large|decompression bomb)"):
        load_image(_encode(PIL.Image.new("L", (50, 50)), "PNG"))
    with pytest.raises(ImageError, match="decompression bomb"):  # our own check, for PIL's late-sized formats
        image_io._check_size(PIL.Image.new("L", (50, 50)), "x")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", None)
    assert max_pixels() is None and load_image(_encode(PIL.Image.new("L", (50, 50)), "PNG")).size == (50, 50)


# ---------------------------------------------------------------- tiny and elongated through the processor
PROCESSORS = {"pad": ImageProcessor(), "square": ImageProcessor(aspect="square"),
              "anyres": ImageProcessor(aspect="anyres", pinpoints=list(V16_PINPOINTS)),
              "siglip": ImageProcessor(crop_size=384, resize_mode="square", aspect="square"),
              "edge256": ImageProcessor(crop_size=224, shortest_edge=256, aspect="square"),
              "edge200": ImageProcessor(crop_size=224, shortest_edge=200, aspect="square")}


@pytest.mark.parametrize("name", sorted(PROCESSORS))
@pytest.mark.parametrize("size", [(1, 1), (1, 7), (7, 1), (2, 3), (1, 5000), (5000, 1), (3, 60000)])
def test_tiny_and_elongated_images(name, size):
    proc = PROCESSORS[name]
    tensors, sizes = proc([PIL.Image.new("RGB", size, (200, 30, 90))])
    assert sizes == [size] and tensors[0].shape[1:] == (3, proc.crop_size, proc.crop_size)
    assert torch.isfinite(tensors[0]).all()
    if size == (1, 1) and name != "edge200":  # a single pixel fills the whole crop
        colour = proc.preprocess(PIL.Image.new("RGB", (proc.crop_size,) * 2, (200, 30, 90)))
        assert torch.equal(tensors[0][0], colour)


def test_elongated_shortest_edge_crop_first_is_close(monkeypatch):
    """A 1x5000 image once resized to 336x1,680,000 (32 s, 5.6 GB) before the centre crop; now
    only the crop is computed. Forced here on smaller images to compare with the full resize."""
    img = PIL.Image.fromarray(RNG.integers(0, 256, (400, 3, 3), dtype=np.uint8))
    for proc in (ImageProcessor(aspect="square"), PROCESSORS["edge200"], PROCESSORS["edge256"]):
        for pic in (img, img.transpose(PIL.Image.Transpose.TRANSPOSE)):
            full = proc.preprocess(pic)
            monkeypatch.setattr(image_mod, "_MAX_RESIZE_PIXELS", 0)
            fast = proc.preprocess(pic)
            monkeypatch.undo()
            levels = (fast - full).abs() * torch.tensor(proc.std)[:, None, None] * 255
            assert levels.max() <= 2.01


def test_bounded_resize_is_close(monkeypatch):
    ramp = np.linspace(0, 255, 4000)[:, None, None] * np.ones((1, 3, 3))
    img = PIL.Image.fromarray(ramp.astype(np.uint8))
    exact = np.asarray(img.resize((336, 336), PIL.Image.BICUBIC)).astype(int)
    monkeypatch.setattr(image_mod, "_MAX_TEMP_PIXELS", 10_000)
    bounded = np.asarray(image_mod.bounded_resize(img, (336, 336), PIL.Image.BICUBIC)).astype(int)
    assert np.abs(bounded - exact).max() <= 2


def test_pad_guard_only_touches_elongated_images(monkeypatch):
    ramp = np.linspace(0, 255, 4000)[None, :, None] * np.ones((42, 1, 3))
    strip = PIL.Image.fromarray(ramp.astype(np.uint8))  # 4000x42: its canvas is 95x the image
    four_to_one = PIL.Image.fromarray(RNG.integers(0, 256, (100, 400, 3), dtype=np.uint8))
    proc = ImageProcessor()
    exact = [proc([img])[0][0] for img in (strip, four_to_one)]
    monkeypatch.setattr(image_mod, "_MAX_PAD_PIXELS", 1000 * 1000)
    guarded = [proc([img])[0][0] for img in (strip, four_to_one)]
    assert torch.equal(guarded[1], exact[1])  # up to 4:1 nothing changes, however large
    levels = (guarded[0] - exact[0]).abs() * torch.tensor(proc.std)[:, None, None] * 255
    assert levels.mean() < 0.2 and (levels > 8).float().mean() < 0.005  # only the band's edge rows move


def test_errors_are_llava_errors():
    for exc in (ImageError, ImageNotFound, InputTypeError):
        assert issubclass(exc, LlavaError)
    assert to_rgb(img := PIL.Image.new("RGB", (2, 2))) is img
