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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

import PIL.Image
import torch

from llava.checkpoint import LoadedCheckpoint, load_checkpoint
from llava.device import resolve_device, resolve_dtype
from llava.errors import InputError, InputTypeError, PromptError
from llava.generate.engine import Completion, Engine, Request, SamplingParams
from llava.model.quantize import ALIASES as QUANTIZE_ALIASES
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


_IMAGE_TYPES = (str, os.PathLike, bytes, bytearray, PIL.Image.Image)
QUANTIZE_MODES = QUANTIZE_ALIASES  # llava.load's names -> llava.model.quantize modes


def _as_list(images: Images, where: str = "images") -> list[ImageInput]:
    """One image or a list of them -> a list, refusing anything that is not an image source."""
    if images is None:
        return []
    if isinstance(images, _IMAGE_TYPES):
        return [images]
    if not isinstance(images, (list, tuple)):
        raise InputTypeError(f"{where} must be a path, URL, bytes, a PIL image or a list of them, "
                             f"not {type(images).__name__}")
    for i, image in enumerate(images):
        if not isinstance(image, _IMAGE_TYPES):
            raise InputTypeError(f"{where}[{i}] must be a path, URL, bytes or a PIL image, not {type(image).__name__}")
    return list(images)


def _check_text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise InputTypeError(f"{where} must be a string, not {type(value).__name__}")
    return value


def sampling_params(**kwargs: Any) -> SamplingParams:
    """SamplingParams from keyword arguments, naming any that are unknown."""
    valid = {f.name for f in fields(SamplingParams)}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise InputTypeError(f"unknown sampling argument(s) {unknown}; valid: {sorted(valid)}")
    return SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})


def _message_parts(content: Any, where: str) -> tuple[str, list[ImageInput]]:
    """OpenAI-style content parts -> (text with one `<image>` tag per image part, the images).

    Parts: {"type": "text", "text": ...}, {"type": "image", "image": SRC} and
    {"type": "image_url", "image_url": {"url": SRC}} (or the URL as a string). Images whose
    text has no tags go first, each on its own line, as with `images=`.
    """
    text, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            text.append(_check_text(part.get("text"), f"{where} content[{j}].text"))
        elif kind in ("image", "image_url"):
            source = part.get(kind)
            if kind == "image_url" and isinstance(source, Mapping):
                source = source.get("url")
            images += _as_list(source, f"{where} content[{j}].{kind}") or [None]
            if images[-1] is None:
                raise PromptError(f"{where} content[{j}] is an {kind} part without an image")
        else:
            raise PromptError(f"{where} content[{j}] must be a text, image or image_url part, got {part!r:.80}")
    return "".join(text), images


@dataclass
class Prepared:
    """One request ready for the engine, with the rendered prompt kept for logs and answers files."""

    prompt: str
    request: Request


