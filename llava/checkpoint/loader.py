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
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from llava.checkpoint.build import build_model, image_processor_for, resize_vocab
from llava.checkpoint.hf import from_hf_config, is_hf_config, read_hf, save_hf, save_hf_processor
from llava.checkpoint.io import check_readable, read_json, read_weight_headers, weight_files, weight_header
from llava.checkpoint.original import (
    from_original_config,
    is_original_config,
    read_config,
    read_original,
    save_original,
)
from llava.checkpoint.partial import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    NON_LORA_FILE,
    PROJECTOR_FILE,
    merge_lora,
    read_lora,
    read_projector_only,
)
from llava.checkpoint.paths import atomic_output, check_output, looks_like_hub_id, model_name, resolve_path
from llava.checkpoint.tokenizer import (
    IMAGE_TOKEN,
    add_special_tokens,
    has_tokenizer,
    load_tokenizer,
    save_tokenizer,
    token_id,
)
from llava.config import LlavaConfig
from llava.device import resolve_device, resolve_dtype
from llava.errors import CheckpointError, CheckpointNotFound, InputError, LlavaError
from llava.model.llava import LlavaModel
from llava.processing.image import ImageProcessor
from llava.processing.templates import template_for_model

LAYOUTS = ("hf", "original", "original-projector", "original-lora")
SAVE_LAYOUTS = ("hf", "original")
# JSON files a tokenizer folder may hold; checked before transformers reads them unnamed.
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
__all__ = ["LAYOUTS", "LoadedCheckpoint", "convert", "describe", "detect_layout", "load_checkpoint", "model_name",
           "resolve_path", "save_checkpoint"]


@dataclass
class LoadedCheckpoint:
    model: LlavaModel
    tokenizer: PreTrainedTokenizerBase
    image_processor: ImageProcessor
    layout: str  # one of LAYOUTS
    convention: str  # prompt tokenization for llava.processing.tokenize: "hf" or "original"
    name: str  # folder or hub repo name, for the template auto-choice


def detect_layout(path: str | os.PathLike) -> str:
    """Which layout a folder holds, judged by the files in it (never by its name)."""
    folder = str(path)
    if not os.path.isdir(folder):
        raise CheckpointNotFound(f"checkpoint folder not found: {folder}")
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
        raise CheckpointNotFound(f"{folder} holds a transformers {cfg.get('model_type')!r} model; the llava-hf types "
                                 "read here are 'llava' and 'llava_next'")
    if cfg is not None and has_weights and not is_original_config(cfg):
        kind = cfg.get("model_type", "language")
        raise CheckpointNotFound(f"{folder} holds a plain {kind} model with no vision parts; "
                                 "pass it as model_base (--model-base) beside a projector-only or LoRA checkpoint")
    shown = files[:20] + ([f"... {len(files) - 20} more"] if len(files) > 20 else [])
    raise CheckpointNotFound(
        f"no LLaVA checkpoint in {folder}: looked for config.json + weights (llava-hf or original layout), "
        f"config.json + {PROJECTOR_FILE} (projector-only), {ADAPTER_CONFIG} + adapter_model.* (LoRA); found {shown}")


# Loading --------------------------------------------------------------------------------------
def _first_lm_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    return next((v.dtype for k, v in state.items() if k.startswith("language_model.") and v.is_floating_point()),
                torch.float32)


def load_checkpoint(path: str | os.PathLike, model_base: str | None = None, vision_tower: str | None = None,
                    device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                    quantize: str | None = None) -> LoadedCheckpoint:
    """Load any supported checkpoint folder or hub name into an eval-mode LlavaModel + tokenizer + processor.

    `dtype="auto"` keeps the stored dtype (what `convert` uses); None picks per device. Weights
    are read one tensor at a time straight into the model, in `dtype`, on `device`.
    `quantize` ("int8-dynamic" or "int8", "bnb-8bit" or "8bit", "bnb-4bit" or "4bit"; see
    `llava.model.quantize`) quantizes the language model as it loads, each linear as soon as
    its weights are in, so its full-precision form never exists at once (LoRA checkpoints are
    merged first, then quantized); the tower is read straight into its dtype under the mode
    (`llava.model.quantize.vision_tower_dtype`).
    """
    folder, name = resolve_path(path)
    return _load(folder, name, model_base, vision_tower, device, dtype, quantize)


