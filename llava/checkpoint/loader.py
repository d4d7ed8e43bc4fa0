"""One entry point for every checkpoint kind: detect by files, load, save, convert, describe.

Layouts:
- "hf": transformers' llava-hf (LlavaForConditionalGeneration / LlavaNextForConditionalGeneration)
- "original": haotian-liu/LLaVA full checkpoints (released `model_type "llava"` configs too)
- "original-projector": stage-1 `mm_projector.bin` + config, needs `model_base`
- "original-lora": PEFT adapter + `non_lora_trainables.bin`, merged into `model_base`
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from llava.checkpoint.build import build_model, image_processor_for, pick_device, pick_dtype, resize_vocab
from llava.checkpoint.hf import from_hf_config, is_hf_config, read_hf, save_hf
from llava.checkpoint.io import weight_files
from llava.checkpoint.original import from_original_config, is_original_config, read_config, read_original, \
    save_original
from llava.checkpoint.partial import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROJECTOR_FILE, merge_lora, read_lora,
                                      read_projector_only)
from llava.checkpoint.tokenizer import (IMAGE_TOKEN, add_special_tokens, has_tokenizer, load_tokenizer, save_tokenizer,
                                        token_id)
from llava.config import LlavaConfig
from llava.model.llava import LlavaModel
from llava.processing.image import ImageProcessor
from llava.processing.templates import template_for_model

LAYOUTS = ("hf", "original", "original-projector", "original-lora")
SAVE_LAYOUTS = ("hf", "original")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class LoadedCheckpoint:
    model: LlavaModel
    tokenizer: PreTrainedTokenizerBase
    image_processor: ImageProcessor
    layout: str  # one of LAYOUTS
    convention: str  # prompt tokenization for llava.processing.tokenize: "hf" or "original"
    name: str  # folder or hub repo name, for the template auto-choice


# Paths ----------------------------------------------------------------------------------------
def model_name(folder: str) -> str:
    """The original's model name: the folder's name, or `<parent>_<checkpoint-N>` for trainer checkpoints."""
    parts = os.path.normpath(os.path.abspath(folder)).split(os.sep)
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


def resolve_path(path: str | os.PathLike) -> tuple[str, str]:
    """(local folder, model name). Hub names are downloaded only when no such local folder exists."""
    local = os.path.expanduser(str(path))
    if os.path.isdir(local):
        return local, model_name(local)
    if os.path.exists(local):
        raise FileNotFoundError(f"{local} is a file; pass the checkpoint's folder")
    if _HUB_ID.fullmatch(local):
        try:
            return _download(local), local.split("/")[-1]
        except Exception as err:  # offline, unknown repo, gated, network: all mean the same to the user
            raise FileNotFoundError(
                f"{local!r} is not a local folder and could not be fetched from the Hugging Face hub "
                f"({type(err).__name__}: {err}); download it and pass the local folder") from None
    raise FileNotFoundError(f"checkpoint folder not found: {local}")


def _download(repo_id: str) -> str:
    """A hub snapshot, without other frameworks' weights or .bin copies of safetensors weights."""
    from huggingface_hub import list_repo_files, snapshot_download

    ignore = ["*.msgpack", "*.h5", "*.ot", "*.onnx", "*.gguf"]
    try:
        files = list_repo_files(repo_id)
    except Exception:  # offline: a cached snapshot may still be there
        files = []
    if any(re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", f) for f in files):
        ignore.append("pytorch_model*.bin")
    return snapshot_download(repo_id=repo_id, ignore_patterns=ignore)


def detect_layout(path: str | os.PathLike) -> str:
    """Which layout a folder holds, judged by the files in it (never by its name)."""
    folder = str(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    files = sorted(os.listdir(folder))
    cfg = read_config(folder) if "config.json" in files else None
    if ADAPTER_CONFIG in files and any(w in files for w in ADAPTER_WEIGHTS):
        return "original-lora"
    has_weights = bool(weight_files(folder))
    if cfg is not None and is_hf_config(cfg) and has_weights:
        return "hf"
    if cfg is not None and is_original_config(cfg):
        if has_weights:
            return "original"
        if PROJECTOR_FILE in files:
            return "original-projector"
    if cfg is not None and "text_config" in cfg and not is_hf_config(cfg):
        raise FileNotFoundError(f"{folder} holds a transformers {cfg.get('model_type')!r} model; the llava-hf types "
                                "read here are 'llava' and 'llava_next'")
    if cfg is not None and has_weights and not is_original_config(cfg):
        kind = cfg.get("model_type", "language")
        raise FileNotFoundError(f"{folder} holds a plain {kind} model with no vision parts; "
                                "pass it as model_base (--model-base) beside a projector-only or LoRA checkpoint")
    shown = files[:20] + ([f"... {len(files) - 20} more"] if len(files) > 20 else [])
    raise FileNotFoundError(
        f"no LLaVA checkpoint in {folder}: looked for config.json + weights (llava-hf or original layout), "
        f"config.json + {PROJECTOR_FILE} (projector-only), {ADAPTER_CONFIG} + adapter_model.* (LoRA); found {shown}")


# Loading --------------------------------------------------------------------------------------
def _first_lm_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    return next((v.dtype for k, v in state.items() if k.startswith("language_model.") and v.is_floating_point()),
                torch.float32)


def load_checkpoint(path: str | os.PathLike, model_base: str | None = None, vision_tower: str | None = None,
                    device: str | torch.device | None = None,
                    dtype: torch.dtype | str | None = None) -> LoadedCheckpoint:
    """Load any supported checkpoint folder or hub name into an eval-mode LlavaModel + tokenizer + processor.

    `dtype="auto"` keeps the stored dtype (what `convert` uses); None picks per device.
    """
    folder, name = resolve_path(path)
    layout = detect_layout(folder)
    tok_folder = folder
    if layout in ("original-projector", "original-lora"):
        if model_base is None:
            kind = "a projector-only" if layout == "original-projector" else "a LoRA"
            raise ValueError(f"{folder} is {kind} checkpoint: pass the base language model it was trained on "
                             "with --model-base PATH (Python: model_base=PATH), e.g. lmsys/vicuna-7b-v1.5")
        base_folder, _ = resolve_path(model_base)
        reader = read_projector_only if layout == "original-projector" else read_lora
        config, state = reader(folder, base_folder, vision_tower)
        tok_folder = folder if has_tokenizer(folder) else base_folder
    else:
        if model_base is not None:
            warnings.warn(f"{folder} is a full {layout} checkpoint; model_base={model_base!r} is ignored", stacklevel=2)
        config, state = read_hf(folder) if layout == "hf" else read_original(folder, vision_tower)
    target = pick_device(device)
    chosen = _first_lm_dtype(state) if dtype == "auto" else pick_dtype(target, dtype)
    model = build_model(config, state, chosen, tower_source=vision_tower or config.vision_tower_name)
    del state
    if layout == "original-lora":
        model.language_model = merge_lora(model.language_model, folder)
        model.config.text_config = model.language_model.config
    tokenizer = load_tokenizer(tok_folder)
    convention = "hf" if layout == "hf" and token_id(tokenizer, IMAGE_TOKEN) is not None else "original"
    if layout != "hf":
        _add_original_tokens(model, tokenizer)
    model.vision_tower.requires_grad_(False)
    model = model.to(target).eval()
    return LoadedCheckpoint(model, tokenizer, image_processor_for(model.config, folder), layout, convention, name)


def _add_original_tokens(model: LlavaModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """The tokens the original's loader adds per config flags, and the matching embedding rows."""
    tokens = []
    if model.config.extra.get("mm_use_im_patch_token"):
        tokens.append("<im_patch>")
    if model.config.extra.get("mm_use_im_start_end"):
        tokens += ["<im_start>", "<im_end>"]
    add_special_tokens(tokenizer, tokens)
    resize_vocab(model, len(tokenizer))


# Saving ---------------------------------------------------------------------------------------
def prepare_for_hf(model: LlavaModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """Give the tokenizer an `<image>` special token whose id is the model's placeholder id.

    llava-hf tokenizes prompts whole, so `<image>` must be one token; as transformers'
    conversion does, it is added when missing (embeddings grow, new rows = mean of old).
    """
    add_special_tokens(tokenizer, [IMAGE_TOKEN])
    resize_vocab(model, len(tokenizer))
    model.config.image_token_index = token_id(tokenizer, IMAGE_TOKEN)
    return model.config.image_token_index


def save_checkpoint(model: LlavaModel, tokenizer: PreTrainedTokenizerBase, image_processor: ImageProcessor,
                    path: str | os.PathLike, layout: str = "hf", max_shard_bytes: int = 5 * 2**30,
                    safe_serialization: bool = True) -> None:
    """Write a folder that `load_checkpoint` (and, for "hf", transformers) reads back.

    For "hf" the model and tokenizer gain an `<image>` token if they lack one (see
    `prepare_for_hf`). `safe_serialization=False` writes torch .bin files (original only).
    """
    if layout not in SAVE_LAYOUTS:
        raise ValueError(f"cannot save layout {layout!r}; valid: {', '.join(SAVE_LAYOUTS)}")
    path = str(path)
    os.makedirs(path, exist_ok=True)
    if layout == "hf":
        prepare_for_hf(model, tokenizer)
        save_hf(model.state_dict(), model.config, path, max_shard_bytes=max_shard_bytes)
    else:
        save_original(model.state_dict(), model.config, path, max_shard_bytes=max_shard_bytes,
                      safe_serialization=safe_serialization)
    save_tokenizer(tokenizer, path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(image_processor.to_preprocessor_config(), f, indent=2)


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str = "hf", model_base: str | None = None,
            vision_tower: str | None = None) -> LoadedCheckpoint:
    """Load `src` (any layout, stored dtype kept) and save it to `dst` in layout `to`.

    The template is written into the config, so the converted folder keeps the one `src`'s
    name implied whatever `dst` is called.
    """
    if to not in SAVE_LAYOUTS:
        raise ValueError(f"cannot convert to layout {to!r}; valid: {', '.join(SAVE_LAYOUTS)}")
    ckpt = load_checkpoint(src, model_base=model_base, vision_tower=vision_tower, device="cpu", dtype="auto")
    # The returned model keeps the stored dtype (fp16 for released checkpoints); cast it to run on a CPU.
    ckpt.model.config.template = ckpt.model.config.template or template_for_model(ckpt.name)
    save_checkpoint(ckpt.model, ckpt.tokenizer, ckpt.image_processor, dst, layout=to)
    return dataclasses.replace(ckpt, layout=to, convention="hf" if to == "hf" else "original")


# Describing -----------------------------------------------------------------------------------
def _config_of(folder: str, layout: str) -> tuple[LlavaConfig, dict[str, Any]]:
    cfg = read_config(folder)
    if layout == "hf":
        return from_hf_config(cfg), cfg
    try:
        return from_original_config(cfg), cfg
    except FileNotFoundError:
        if layout != "original":
            raise
        return read_original(folder)[0], cfg  # tower architecture only recoverable from its stored weights


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _stored_dtype(folder: str) -> str | None:
    """The dtype of the first safetensors weight, read from the file header only."""
    from safetensors import safe_open

    files = [f for f in weight_files(folder) if f.endswith(".safetensors")]
    if not files:
        return None
    with safe_open(files[0], framework="pt") as f:
        names = list(f.keys())
        code = f.get_slice(names[0]).get_dtype() if names else None
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}.get(code, code)


def describe(path: str | os.PathLike, model_base: str | None = None) -> dict[str, Any]:
    """What a checkpoint is, from its config alone (no weights loaded): for `llava info`."""
    folder, name = resolve_path(path)
    layout = detect_layout(folder)
    config, cfg = _config_of(folder, layout)
    with torch.device("meta"):
        meta = LlavaModel(config)  # sizes and token counts without allocating weights
    parts = {"language_model": 0, "vision_tower": 0, "projector": 0, "image_newline": 0}
    for key, param in meta.named_parameters():  # tied weights counted once
        parts[key.split(".", 1)[0]] += param.numel()
    sizes = [(config.image_size, config.image_size)] + list(config.image_grid_pinpoints or [])
    counts = sorted({meta.image_token_count(s) for s in sizes}) if config.image_aspect_ratio == "anyres" \
        else [meta.image_token_count((config.image_size, config.image_size))]
    text, vision = config.text_config, config.vision_config
    info: dict[str, Any] = {
        "name": name,
        "path": folder,
        "layout": layout,
        "architecture": (cfg.get("architectures") or ["?"])[0],
        "model_base": model_base,
        "language_model": f"{text.model_type}: hidden {text.hidden_size}, {text.num_hidden_layers} layers, "
                          f"{text.num_attention_heads} heads, vocab {text.vocab_size}",
        "vision_tower": f"{config.vision_tower_name or vision.model_type}: hidden {vision.hidden_size}, "
                        f"{vision.num_hidden_layers} layers, {vision.image_size}px, patch {vision.patch_size}",
        "projector": config.projector_type,
        "parameters": _human(sum(parts.values())),
        "params_total": sum(parts.values()),
        **{f"params_{k}": v for k, v in parts.items() if v},
        "dtype": cfg.get("torch_dtype") or cfg.get("dtype") or _stored_dtype(folder),
        "image_aspect_ratio": config.image_aspect_ratio,
        "mm_patch_merge_type": config.mm_patch_merge_type,
        "vision_feature": f"layer {config.vision_feature_layer}, {config.vision_feature_select}",
        "template": config.template or template_for_model(name),
        "context_length": config.context_length,
        "image_tokens_per_image": counts[0] if len(counts) == 1 else f"{counts[0]}-{counts[-1]}",
        "image_token_index": config.image_token_index,
    }
    if config.image_grid_pinpoints:
        info["image_grid_pinpoints"] = [list(p) for p in config.image_grid_pinpoints]
    return info