class LlavaPipeline:
    def __init__(self, checkpoint: LoadedCheckpoint, template: str | None = None, compile: bool = False,
                 pack_weights: bool = False, kv_cache_dtype: torch.dtype | None = None) -> None:
        self.checkpoint = checkpoint
        self.model = checkpoint.model
        self.tokenizer = checkpoint.tokenizer
        self.image_processor = checkpoint.image_processor
        self.name = checkpoint.name
        auto = checkpoint.model.config.template
        self.template: Template = get_template(template or auto or template_for_model(self.name))
        self.engine = Engine(self.model, self.tokenizer, context_length=self.model.config.context_length,
                             compile=compile, pack_weights=pack_weights, kv_cache_dtype=kv_cache_dtype)

    # Building requests -------------------------------------------------------------------------
    def preprocess_images(self, images: Sequence[ImageInput]) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Load and preprocess every image of one request: pixel tensors on the model's device, and sizes."""
        if not images:
            return [], []
        pixel_values, sizes = self.image_processor([load_image(img) for img in images])
        device, dtype = self.model.device, self.model.dtype
        return [p.to(device, dtype) for p in pixel_values], list(sizes)

    def encode_images(self, images: Sequence[ImageInput]) -> list[torch.Tensor]:
        """Load, preprocess, and run the tower + projector once for every image of one request."""
        pixel_values, sizes = self.preprocess_images(images)
        if not pixel_values:
            return []
        with torch.inference_mode():
            return self.model.encode_images(pixel_values, sizes)

    def prepare(self, prompt: str, images: Images = None, raw: bool = False, encode: bool = True) -> Prepared:
        """`raw=False`: `prompt` is the user's message, rendered as one turn of the template
        (an `<image>` tag is put in front when the message has none, as the original does).
        `raw=True`: `prompt` is already rendered and must carry one tag per image.
        `encode=False` leaves the images as pixels for the engine to encode at prefill, together
        with the rest of its batch (what a server wants: one tower pass for all newcomers)."""
        prompt = _check_text(prompt, "prompt")
        image_list = _as_list(images)
        if not raw:
            if image_list and IMAGE_TAG not in prompt:
                prompt = (IMAGE_TAG + "\n") * len(image_list) + prompt
            prompt = self.template.render([prompt, None])
        check_image_count(prompt, len(image_list))
        return self._request(prompt, image_list, encode)

    def prepare_chat(self, messages: Sequence[Mapping[str, Any]], encode: bool = True) -> Prepared:
        """OpenAI-style messages: [{"role": "system"|"user"|"assistant", "content": str | parts, "images": [...]}].

        A system message may come first; then user and assistant alternate, ending with the user's.
        """
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise InputTypeError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                                 f"not {type(messages).__name__}")
        turns: list[str | None] = []
        images: list[ImageInput] = []
        system = None
        for i, msg in enumerate(messages):
            if not isinstance(msg, Mapping):
                raise InputTypeError(f"message {i} must be a dict with 'role' and 'content', not {type(msg).__name__}")
            role, content = msg.get("role"), msg.get("content")
            where = f"message {i} ({role})"
            if role == "system" and i == 0:
                system = _check_text(content, f"{where} content")
                continue
            expected = "user" if len(turns) % 2 == 0 else "assistant"
            if role != expected:
                raise PromptError(f"message {i}: expected role {expected!r}, got {role!r:.40} "
                                  "(an optional system message first, then user and assistant alternate)")
            msg_images = _as_list(msg.get("images"), f"{where} images")
            if isinstance(content, list):
                content, part_images = _message_parts(content, where)
                msg_images += part_images
            if role == "user" and not msg_images and (content is None or isinstance(content, str) and not content.strip()):
                raise PromptError(f"{where} has no content")
            content = "" if content is None else _check_text(content, f"{where} content")
            if role == "assistant" and (msg_images or IMAGE_TAG in content):
                raise PromptError(f"{where}: images belong in user messages")
            if msg_images and IMAGE_TAG not in content:
                content = (IMAGE_TAG + "\n") * len(msg_images) + content
            check_image_count(content, len(msg_images))
            images += msg_images
            turns.append(content)
        if not turns or len(turns) % 2 == 0:
            raise PromptError("the last message must be the user's")
        template = self.template if system is None else self.template.with_system(system)
        return self._request(template.render(turns + [None]), images, encode)

    def _request(self, prompt: str, images: list[ImageInput], encode: bool = True) -> Prepared:
        if self.model.config.extra.get("mm_use_im_start_end"):
            # Checkpoints trained with mm_use_im_start_end see every image as <im_start><image><im_end>.
            prompt = wrap_image_tags(prompt)
        if encode:
            features = self.encode_images(images)
            pixel_values, sizes, counts = [], [], [int(f.shape[0]) for f in features]
        else:
            features = []
            pixel_values, sizes = self.preprocess_images(images)
            counts = [int(self.model.image_token_count(size)) for size in sizes]
        ids = tokenize_prompt(self.tokenizer, prompt, counts, self.model.config.image_token_index,
                              convention=self.checkpoint.convention)
        return Prepared(prompt=prompt, request=Request(input_ids=ids, image_features=features,
                                                       pixel_values=pixel_values, image_sizes=sizes))

    # Answering ----------------------------------------------------------------------------------
    def sampling(self, **kwargs: Any) -> SamplingParams:
        """SamplingParams with this model's defaults (the template's stop string when no `stop` is
        given), as every answering path uses them; checked before any image is encoded."""
        params = sampling_params(**kwargs)
        if not params.stop and self.template.stop_str:
            params.stop = [self.template.stop_str]
        return params

    def complete(self, prepared: Sequence[Prepared], **sampling: Any) -> list[Completion]:
        return self._complete(prepared, self.sampling(**sampling))

    def _complete(self, prepared: Sequence[Prepared], params: SamplingParams) -> list[Completion]:
        return self.engine.generate([p.request for p in prepared], params)

    def generate(self, prompts: str | Sequence[str], images: Images | Sequence[Images] = None, raw: bool = False,
                 **sampling: Any) -> str | list[str]:
        """Answer one prompt (returns str) or a batch (returns list[str]; `images` then has one entry per prompt)."""
        params = self.sampling(**sampling)
        if isinstance(prompts, str):
            return self._complete([self.prepare(prompts, images, raw)], params)[0].text.strip()
        if not isinstance(prompts, (list, tuple)):
            raise InputTypeError(f"prompts must be a string or a list of strings, not {type(prompts).__name__}")
        if images is not None and not isinstance(images, (list, tuple)):
            raise InputTypeError("with a list of prompts, images must be a list with one entry per prompt "
                                 f"(None for none), not {type(images).__name__}")
        per_prompt = list(images) if images is not None else [None] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(per_prompt)} image entries; give one per prompt (None for none)")
        prepared = [self.prepare(p, imgs, raw) for p, imgs in zip(prompts, per_prompt)]
        return [c.text.strip() for c in self._complete(prepared, params)]

    def chat(self, messages: Sequence[Mapping[str, Any]], **sampling: Any) -> str:
        params = self.sampling(**sampling)
        return self._complete([self.prepare_chat(messages)], params)[0].text.strip()

    def stream(self, messages_or_prompt: str | Sequence[Mapping[str, Any]], images: Images = None,
               **sampling: Any) -> Iterator[str]:
        """Text deltas as they are generated."""
        params = self.sampling(**sampling)
        if isinstance(messages_or_prompt, str):
            prepared = self.prepare(messages_or_prompt, images)
        else:
            prepared = self.prepare_chat(messages_or_prompt)
        return self.engine.stream(prepared.request, params)