def _read_layout(folder: str, layout: str, model_base: str | None,
                 vision_tower: str | None) -> tuple[LlavaConfig, dict[str, torch.Tensor], str]:
    """(config, weights by our names, not yet read: see `StoredTensor`, tokenizer folder) of a folder."""
    if layout in ("original-projector", "original-lora"):
        if model_base is None:
            kind = "a projector-only" if layout == "original-projector" else "a LoRA"
            raise InputError(f"{folder} is {kind} checkpoint: pass the base language model it was trained on "
                             "with --model-base PATH (Python: model_base=PATH), e.g. lmsys/vicuna-7b-v1.5")
        base_folder, _ = resolve_path(model_base)
        reader = read_projector_only if layout == "original-projector" else read_lora
        config, state = reader(folder, base_folder, vision_tower)
        return config, state, folder if has_tokenizer(folder) else base_folder
    if model_base is not None:
        warnings.warn(f"{folder} is a full {layout} checkpoint; model_base={model_base!r} is ignored", stacklevel=4)
    config, state = read_hf(folder) if layout == "hf" else read_original(folder, vision_tower)
    return config, state, folder


def _load(folder: str, name: str, model_base: str | None, vision_tower: str | None,
          device: str | torch.device | None, dtype: torch.dtype | str | None,
          quantize: str | None = None) -> LoadedCheckpoint:
    from llava.model.quantize import (LinearQuantizer, check_mode, quantize_language_model, quantized_layers,
                                      vision_tower_dtype)

    layout = detect_layout(folder)
    config, state, tok_folder = _read_layout(folder, layout, model_base, vision_tower)
    target = resolve_device(device)
    chosen = _first_lm_dtype(state) if dtype == "auto" else resolve_dtype(target, dtype)
    mode = check_mode(quantize, target) if quantize else None  # before any weight is read
    # Read before the weights: the tokens the original's loader adds may grow the vocabulary, and
    # then lm_head is quantized only once resized.
    tokenizer = read_tokenizer(tok_folder, config.text_config if layout != "hf" else None)
    if layout != "hf":
        add_special_tokens(tokenizer, _original_tokens(config))
    grows = len(tokenizer) > config.text_config.vocab_size
    # A LoRA's deltas merge into full-precision weights: its model is quantized whole, once merged.
    streaming = LinearQuantizer(mode, target, chosen, keep_output=grows) \
        if mode and layout != "original-lora" else None
    model = build_model(config, state, chosen, tower_source=vision_tower or config.vision_tower_name,
                        device=target, quantize_linear=streaming,
                        tower_dtype=vision_tower_dtype(mode, chosen, target) if mode else None)
    del state
    if layout == "original-lora":
        model.language_model = merge_lora(model.language_model, folder)
        model.config.text_config = model.language_model.config
    convention = "hf" if layout == "hf" and token_id(tokenizer, IMAGE_TOKEN) is not None else "original"
    if layout != "hf":
        resize_vocab(model, len(tokenizer))
    model.vision_tower.requires_grad_(False)
    model = model.eval()
    if mode:
        quantize_language_model(model, mode, compute_dtype=chosen)  # what is left (a resized lm_head, a LoRA model)
        for layer in quantized_layers(model.language_model):
            # As quantizing a loaded model leaves them (so outputs match): in eval mode bitsandbytes
            # switches to other CPU kernels (4-bit weights repacked), whose results differ slightly.
            layer.train()
    return LoadedCheckpoint(model, tokenizer, image_processor_for(model.config, folder), layout, convention, name)


def _check_sentencepiece(path: str) -> None:
    """Parse a SentencePiece model first: transformers, failing on a corrupt one, tries other
    formats and reports the last (e.g. "tiktoken is required")."""
    try:
        import sentencepiece
    except ImportError:
        return  # load_tokenizer says which packages it needs
    try:
        sentencepiece.SentencePieceProcessor(model_file=path)
    except Exception as err:  # RuntimeError / OSError from the C++ parser
        raise CheckpointError(f"{path} is not a readable SentencePiece model ({' '.join(str(err).split())[:200]}); "
                              "it may be truncated or corrupt: download or save it again") from None


