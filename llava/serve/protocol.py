"""The wire protocol the controller, the model workers and the web UI share (the original's).

Streams are JSON objects each followed by one NUL byte (`b"\\0"`): the worker's chunks carry the
prompt plus all text generated so far, cumulative, and an `error_code` (0 ok, 1 worker-side
error, 2 no worker for the model, 3 worker unreachable). Images travel as base64-encoded
image files. Heart-beat timings keep the original's values (a worker beats every 15 s, the
controller drops a worker silent for 30 s) and can be shortened for tests with
`LLAVA_WORKER_HEART_BEAT_INTERVAL` / `LLAVA_HEART_BEAT_EXPIRATION` (seconds) or the flags.

Nothing here imports torch or the web framework, so the controller starts fast.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import socket
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

from llava.errors import ImageError, InputError, InputTypeError, MissingDependency

CONTROLLER_HEART_BEAT_EXPIRATION = 30.0
WORKER_HEART_BEAT_INTERVAL = 15.0
HEART_BEAT_EXPIRATION_ENV = "LLAVA_HEART_BEAT_EXPIRATION"
HEART_BEAT_INTERVAL_ENV = "LLAVA_WORKER_HEART_BEAT_INTERVAL"

SERVER_ERROR_MSG = "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**"
EXCEEDS_MSG = "Exceeds max token length. Please start a new conversation, thanks."
OK, WORKER_ERROR, NO_WORKER, WORKER_UNREACHABLE = 0, 1, 2, 3

DELIMITER = b"\0"
MAX_IMAGE_BYTES = 20 << 20  # one decoded image file; the web UI sends PNGs of at most 1344 px a side


def chunk(text: str, error_code: int = OK) -> bytes:
    """One stream chunk: `{"text", "error_code"}` as JSON, NUL-terminated."""
    return json.dumps({"text": text, "error_code": error_code}).encode() + DELIMITER


async def split_chunks(data: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """NUL-delimited chunks (without the NUL) from a byte stream cut anywhere; empty chunks skipped."""
    buffer = b""
    async for piece in data:
        buffer += piece
        *complete, buffer = buffer.split(DELIMITER)
        for item in complete:
            if item:
                yield item
    if buffer:
        yield buffer


def decode_chunks(body: bytes) -> list[dict]:
    """A whole NUL-delimited response body -> its JSON chunks (for clients and tests)."""
    return [json.loads(item) for item in body.split(DELIMITER) if item]


_DATA_URL = re.compile(r"^data:[^,]*;base64,", re.IGNORECASE)


def decode_base64(text: str, name: str, max_bytes: int) -> bytes:
    """Strict standard base64 (whitespace ignored, padding optional) of at most `max_bytes`,
    refused by its length before decoding; errors name `name`. Shared by the worker and the API."""
    text = re.sub(r"\s+", "", text)
    if len(text) * 3 // 4 > max_bytes + 3:
        raise ImageError(f"{name} is over this server's limit of {max_bytes / (1 << 20):.1f} MiB per image")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageError(f"{name} is not valid base64 ({err})") from err


def decode_image(data: object, index: int):
    """`images[index]` of a request (base64 of an image file, or a base64 data: URL) -> an RGB PIL image.

    Decoded here, never handed to `load_image` as a string, which would also read local paths
    and fetch URLs on the server's behalf.
    """
    from llava.processing.image_io import load_image  # PIL and numpy: worker only

    where = f"images[{index}]"
    if not isinstance(data, str):
        raise InputTypeError(f"{where} must be a base64 string, not {type(data).__name__}")
    raw = decode_base64(_DATA_URL.sub("", data, count=1), where, MAX_IMAGE_BYTES)
    try:
        return load_image(raw)
    except ImageError as err:
        message = str(err)
        raise ImageError(message.replace("<image bytes>", where) if "<image bytes>" in message
                         else f"{where}: {message}") from err


def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment, or `default` when unset."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        raise InputError(f"{name}={value!r} must be a positive number of seconds")
    return seconds


def positive_seconds(name: str, value: float | None, env: str, default: float) -> float:
    """A flag's value if given (checked), else the environment's, else the original's default."""
    if value is None:
        return env_seconds(env, default)
    if not value > 0 or value == float("inf"):
        raise InputError(f"{name} must be a positive number of seconds, got {value}")
    return value


def bind(host: str, port: int) -> socket.socket:
    """Listen on host:port before anything slow happens, so a taken port fails at once as one line."""
    if not 0 <= port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise InputError(f"--host {host!r} cannot be resolved ({err.strerror})") from err
    family = infos[0][0]
    try:
        return socket.create_server((host, port), family=family)
    except OSError as err:
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from err


def require_serving() -> None:
    """FastAPI, uvicorn and httpx come with the `serve` extra; say so instead of an ImportError."""
    missing = []
    for name in ("fastapi", "uvicorn", "httpx"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependency(f"serving needs {', '.join(missing)}: pip install 'llava[serve]'")


def json_object(body: bytes, what: str) -> dict[str, Any]:
    """A request body that must be one JSON object."""
    try:
        value = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"the {what} body is not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise InputTypeError(f"the {what} body must be a JSON object, not {type(value).__name__}")
    return value
