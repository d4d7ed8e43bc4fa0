"""What the web UI keeps per browser tab, how it prepares an image, and what it writes to its logs.

Kept apart from the Gradio code (and free of torch) so the controller-mode web server, which
never loads a model, stays light, and so these rules can be tested without a browser. They
follow the original LLaVA web server (reference facts 4.6 and 7.3): one image per
conversation, the image modes Crop / Resize / Pad / Default, and JSON-lines logs with the
images saved under their md5.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image

from llava.errors import InputError
from llava.processing.templates import Template, image_first

IMAGE_TAG = "<image>"
IMAGE_MODES = ("Crop", "Resize", "Pad", "Default")
PAD_COLOR = (122, 116, 104)  # CLIP's mean pixel, as the original's expand2square fills
MAX_TEXT = 1536  # the original cuts a message to this many characters ...
MAX_TEXT_WITH_IMAGE = 1200  # ... and to this many when an image comes with it
MAX_LONG_SIDE, MAX_SHORT_SIDE = 1344, 672  # images are shrunk to fit these before sending
_MAX_PAD_PIXELS = 1 << 26  # a padded canvas bigger than this is built from a shrunk image


def process_image(image: PIL.Image.Image, mode: str) -> PIL.Image.Image:
    """The original UI's `process_image`: the chosen mode, then a bound on the size sent to the model.

    Pad centres the image on a square of its long side filled with PAD_COLOR; Resize squashes it
    to 336 x 336; Crop and Default leave it (the model's own processor crops or pads later).
    Then an image whose long side exceeds 1344 is shrunk, aspect kept, to a short side of at most
    672 and a long side of at most 1344.
    """
    if mode == "Pad":
        image = _pad_to_square(image)
    elif mode == "Resize":
        image = image.resize((336, 336))
    elif mode not in ("Crop", "Default"):
        raise InputError(f"unknown image mode {mode!r}; expected one of {', '.join(IMAGE_MODES)}")
    width, height = image.size
    if max(width, height) > MAX_LONG_SIDE:
        aspect = max(width, height) / min(width, height)
        short = max(1, int(min(MAX_LONG_SIDE / aspect, MAX_SHORT_SIDE, min(width, height))))
        long = max(1, int(short * aspect))
        image = image.resize((short, long) if height > width else (long, short))
    return image


def _pad_to_square(image: PIL.Image.Image) -> PIL.Image.Image:
    """expand2square; a very elongated image is shrunk first so its canvas cannot take gigabytes
    (up to 4:1, or a canvas under 64 Mpixel, nothing changes)."""
    width, height = image.size
    side = max(width, height)
    if side * side > max(4 * width * height, _MAX_PAD_PIXELS):
        scale = math.isqrt(_MAX_PAD_PIXELS) / side
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), PIL.Image.BOX)
        width, height = image.size
        side = max(width, height)
    canvas = PIL.Image.new(image.mode, (side, side), PAD_COLOR)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def image_hash(image: PIL.Image.Image) -> str:
    """md5 of the pixel bytes: the name the original gives a logged image."""
    return hashlib.md5(image.tobytes()).hexdigest()


@dataclass
class Conversation:
    """One browser tab's chat: alternating [user, assistant] turns and at most one image.

    `image` is the prepared image (after `process_image`), `shown_image` the uploaded file's
    path for the chat display. An assistant turn of None is still being generated.
    """

    turns: list[list[str | None]] = field(default_factory=list)
    image: PIL.Image.Image | None = None
    image_mode: str = "Default"
    shown_image: str | None = None
    errors: set[int] = field(default_factory=set)  # turns answered by an error message: left out of prompts
    template: Template | None = None  # the one the last answer was generated with (for the logs)
    skip_next: bool = False  # the last event added nothing to answer

    def add_user(self, text: str) -> None:
        self.turns.append([text, None])

    def set_answer(self, text: str, error: bool = False) -> None:
        self.turns[-1][1] = text
        (self.errors.add if error else self.errors.discard)(len(self.turns) - 1)

    def prompt(self, template: Template) -> str:
        """The rendered prompt, open for the answer; with an image the first message gets `<image>\\n`
        in front (one image per conversation, as the original)."""
        messages: list[str | None] = []
        for i, (user, answer) in enumerate(self.turns):
            if i in self.errors and i != len(self.turns) - 1:
                continue
            if not messages and self.image is not None:
                user = image_first(f"{IMAGE_TAG}\n{user}")
            messages += [user, answer]
        messages[-1] = None
        return template.render(messages)

    def chat_messages(self, cursor: bool = False) -> list[dict[str, Any]]:
        """Gradio Chatbot messages; `cursor` marks the answer being streamed with "▌"."""
        out: list[dict[str, Any]] = []
        if self.shown_image is not None and self.turns:
            out.append({"role": "user", "content": {"path": self.shown_image}})
        for i, (user, answer) in enumerate(self.turns):
            out.append({"role": "user", "content": user})
            last = i == len(self.turns) - 1
            if answer is not None or (last and cursor):
                out.append({"role": "assistant", "content": (answer or "") + ("▌" if last and cursor else "")})
        return out

    def record(self) -> dict[str, Any]:
        """The conversation as the logs store it (the original's `state.dict()`, without pixels)."""
        messages = []
        for user, answer in self.turns:
            messages += [["user", user], ["assistant", answer]]
        template = self.template
        return {"template": template.name if template else None, "system": template.system if template else None,
                "roles": list(template.roles) if template else None, "messages": messages,
                "image_mode": self.image_mode, "errors": sorted(self.errors)}


class ChatLog:
    """`LOG_DIR/YYYY-MM-DD-conv.json` (one JSON object a line) and `LOG_DIR/serve_images/YYYY-MM-DD/<md5>.jpg`."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        self.dir = Path(log_dir)
        self._lock = threading.Lock()

    def conv_file(self) -> Path:
        return self.dir / f"{datetime.date.today():%Y-%m-%d}-conv.json"

    def save_image(self, image: PIL.Image.Image) -> str:
        """Save the image once under its md5; returns the md5."""
        digest = image_hash(image)
        path = self.dir / "serve_images" / f"{datetime.date.today():%Y-%m-%d}" / f"{digest}.jpg"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            image.convert("RGB").save(tmp, format="JPEG")
            os.replace(tmp, path)
        return digest

    def write(self, record: dict[str, Any]) -> None:
        """Append one record, stamped with the time if it has none."""
        record = {"tstamp": round(time.time(), 4), **record}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            with open(self.conv_file(), "a", encoding="utf-8") as f:
                f.write(line)
