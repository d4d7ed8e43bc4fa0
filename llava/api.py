"""The Python API: `llava.load(...)` gives a pipeline that answers prompts about images.

    pipe = llava.load("llava-hf/llava-1.5-7b-hf")          # or a local folder, or None for the bundled model
    pipe.generate("What is shown?", images="cat.png")       # one answer
    pipe.generate(["Q1", "Q2"], images=["a.png", None])     # a batch, one prompt per entry
    pipe.chat([{"role": "user", "content": "Describe it.", "images": ["a.png"]}])

The pipeline is the only place that strings the parts together: image loading ->
preprocessing -> tower + projector (once per request) -> template -> token ids with
placeholders -> the generation engine.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

import PIL.Image
import torch

from llava.checkpoint import LoadedCheckpoint, load_checkpoint
from llava.generate.engine import Completion, Engine, Request, SamplingParams
from llava.processing.image import load_image
from llava.processing.templates import Template, get_template, template_for_model
from llava.processing.tokenize import IMAGE_TAG, check_image_count, tokenize_prompt

IM_START, IM_END = "<im_start>", "<im_end>"

ImageInput = Union[str, os.PathLike, bytes, PIL.Image.Image]
Images = Union[None, ImageInput, Sequence[ImageInput]]

# The bundled model: used whenever no model path is given.
DEFAULT_MODEL = Path(__file__).parent / "assets" / "tiny-llava"


def default_model_path() -> str:
    env = os.environ.get("LLAVA_MODEL")
    if env:
        return env
    if not DEFAULT_MODEL.exists():
        raise FileNotFoundError(f"no model path given and the bundled model is missing at {DEFAULT_MODEL}; "
                                "pass a checkpoint folder or hub name")
    return str(DEFAULT_MODEL)


def wrap_image_tags(prompt: str) -> str:
    """`<image>` -> `<im_start><image><im_end>` (tags already wrapped are left as they are)."""
    return re.sub(rf"(?<!{re.escape(IM_START)}){re.escape(IMAGE_TAG)}(?!{re.escape(IM_END)})",
                  IM_START + IMAGE_TAG + IM_END, prompt)


def _as_list(images: Images) -> list[ImageInput]:
    if images is None:
        return []
    if isinstance(images, (str, os.PathLike, bytes, PIL.Image.Image)):
        return [images]
    return list(images)


def sampling_params(**kwargs: Any) -> SamplingParams:
    """SamplingParams from keyword arguments, naming any that are unknown."""
    valid = {f.name for f in fields(SamplingParams)}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise TypeError(f"unknown sampling argument(s) {unknown}; valid: {sorted(valid)}")
    return SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})


@dataclass
class Prepared:
    """One request ready for the engine, with the rendered prompt kept for logs and answers files."""

    prompt: str
    request: Request


class LlavaPipeline:
    def __init__(self, checkpoint: LoadedCheckpoint, template: str | None = None) -> None:
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        self.tokenizer = checkpoint.tokenizer
        self.image_processor = checkpoint.image_processor
        self.name = checkpoint.name
        auto = checkpoint.model.config.template
        self.template: Template = get_template(template or auto or template_for_model(self.name))
        self.engine = Engine(self.model, self.tokenizer, context_length=self.model.config.context_length)

    # Building requests -------------------------------------------------------------------------
    def encode_images(self, images: Sequence[ImageInput]) -> list[torch.Tensor]:
        """Load, preprocess, and run the tower + projector once for every image of one request."""
        if not images:
            return []
        pil = [load_image(img) for img in images]
        pixel_values, sizes = self.image_processor(pil)
        device, dtype = self.model.device, self.model.dtype
        with torch.inference_mode():
            return self.model.encode_images([p.to(device, dtype) for p in pixel_values], sizes)

    def prepare(self, prompt: str, images: Images = None, raw: bool = False) -> Prepared:
        """`raw=False`: `prompt` is the user's message, rendered as one turn of the template
        (an `<image>` tag is put in front when the message has none, as the original does).
        `raw=True`: `prompt` is already rendered and must carry one tag per image."""
        image_list = _as_list(images)
        if not raw:
            if image_list and IMAGE_TAG not in prompt:
                prompt = (IMAGE_TAG + "\n") * len(image_list) + prompt
            prompt = self.template.render([prompt, None])
        check_image_count(prompt, len(image_list))
        return self._request(prompt, image_list)

    def prepare_chat(self, messages: Sequence[Mapping[str, Any]]) -> Prepared:
        """OpenAI-style messages: [{"role": "system"|"user"|"assistant", "content": str, "images": [...]}]."""
        turns: list[str | None] = []
        images: list[ImageInput] = []
        system = None
        for i, msg in enumerate(messages):
            role, content = msg.get("role"), msg.get("content") or ""
            if role == "system":
                system = content
                continue
            expected = "user" if len(turns) % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(f"message {i}: expected role {expected!r}, got {role!r} (user and assistant must alternate)")
            msg_images = _as_list(msg.get("images"))
            if msg_images and content.count(IMAGE_TAG) == 0:
                content = (IMAGE_TAG + "\n") * len(msg_images) + content
            check_image_count(content, len(msg_images))
            images += msg_images
            turns.append(content)
        if not turns or len(turns) % 2 == 0:
            raise ValueError("the last message must be the user's")
        template = self.template if system is None else replace(self.template, system=system)
        return self._request(template.render(turns + [None]), images)

    def _request(self, prompt: str, images: list[ImageInput]) -> Prepared:
        if self.model.config.extra.get("mm_use_im_start_end"):
            # Checkpoints trained with mm_use_im_start_end see every image as <im_start><image><im_end>.
            prompt = wrap_image_tags(prompt)
        features = self.encode_images(images)
        counts = [int(f.shape[0]) for f in features]
        ids = tokenize_prompt(self.tokenizer, prompt, counts, self.model.config.image_token_index,
                              convention=self.checkpoint.convention)
        return Prepared(prompt=prompt, request=Request(input_ids=ids, image_features=features))

    # Answering ----------------------------------------------------------------------------------
    def _params(self, kwargs: dict[str, Any]) -> SamplingParams:
        params = sampling_params(**kwargs)
        if not params.stop and self.template.stop_str:
            params.stop = [self.template.stop_str]
        return params

    def complete(self, prepared: Sequence[Prepared], **sampling: Any) -> list[Completion]:
        return self.engine.generate([p.request for p in prepared], self._params(sampling))

    def generate(self, prompts: str | Sequence[str], images: Images | Sequence[Images] = None, raw: bool = False,
                 **sampling: Any) -> str | list[str]:
        """Answer one prompt (returns str) or a batch (returns list[str]; `images` then has one entry per prompt)."""
        if isinstance(prompts, str):
            return self.complete([self.prepare(prompts, images, raw)], **sampling)[0].text.strip()
        per_prompt = list(images) if images is not None else [None] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} image entries; give one per prompt (None for none)")
        prepared = [self.prepare(p, imgs, raw) for p, imgs in zip(prompts, per_prompt)]
        return [c.text.strip() for c in self.complete(prepared, **sampling)]

    def chat(self, messages: Sequence[Mapping[str, Any]], **sampling: Any) -> str:
        return self.complete([self.prepare_chat(messages)], **sampling)[0].text.strip()

    def stream(self, messages_or_prompt: str | Sequence[Mapping[str, Any]], images: Images = None,
               **sampling: Any) -> Iterator[str]:
        """Text deltas as they are generated."""
        if isinstance(messages_or_prompt, str):
            prepared = self.prepare(messages_or_prompt, images)
        else:
            prepared = self.prepare_chat(messages_or_prompt)
        return self.engine.stream(prepared.request, self._params(sampling))


def load(path: str | os.PathLike | None = None, model_base: str | None = None, device: str | None = None,
         dtype: str | torch.dtype | None = None, vision_tower: str | None = None, template: str | None = None,
         quantize: str | None = None) -> LlavaPipeline:
    """Load a checkpoint (any supported layout, local folder or hub name) into a ready pipeline.

    quantize: None, "int8" (dynamic int8 on CPU), "8bit" or "4bit" (bitsandbytes).
    """
    if isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                 "fp16": torch.float16, "float16": torch.float16}[dtype]
    checkpoint = load_checkpoint(str(path) if path is not None else default_model_path(), model_base=model_base,
                                 vision_tower=vision_tower, device=device, dtype=dtype)
    if quantize:
        from llava.model.quantize import quantize_language_model

        mode = {"int8": "int8-dynamic", "8bit": "bnb-8bit", "4bit": "bnb-4bit"}.get(quantize, quantize)
        quantize_language_model(checkpoint.model, mode)
    return LlavaPipeline(checkpoint, template=template)
