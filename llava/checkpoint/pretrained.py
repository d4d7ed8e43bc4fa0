"""The original LLaVA's `load_pretrained_model`, over `load_checkpoint`.

    tokenizer, model, image_processor, context_len = load_pretrained_model(path, None, name)

Reached through its original path `llava.model.builder`, a front door that imports this module
only when called, so the `llava.model` package never depends on the checkpoint loader.
`model` is our LlavaModel (it has `.config`; `.generate(...)` is not provided: use `llava.load`
for generation); `image_processor` is our ImageProcessor.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from llava.checkpoint.loader import load_checkpoint


def _device(device: str | None) -> str | None:
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        print(f"[llava] device {device!r} is not available here; using the best available device", file=sys.stderr)
        return None
    return device


def load_pretrained_model(model_path: str, model_base: str | None, model_name: str | None = None,
                          load_8bit: bool = False, load_4bit: bool = False, device_map: str = "auto",
                          device: str = "cuda", use_flash_attn: bool = False, **kwargs: Any):
    """Returns (tokenizer, model, image_processor, context_len) like the original.

    The layout is detected from the files, not from `model_name` (so a LoRA folder without
    "lora" in its name still loads); `device_map`/`use_flash_attn` are accepted and ignored.
    """
    quantize = "bnb-8bit" if load_8bit else "bnb-4bit" if load_4bit else None  # applied while loading
    ckpt = load_checkpoint(model_path, model_base=model_base, device=_device(device),
                           vision_tower=kwargs.get("vision_tower"), quantize=quantize)
    return ckpt.tokenizer, ckpt.model, ckpt.image_processor, ckpt.model.config.context_length