def _kv_cache_dtype(device: torch.device, value: str | torch.dtype) -> torch.dtype:
    try:
        return resolve_dtype(device, value)
    except (InputError, InputTypeError) as err:
        raise type(err)(f"kv_cache_dtype: {err}") from None


def load(path: str | os.PathLike | None = None, model_base: str | None = None, device: str | None = None,
         dtype: str | torch.dtype | None = None, vision_tower: str | None = None, template: str | None = None,
         quantize: str | None = None, compile: bool = False, pack_weights: bool = False,
         kv_cache_dtype: str | torch.dtype | None = None) -> LlavaPipeline:
    """Load a checkpoint (any supported layout, local folder or hub name) into a ready pipeline.

    quantize: None, "int8" (dynamic int8 on CPU), "int8-weight" / "int4" (weight-only on CPU),
    "8bit" or "4bit" (bitsandbytes); llava's CPU modes run an fp32 vision tower in bf16 where the CPU
    has bf16 instructions, as quantized setups keep a 16-bit tower (`llava.model.quantize`). compile:
    compile the engine's decode step
    (`Engine(compile=True)`). pack_weights: give the CPU linears oneDNN-packed copies of their
    weights, faster prefills and batches for a second copy of the language model's weights
    (`Engine(pack_weights=True)`). kv_cache_dtype: "bf16", "fp16", "fp32" or a torch dtype, the KV
    cache's (default: the model's dtype); bf16 under fp32 weights halves what each decoded token's
    attention reads, as llama.cpp's f16 cache does (`Engine(kv_cache_dtype=...)`).
    """
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise InputTypeError(f"path must be a folder or hub name, not {type(path).__name__}")
    if quantize is not None and (not isinstance(quantize, str)
                                 or quantize not in QUANTIZE_MODES and quantize not in QUANTIZE_MODES.values()):
        raise InputError(f"unknown quantize mode {quantize!r}; expected one of {', '.join(QUANTIZE_MODES)}")
    if template is not None:
        get_template(_check_text(template, "template"))  # an unknown name fails before the load, not after
    target = resolve_device(device)
    chosen_dtype = resolve_dtype(target, dtype)
    cache_dtype = None if kv_cache_dtype is None else _kv_cache_dtype(target, kv_cache_dtype)
    # Quantized while loading: each linear is quantized as its weights arrive (never a full-precision copy).
    checkpoint = load_checkpoint(str(path) if path is not None else default_model_path(), model_base=model_base,
                                 vision_tower=vision_tower, device=target, dtype=chosen_dtype,
                                 quantize=quantize)
    return LlavaPipeline(checkpoint, template=template, compile=compile, pack_weights=pack_weights,
                         kv_cache_dtype=cache_dtype)
