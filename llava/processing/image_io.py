"""Image loading: any source a user can give -> the 8-bit RGB PIL image the model sees.

Split from image.py (preprocessing), which re-exports everything here. Bad input of any kind
ends in a `LlavaError` whose message names the source; see `load_image` and `to_rgb` for the
rules. tests/test_image_modes.py checks each mode's pixels; tests/test_fuzz_images.py feeds
truncated, corrupted and random bytes and strings.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import os
import re
import urllib.request

import numpy as np
import PIL.Image

from llava.errors import ImageError, ImageNotFound, InputTypeError

_BASE64_RE = re.compile(r"^[A-Za-z0-9+/=\s_-]+$")
_URL_TIMEOUT_S = 30
_MAX_DOWNLOAD_BYTES = 256 << 20
# EPS is decoded by running Ghostscript: never on untrusted input.
_REFUSED_FORMATS = frozenset({"EPS"})
# Modes PIL's own convert("RGB") maps correctly (palette lookup, CMYK/YCbCr/HSV colour maths,
# un-premultiplying RGBa) or where it drops alpha as upstream LLaVA does. LAB is handled apart.
_PIL_CONVERTS = frozenset({"1", "L", "P", "RGBX", "CMYK", "YCbCr", "HSV", "RGBa", "RGBA", "LA", "PA"})
_EXIF_TRANSPOSE = {2: PIL.Image.Transpose.FLIP_LEFT_RIGHT, 3: PIL.Image.Transpose.ROTATE_180,
                   4: PIL.Image.Transpose.FLIP_TOP_BOTTOM, 5: PIL.Image.Transpose.TRANSPOSE,
                   6: PIL.Image.Transpose.ROTATE_270, 7: PIL.Image.Transpose.TRANSVERSE,
                   8: PIL.Image.Transpose.ROTATE_90}  # as PIL.ImageOps.exif_transpose


def max_pixels() -> int | None:
    """The largest image we decode: PIL's own hard limit, 2 x PIL.Image.MAX_IMAGE_PIXELS
    (178,956,970 by default; ~537 MB as RGB). None when the user has disabled PIL's check."""
    limit = PIL.Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _check_size(img: PIL.Image.Image, name: str) -> None:
    """Refuse empty images and decompression bombs before anything allocates their pixels."""
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"{name} has zero size ({width}x{height}); an image needs at least one pixel")
    limit = max_pixels()
    if limit is not None and width * height > limit:
        raise ImageError(f"{name} is {width}x{height} = {width * height:,} pixels, over the limit of "
                         f"{limit:,} (2 x PIL.Image.MAX_IMAGE_PIXELS); refusing a possible decompression bomb")


def _high_byte(arr: np.ndarray, name: str, mode: str) -> PIL.Image.Image:
    """16-bit grey (0..65535) -> 8-bit by keeping the high byte, as PIL does for 16-bit RGB PNGs."""
    top = int(arr.max())
    if top > 65535 or int(arr.min()) < 0:
        raise ImageError(f"{name}: mode {mode!r} image has values {int(arr.min())}..{top}, outside the "
                         f"16-bit range 0..65535 that mode {mode!r} is read as; scale it to 8 bits yourself")
    if 0 < top <= 255:
        raise ImageError(f"{name}: mode {mode!r} image has values only in 0..{top}: as 16-bit data that is "
                         f"black, so it is probably 8-bit data in a 16/32-bit image; convert it to mode 'L'")
    return PIL.Image.fromarray((arr >> 8).astype(np.uint8)).convert("RGB")


def _float_to_rgb(arr: np.ndarray, name: str) -> PIL.Image.Image:
    """F: 0..1 is scaled by 255, 0..255 taken as is (rounded); anything else is ambiguous."""
    if not np.isfinite(arr).all():
        raise ImageError(f"{name}: mode 'F' image contains NaN or infinite values")
    low, high = float(arr.min()), float(arr.max())
    if low < 0 or high > 255:
        raise ImageError(f"{name}: mode 'F' image has values {low:g}..{high:g}; only 0..1 or 0..255 "
                         f"can be read unambiguously: scale it to 8 bits yourself")
    scaled = arr * np.float32(255) if high <= 1 else arr
    return PIL.Image.fromarray(np.floor(scaled + np.float32(0.5)).astype(np.uint8)).convert("RGB")


