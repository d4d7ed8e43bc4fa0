"""Images that arrive over the network: where a server may take them from, and how big they may be.

A server must not become a proxy into its own network or filesystem, so the defaults are
strict: `data:` URLs (base64 PNG/JPEG/WebP/...) only. Remote `http(s)` URLs are fetched only
with `allow_remote` (size limit and timeout, no redirects to other schemes), and `file://`
paths only under `local_dir`, resolved with symlinks followed so neither `..` nor a link can
leave it. Every refusal is an `ImageError` (HTTP 400) that says what to do instead.
"""

from __future__ import annotations

import io
import os
import re
import urllib.parse
from dataclasses import dataclass

import PIL.Image

from llava.errors import ImageError
from llava.processing.image_io import load_image
from llava.serve.protocol import decode_base64

_DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*),", re.IGNORECASE)


@dataclass(frozen=True)
class MediaPolicy:
    """What a server accepts as an image; see the module docstring."""

    max_bytes: int = 20 << 20  # encoded size of one image
    max_pixels: int = 40_000_000  # width x height of one image (header only: checked before decoding)
    allow_remote: bool = False
    local_dir: str | None = None
    timeout_s: float = 10.0

    def load(self, url: object) -> PIL.Image.Image:
        """An RGB image from an image_url's `url`, or an ImageError naming the refusal."""
        if not isinstance(url, str) or not url:
            raise ImageError(f"image_url.url must be a non-empty string, not {type(url).__name__}")
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            data = self._data_url(url)
        elif scheme in ("http", "https"):
            data = self._remote(url)
        elif scheme == "file":
            data = self._local(url)
        else:
            raise ImageError(f"image URL {_short(url)} is not a data:, http(s): or file: URL; "
                             "send the image as a data URL (data:image/png;base64,...)")
        self._check_pixels(data, _short(url))
        return load_image(data)

    def _data_url(self, url: str) -> bytes:
        match = _DATA_URL.match(url)
        if match is None or "base64" not in match.group("params").lower():
            raise ImageError(f"image URL {_short(url)} is not a base64 data URL (data:image/png;base64,...)")
        return self._check_bytes(decode_base64(url[match.end():], "image data URL", self.max_bytes))

    def _remote(self, url: str) -> bytes:
        if not self.allow_remote:
            raise ImageError(f"remote image URLs are not fetched by this server ({_short(url)}); send the image "
                             "as a data URL (data:image/png;base64,...), or start the server with "
                             "--allow-remote-images")
        import httpx

        try:
            with httpx.stream("GET", url, timeout=self.timeout_s, follow_redirects=True,
                              headers={"User-Agent": "llava-server"}) as response:
                response.raise_for_status()
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    raise ImageError(f"image at {_short(url)} is {_mib(int(declared))}, over this server's "
                                     f"limit of {_mib(self.max_bytes)}")
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise ImageError(f"image at {_short(url)} is over this server's limit of "
                                         f"{_mib(self.max_bytes)}")
        except httpx.HTTPError as err:
            raise ImageError(f"could not fetch image {_short(url)}: {err}") from err
        return bytes(data)

    def _local(self, url: str) -> bytes:
        if self.local_dir is None:
            raise ImageError(f"file: image URLs are not allowed by this server ({_short(url)}); start it with "
                             "--allowed-local-media DIR to serve images from DIR")
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ImageError(f"file URL {_short(url)} names a host; only file:///path is accepted")
        root = os.path.realpath(self.local_dir)
        path = os.path.realpath(urllib.parse.unquote(parsed.path))
        if os.path.commonpath([root, path]) != root:
            raise ImageError(f"file URL {_short(url)} is outside the allowed media folder")
        if not os.path.isfile(path):
            raise ImageError(f"file URL {_short(url)}: no such image file in the allowed media folder")
        if os.path.getsize(path) > self.max_bytes:
            raise ImageError(f"image {_short(url)} is over this server's limit of {_mib(self.max_bytes)}")
        with open(path, "rb") as f:
            return f.read(self.max_bytes + 1)

    def _check_bytes(self, data: bytes) -> bytes:
        if len(data) > self.max_bytes:
            raise ImageError(f"image is {_mib(len(data))}, over this server's limit of {_mib(self.max_bytes)}")
        if not data:
            raise ImageError("image data is empty")
        return data

    def _check_pixels(self, data: bytes, name: str) -> None:
        """Refuse images whose header promises more pixels than allowed, before decoding them."""
        try:
            with PIL.Image.open(io.BytesIO(data)) as img:
                width, height = img.size
        except Exception:
            return  # not an image PIL can identify: load_image says so, with its own message
        if width * height > self.max_pixels:
            raise ImageError(f"image {name} is {width}x{height} = {width * height:,} pixels, over this server's "
                             f"limit of {self.max_pixels:,}")


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