def read_tokenizer(folder: str, text_config: PretrainedConfig | None = None) -> PreTrainedTokenizerBase:
    """`load_tokenizer`, with a corrupt tokenizer file named instead of a tokenizers/JSON traceback.

    `text_config` is the language model's own config, so transformers need not read the
    folder's config.json (an original one's `llava_llama` type makes it warn).
    """
    for name in TOKENIZER_JSON:
        if os.path.isfile(os.path.join(folder, name)):
            read_json(os.path.join(folder, name), "tokenizer data")
    kind = "tokenizer.json" if os.path.isfile(os.path.join(folder, "tokenizer.json")) else "tokenizer.model"
    if os.path.isfile(os.path.join(folder, kind)):
        check_readable(os.path.join(folder, kind), "a tokenizer")  # an empty tokenizer.model loads as no tokenizer
    if kind == "tokenizer.model":
        _check_sentencepiece(os.path.join(folder, kind))
    try:
        return load_tokenizer(folder, config=text_config)
    except (LlavaError, ImportError, FileNotFoundError):
        raise
    except Exception as err:  # tokenizers' and sentencepiece's parse errors name no file
        raise CheckpointError(f"{os.path.join(folder, kind)} is not a readable tokenizer "
                              f"({type(err).__name__}: {' '.join(str(err).split())[:200]}); it may be truncated "
                              "or corrupt: download or save it again") from None


def _original_tokens(config: LlavaConfig) -> list[str]:
    """The tokens the original's loader adds per config flags."""
    tokens = []
    if config.extra.get("mm_use_im_patch_token"):
        tokens.append("<im_patch>")
    if config.extra.get("mm_use_im_start_end"):
        tokens += ["<im_start>", "<im_end>"]
    return tokens


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
        raise InputError(f"cannot save layout {layout!r}; valid: {', '.join(SAVE_LAYOUTS)}")
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
    if layout == "hf":
        save_hf_processor(path, model.config, tokenizer, image_processor)  # for transformers' AutoProcessor


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str = "hf", model_base: str | None = None,
            vision_tower: str | None = None, overwrite: bool = False, quant: str | None = None) -> LoadedCheckpoint:
    """Load `src` (any layout, stored dtype kept) and save it to `dst` in layout `to`.

    `dst` must be new or empty unless `overwrite`; it may never be `src`, inside it or around
    it. The folder is written beside `dst` and renamed into place when complete (an old `dst`
    is deleted only then), so an interrupted convert leaves no half-written `dst`. The
    template is written into the config, so the converted folder keeps the one `src`'s name
    implied whatever `dst` is called.

    `to="gguf"` writes llama.cpp's two files instead, `<name>-<quant>.gguf` and
    `mmproj-<name>-f16.gguf` (`quant`: f32, f16 (default), bf16, q8_0 or q4_0; the mmproj is f32
    for f32; see `llava.checkpoint.gguf_export`), and returns the loaded source.
    """
    if to not in (*SAVE_LAYOUTS, "gguf"):
        raise InputError(f"cannot convert to layout {to!r}; valid: {', '.join(SAVE_LAYOUTS)}, gguf")
    if quant is not None and to != "gguf":
        raise InputError(f"quant={quant!r} (--quant) applies only to GGUF output (to='gguf', --to gguf)")
    if to == "gguf":
        from llava.checkpoint.gguf_export import check_gguf_output, check_quant, export_gguf

        quant = check_quant(quant or "f16")
    folder, name = resolve_path(src)
    # before minutes of loading
    target = check_gguf_output(folder, dst, overwrite) if to == "gguf" else check_output(folder, dst, overwrite)
    ckpt = _load(folder, name, model_base, vision_tower, device="cpu", dtype="auto")
    ckpt.model.config.template = ckpt.model.config.template or template_for_model(ckpt.name)
    with atomic_output(target, overwrite) as tmp:
        if to == "gguf":
            export_gguf(ckpt, tmp, quant)
        else:
            save_checkpoint(ckpt.model, ckpt.tokenizer, ckpt.image_processor, tmp, layout=to)
    if to == "gguf":
        return ckpt
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


