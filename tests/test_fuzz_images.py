"""Fuzz load_image and ImageProcessor: whatever the bytes or string, the result is an RGB image the
processors accept, or a LlavaError; never another exception, never a hang.

CI runs the conftest "ci" profile (40 derandomized examples per test, 8 tests: ~5 s); the long run
draws new examples every time:  LLAVA_FUZZ=long python -m pytest -q tests/test_fuzz_images.py
During this module PIL.Image.MAX_IMAGE_PIXELS is lowered so a corrupted header cannot make each
example decode a 178-megapixel image (the bomb refusal itself is exercised that way too).
"""

from __future__ import annotations

import base64
import faulthandler
import io
import string
import urllib.request

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llava.errors import LlavaError
from llava.processing.image import V16_PINPOINTS, ImageProcessor, load_image

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL", "ignore::RuntimeWarning:PIL")  # corrupt EXIF etc.
HANG_S = 60  # a decode stuck in C for this long kills the run with a traceback instead of hanging CI
PROCESSORS = (ImageProcessor(), ImageProcessor(aspect="anyres", pinpoints=list(V16_PINPOINTS)))


def _encode(img: PIL.Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _seeds() -> dict[str, bytes]:
    """Small valid files in the formats users send, with the features decoders branch on."""
    rng = np.random.default_rng(0)
    rgb = PIL.Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    frames = [rgb, rgb.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT), rgb.transpose(PIL.Image.Transpose.ROTATE_180)]
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    return {
        "png": _encode(rgb, "PNG"),
        "png_rgba": _encode(rgb.convert("RGBA"), "PNG"),
        "png_palette": _encode(rgb.convert("P"), "PNG", transparency=3),
        "png_16bit": _encode(PIL.Image.fromarray(rng.integers(0, 65536, (12, 16)).astype(np.uint16)), "PNG"),
        "apng": _encode(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        "jpeg_exif": _encode(rgb, "JPEG", exif=exif.tobytes()),
        "jpeg_progressive": _encode(rgb, "JPEG", progressive=True),
        "jpeg_cmyk": _encode(rgb.convert("CMYK"), "JPEG"),
        "gif": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "webp": _encode(rgb, "WEBP"),
        "webp_animated": _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True),
        "bmp": _encode(rgb, "BMP"),
        "tiff_deflate": _encode(rgb, "TIFF", compression="tiff_deflate"),
        "tiff_float": _encode(PIL.Image.fromarray(rng.random((12, 16), dtype=np.float32)), "TIFF"),
        "pgm_16bit": b"P5 16 12 65535\n" + rng.integers(0, 65536, (12, 16)).astype(">u2").tobytes(),
    }


SEEDS = _seeds()
NAMES = sorted(SEEDS)


@pytest.fixture(scope="module", autouse=True)
def _sandbox():
    """Small pixel limit; URLs never leave the machine (and only http(s) strings may try)."""
    limit, urlopen = PIL.Image.MAX_IMAGE_PIXELS, urllib.request.urlopen

    def no_network(request, *args, **kwargs):
        url = request.full_url if isinstance(request, urllib.request.Request) else request
        assert url.startswith(("http://", "https://")), f"fetched a non-http(s) source: {url!r}"
        raise OSError("network disabled in the fuzz tests")

    PIL.Image.MAX_IMAGE_PIXELS = 250_000  # refused above half a megapixel: each example stays ~0.1 s
    urllib.request.urlopen = no_network
    yield
    PIL.Image.MAX_IMAGE_PIXELS, urllib.request.urlopen = limit, urlopen


def _check(source) -> None:
    """The property: an RGB image every processor turns into finite tensors, or a LlavaError."""
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    try:
        try:
            img = load_image(source)
        except LlavaError:
            return
        assert img.mode == "RGB" and min(img.size) > 0
        for proc in PROCESSORS:
            tensors, sizes = proc([img])
            assert sizes == [img.size] and torch.isfinite(tensors[0]).all()
    finally:
        faulthandler.cancel_dump_traceback_later()


@given(name=st.sampled_from(NAMES), keep=st.floats(0, 1))
def test_truncated_files(name, keep):
    data = SEEDS[name]
    _check(data[: int(len(data) * keep)])


# byte edits: (position as a fraction of the file, or an offset into the header; new byte)
_EDITS = st.lists(st.tuples(st.one_of(st.floats(0, 1, exclude_max=True), st.integers(0, 63)),
                            st.one_of(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]), st.integers(0, 255))),
                  min_size=1, max_size=8)


def _corrupt(data: bytes, edits: list[tuple[float | int, int]]) -> bytes:
    out = bytearray(data)
    for where, value in edits:
        out[int(where * len(out)) if isinstance(where, float) else where % len(out)] = value
    return bytes(out)


@given(name=st.sampled_from(NAMES), edits=_EDITS, keep=st.one_of(st.just(1.0), st.floats(0.5, 1)))
def test_corrupted_files(name, edits, keep):
    data = _corrupt(SEEDS[name], edits)
    _check(data[: int(len(data) * keep)])


@given(data=st.binary(max_size=4096))
def test_random_bytes(data):
    _check(data)


@given(name=st.sampled_from(NAMES), tail=st.binary(max_size=2048), head=st.integers(2, 64))
def test_valid_header_then_random_bytes(name, tail, head):
    _check(SEEDS[name][:head] + tail)


@given(name=st.sampled_from(NAMES), edits=_EDITS, as_url=st.booleans(), urlsafe=st.booleans())
def test_corrupted_base64_and_data_urls(name, edits, as_url, urlsafe):
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    text = encode(_corrupt(SEEDS[name], edits)).decode()
    _check(("data:image/png;base64," if as_url else "") + text)


@given(source=st.text(max_size=300))
def test_random_strings(source):
    _check(source)


@given(prefix=st.sampled_from(["http://", "https://", "data:", "data:image/png;base64,", "file://", "/", "./", "~/"]),
       rest=st.text(alphabet=string.printable, max_size=200))
def test_url_and_path_like_strings(prefix, rest):
    _check(prefix + rest)  # the sandbox fails the test if anything but http(s) is fetched


_MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
          "I", "I;16", "I;16B", "I;16L", "I;16N", "F"]


@given(mode=st.sampled_from(_MODES), width=st.integers(0, 40), height=st.integers(0, 40),
       seed=st.integers(0, 2**32 - 1), special=st.sampled_from([None, "zeros", "nan", "max"]))
def test_pil_images_in_every_mode(mode, width, height, seed, special):
    """Random pixel bytes in each mode: scaled to RGB or refused (ImageError naming the mode)."""
    probe = PIL.Image.new(mode, (1, 1))
    nbytes = len(probe.tobytes()) * width * height
    raw = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    if special == "zeros":
        raw[:] = 0
    elif special == "max":
        raw[:] = 0xFF
    img = PIL.Image.frombytes(mode, (width, height), raw.tobytes())
    if special == "nan" and mode == "F" and width * height:
        arr = np.asarray(img).copy()
        arr.flat[0] = np.nan
        img = PIL.Image.fromarray(arr)
    if mode == "P":
        img.putpalette(np.random.default_rng(seed + 1).integers(0, 256, 768, dtype=np.uint8).tobytes())
    _check(img)