def to_rgb(img: PIL.Image.Image, name: str = "<PIL image>") -> PIL.Image.Image:
    """Convert any PIL mode to 8-bit RGB without losing the picture, or raise ImageError.

    - RGB: unchanged. 1, L, P, RGBX, CMYK, YCbCr, LAB, HSV, RGBa: PIL's convert (palette lookup,
      grey replicated, naive CMYK ignoring ICC profiles, colour maths, un-premultiply).
    - Alpha (RGBA, LA, PA, La, P with `transparency`): dropped, keeping the stored colour,
      exactly as upstream LLaVA's plain `.convert("RGB")` (so training and inference agree).
    - I;16, I;16B, I;16L, I;16N: 16-bit, scaled by keeping the high byte (v >> 8).
    - I: read as 16-bit 0..65535 (how PIL opens 16-bit PGM/PNG); values outside are refused.
      For I and I;16 an image with values only in 1..255 is refused: as 16-bit it is black.
    - F: finite values in 0..1 are scaled by 255, in 0..255 rounded; anything else is refused.
    - Zero-size images and any other mode are refused. (16-bit RGB(A) PNG/TIFF files already
      arrive as 8-bit RGB(A) from PIL, high byte kept.)
    """
    if not isinstance(img, PIL.Image.Image):
        raise InputTypeError(f"{name} must be a PIL image, not {type(img).__name__}")
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"{name} has zero size ({width}x{height}); an image needs at least one pixel")
    if img.mode == "RGB":
        return img
    try:
        return _converted(img, name)
    except ImageError:
        raise
    except Exception as e:  # e.g. a palette too short for its indices, an old Pillow without a converter
        raise ImageError(f"{name} has image mode {img.mode!r}, which could not be converted to RGB "
                         f"({type(e).__name__}: {_short(str(e))})") from e


def _converted(img: PIL.Image.Image, name: str) -> PIL.Image.Image:
    mode = img.mode
    if mode == "P" and "transparency" in img.info:
        return img.convert("RGBA").convert("RGB")  # same pixels; avoids PIL's bytes-transparency warning
    if mode == "LAB":
        try:
            return img.convert("RGB")
        except ValueError:  # Pillow < 11 has no LAB -> RGB converter; LittleCMS does the same maths
            from PIL import ImageCms

            lab_to_srgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                                  "LAB", "RGB")
            return ImageCms.applyTransform(img, lab_to_srgb)
    if mode in _PIL_CONVERTS:
        return img.convert("RGB")
    if mode == "La":
        grey, alpha = img.split()
        return PIL.Image.merge("RGBa", (grey, grey, grey, alpha)).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        return _high_byte(arr if mode == "I" else arr.astype(np.uint16, copy=False), name, mode)
    if mode == "F":
        return _float_to_rgb(np.asarray(img, dtype=np.float32), name)
    raise ImageError(f"{name} has image mode {mode!r}, which cannot be converted to RGB")


def _exif_oriented(img: PIL.Image.Image) -> PIL.Image.Image:
    """Apply the EXIF orientation, as a photo viewer shows it. Broken EXIF is ignored: the
    pixels themselves are fine."""
    try:
        orientation = img.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - PIL's EXIF parser raises almost anything on malformed tags
        return img
    method = _EXIF_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    return img if method is None else img.transpose(method)