_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_TOWER_FAMILIES = {"clip_vision_model": "CLIP ViT", "siglip_vision_model": "SigLIP ViT"}


def check_files(folder: str, layout: str) -> dict[str, str]:
    """Every file loading would read, checked cheaply (JSON parsed, weight headers read, no
    tensor data), so `llava info` names a truncated or corrupt file; returns weight name -> dtype."""
    names = {"hf": (), "original": (), "original-projector": (PROJECTOR_FILE,),
             "original-lora": (*ADAPTER_WEIGHTS, NON_LORA_FILE)}[layout]
    headers = read_weight_headers(folder) if layout in ("hf", "original") else {}
    for name in names:
        if os.path.isfile(os.path.join(folder, name)):
            headers.update(weight_header(os.path.join(folder, name)))
    for name in (*TOKENIZER_JSON, "preprocessor_config.json", ADAPTER_CONFIG):
        if os.path.isfile(os.path.join(folder, name)):
            read_json(os.path.join(folder, name))
    if has_tokenizer(folder) and not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        check_readable(os.path.join(folder, "tokenizer.model"), "a tokenizer")
        _check_sentencepiece(os.path.join(folder, "tokenizer.model"))
    return headers


def _tower_text(config: LlavaConfig, embedded: bool) -> str:
    """The tower as `llava info` shows it: named by the hub name it is (or was) loaded from, else
    by its architecture (a local build path, like `$OUT/stage0/vision`, only meant something on
    the machine that trained it), and whether its weights are in the checkpoint."""
    vision = config.vision_config
    name = config.vision_tower_name
    if not name or (embedded and not looks_like_hub_id(name)):
        name = _TOWER_FAMILIES.get(vision.model_type, vision.model_type)
    where = "weights in the checkpoint" if embedded else "weights loaded from that name"
    return (f"{name}: hidden {vision.hidden_size}, {vision.num_hidden_layers} layers, "
            f"{vision.image_size}x{vision.image_size} px, patch {vision.patch_size} ({where})")


def describe(path: str | os.PathLike, model_base: str | None = None) -> dict[str, Any]:
    """What a checkpoint is, from its config and file headers (no tensor data read): for `llava info`.

    Every file a load would read is checked on the way (see `check_files`), so `llava info`
    also says which file of a download is truncated or corrupt.
    """
    folder, name = resolve_path(path)
    layout = detect_layout(folder)
    headers = check_files(folder, layout)
    config, cfg = _config_of(folder, layout)
    with torch.device("meta"):
        meta = LlavaModel(config)  # sizes and token counts without allocating weights
    parts = {"language_model": 0, "vision_tower": 0, "projector": 0, "image_newline": 0}
    for key, param in meta.named_parameters():  # tied weights counted once
        parts[key.split(".", 1)[0]] += param.numel()
    sizes = [(config.image_size, config.image_size)] + list(config.image_grid_pinpoints or [])
    counts = sorted({meta.image_token_count(s) for s in sizes}) if config.image_aspect_ratio == "anyres" \
        else [meta.image_token_count((config.image_size, config.image_size))]
    text = config.text_config
    dtype = next((d for k, d in headers.items() if "vision_tower" not in k and "projector" not in k
                  and (d in _DTYPES or d in _DTYPES.values())), None)
    info: dict[str, Any] = {
        "name": name,
        "path": folder,
        "layout": layout,
        "architecture": (cfg.get("architectures") or ["?"])[0],
        "model_base": model_base,
        "language_model": f"{text.model_type}: hidden {text.hidden_size}, {text.num_hidden_layers} layers, "
                          f"{text.num_attention_heads} heads, vocab {text.vocab_size}",
        "vision_tower": _tower_text(config, any("vision_tower." in k for k in headers)),
        "projector": config.projector_type,
        "parameters": _human(sum(parts.values())),
        "params_total": sum(parts.values()),
        **{f"params_{k}": v for k, v in parts.items() if v},
        "dtype": cfg.get("torch_dtype") or cfg.get("dtype") or _DTYPES.get(dtype, dtype),
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
