"""Front door: the original LLaVA's `llava.model.builder.load_pretrained_model`, for code written against it.

    tokenizer, model, image_processor, context_len = load_pretrained_model(path, None, name)

The implementation is `llava.checkpoint.pretrained`. It is imported inside the function because
loading a checkpoint sits a layer above the model: the `llava.model` package must not depend on
`llava.checkpoint` (which builds models from it). Nothing inside llava imports this module
(tests/test_import_layers.py keeps it that way).
"""

from __future__ import annotations

from typing import Any


def load_pretrained_model(model_path: str, model_base: str | None, model_name: str | None = None,
                          load_8bit: bool = False, load_4bit: bool = False, device_map: str = "auto",
                          device: str = "cuda", use_flash_attn: bool = False, **kwargs: Any):
    """Returns (tokenizer, model, image_processor, context_len) like the original; see
    `llava.checkpoint.pretrained.load_pretrained_model`."""
    from llava.checkpoint.pretrained import load_pretrained_model as load

    return load(model_path, model_base, model_name, load_8bit=load_8bit, load_4bit=load_4bit,
                device_map=device_map, device=device, use_flash_attn=use_flash_attn, **kwargs)