def _open(data: bytes | str, name: str, exif: bool = True) -> PIL.Image.Image:
    """Decode fully (so truncation surfaces here, not later), first frame only, EXIF-oriented, RGB."""
    PIL.Image.init()
    formats = [f for f in PIL.Image.ID if f not in _REFUSED_FORMATS]
    try:
        with PIL.Image.open(io.BytesIO(data) if isinstance(data, bytes) else data, formats=formats) as img:
            _check_size(img, name)
            img.load()
            _check_size(img, name)  # a few formats (ICO, ICNS) settle their size on load
            return to_rgb(_exif_oriented(img) if exif else img, name)
    except ImageError:
        raise
    except PIL.UnidentifiedImageError as e:
        raise ImageError(f"{name} is not a readable image (not a format PIL can identify)") from e
    except PIL.Image.DecompressionBombError as e:
        raise ImageError(f"{name} is too large to decode: {e}") from e
    except Exception as e:
        # PIL's decoders raise more than OSError/ValueError on malformed data (the fuzzer found a
        # TypeError in TIFF tags; older Pillows raised struct.error, IndexError, ...): all of them
        # mean "not a readable image", as does MemoryError from a header's absurd dimensions.
        raise ImageError(f"{name} is not a readable image ({type(e).__name__}: {_short(str(e))})") from e


def load_image(source: str | os.PathLike | bytes | PIL.Image.Image, *, exif: bool = True) -> PIL.Image.Image:
    """Load an RGB image from a path, http(s) URL, data: URL, base64 string, bytes or PIL image.

    Decoded images keep only their first frame and get their EXIF orientation applied, as a photo
    viewer (and transformers' load_image) shows them; `exif=False` keeps the stored pixel order, as
    upstream LLaVA's training loader did. A PIL image passed in is taken as already decoded (only
    its mode is converted, see `to_rgb`).
    URLs are fetched only when the source is literally an http(s) URL. A string that is not an
    existing file is tried as base64 only if it looks like base64; otherwise it is a missing file.
    Raises ImageNotFound (missing path, directory, device), ImageError (anything unreadable) or
    InputTypeError (a source of another type).
    """
    if isinstance(source, PIL.Image.Image):
        return to_rgb(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _open(bytes(source), "<image bytes>", exif)
    if isinstance(source, os.PathLike):
        source = os.fsdecode(source)
    if not isinstance(source, str):
        raise InputTypeError(f"unsupported image source type {type(source).__name__}: expected a path, "
                             f"URL, base64 string, bytes or a PIL image")

    if source.startswith(("http://", "https://")):
        return _open(_download(source), _short(source), exif)
    if source.startswith("data:"):
        name = _short(source, 40)
        header, _, payload = source.partition(",")
        if ";base64" not in header:
            raise ImageError(f"data URL {name} is not base64-encoded")
        return _open(_b64decode(payload, name), name, exif)
    if os.path.isfile(source):
        return _open(source, source, exif)
    if os.path.isdir(source):
        raise ImageNotFound(f"{source} is a directory, not an image file")
    if os.path.exists(source):  # a FIFO or device: reading it could block forever
        raise ImageNotFound(f"{source} is not a regular file")
    if len(source) >= 64 and _BASE64_RE.match(source):
        try:
            return _open(_b64decode(source, "base64 string"), "base64 string", exif)
        except ImageError as e:  # could equally be a missing path: say both
            raise ImageNotFound(f"image file not found: {_short(source)} (nor is it a base64 image: {e})") from e
    raise ImageNotFound(f"image file not found: {_short(source)}")


def _download(url: str) -> bytes:
    """GET an http(s) URL; every failure (bad URL, network, HTTP status, oversize) is an ImageError."""
    try:  # Request() itself rejects some URLs (ValueError: "Invalid IPv6 URL" for "http://[")
        request = urllib.request.Request(url, headers={"User-Agent": "llava"})
        with urllib.request.urlopen(request, timeout=_URL_TIMEOUT_S) as response:
            data = response.read(_MAX_DOWNLOAD_BYTES + 1)
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise ImageError(f"could not download image {_short(url)}: {e}") from e
    if len(data) > _MAX_DOWNLOAD_BYTES:
        raise ImageError(f"image {_short(url)} is over {_MAX_DOWNLOAD_BYTES >> 20} MiB; refusing to download it")
    return data


def _b64decode(text: str, name: str) -> bytes:
    text = re.sub(r"\s+", "", text)
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"{name} is not valid base64 ({e})") from e


def image_to_base64(img: PIL.Image.Image, fmt: str = "PNG") -> str:
    """Encode an image as a base64 string (the serving protocol's image format)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")
