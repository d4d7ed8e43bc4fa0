"""The original (haotian-liu/LLaVA) layout: a flat causal-LM config.json with `mm_*` keys.

Full checkpoints keep the language model's weight names unchanged (`model.layers.*`,
`lm_head.weight`) and add `model.mm_projector.*`, optionally `model.image_newline` and the
tower (`model.vision_tower.vision_tower.vision_model.*`). Released v1.5 checkpoints hold no
tower weights and name it instead (`mm_vision_tower`), so reading one needs the tower's
architecture from somewhere: see `resolve_vision_config`.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from typing import Any

import torch
from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig

from llava.checkpoint import keys
from llava.checkpoint.hf import EXTRA_KEY, is_hf_config
from llava.checkpoint.io import read_json_object, write_weights
from llava.checkpoint.paths import hub_snapshot, looks_like_hub_id
from llava.checkpoint.stored import read_state_dict
from llava.config import CLIP_L_336, LlavaConfig
from llava.errors import CheckpointError, CheckpointMismatch, CheckpointNotFound
from llava.model.anyres import parse_pinpoints
from llava.model.vision import vision_config_from_pretrained

# LM model_type -> (architecture, model_type) as the original code bases name them.
_ARCHS = {
    "llama": ("LlavaLlamaForCausalLM", "llava_llama"),
    "mistral": ("LlavaMistralForCausalLM", "llava_mistral"),
    "qwen2": ("LlavaQwenForCausalLM", "llava_qwen"),
    "mpt": ("LlavaMptForCausalLM", "llava_mpt"),
}
_LM_OF_MODEL_TYPE = {"llava_qwen": "qwen2", "llava_qwen2": "qwen2"}
_ARCH_HINTS = (("mistral", "mistral"), ("mixtral", "mixtral"), ("qwen", "qwen2"), ("mpt", "mpt"), ("gemma", "gemma"))
# Keys the original's training writes, with the values a fresh run writes.
TRAINING_DEFAULTS: dict[str, Any] = {
    "use_mm_proj": True, "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False, "mm_projector_lr": None,
    "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "tokenizer_padding_side": "right",
}
# LLaVA keys that are not LM fields (plus anything starting with "mm_").
_LLAVA_KEYS = set(TRAINING_DEFAULTS) | {
    "image_aspect_ratio", "image_grid_pinpoints", "tokenizer_model_max_length", "unfreeze_mm_vision_tower",
    "freeze_mm_vision_resampler", "tune_mm_vision_resampler", "image_crop_resolution", "image_split_resolution",
    "vision_tower", EXTRA_KEY,
}
# Keys that describe the saved file, not the model.
_FILE_KEYS = ("architectures", "model_type", "_name_or_path", "transformers_version", "dtype", "torch_dtype")

# Towers the released checkpoints name, so they resolve offline (transformers' published configs).
_CLIP_L = dict(CLIP_L_336)
KNOWN_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": _CLIP_L,
    "openai/clip-vit-large-patch14": {**_CLIP_L, "image_size": 224},
    "openai/clip-vit-base-patch16": dict(model_type="clip_vision_model", hidden_size=768, intermediate_size=3072,
                                         num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=16,
                                         projection_dim=512, hidden_act="quick_gelu"),
    "google/siglip-so400m-patch14-384": dict(model_type="siglip_vision_model", hidden_size=1152,
                                             intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                             image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh",
                                             layer_norm_eps=1e-6),
}

TOWER_HELP = ("Pass a local copy of the tower with --vision-tower PATH (Python: vision_tower=PATH), e.g. a folder "
              "holding openai/clip-vit-large-patch14-336's config.json and weights.")


def is_original_config(cfg: dict[str, Any]) -> bool:
    """A flat LM config with LLaVA keys (any model_type, including the released `"llava"` quirk)."""
    if is_hf_config(cfg) or "text_config" in cfg:
        return False
    archs = cfg.get("architectures") or []
    return (any(k.startswith("mm_") for k in cfg) or str(cfg.get("model_type", "")).startswith("llava")
            or any(str(a).startswith("Llava") for a in archs))


def _lm_model_type(cfg: dict[str, Any]) -> str:
    """The language model's transformers model_type behind an original config."""
    ours = (cfg.get(EXTRA_KEY) or {}).get("text_model_type")
    if ours:
        return ours
    model_type = str(cfg.get("model_type", ""))
    if model_type in _LM_OF_MODEL_TYPE:
        return _LM_OF_MODEL_TYPE[model_type]
    inner = model_type[len("llava_"):] if model_type.startswith("llava_") else ""
    if inner in CONFIG_MAPPING:
        return inner
    if model_type in CONFIG_MAPPING and model_type != "llava":
        return model_type  # a plain LM type with mm_* keys added
    # Released configs say model_type "llava" (pre-rename): the architecture names the LM.
    arch = " ".join(cfg.get("architectures") or []).lower()
    return next((lm for hint, lm in _ARCH_HINTS if f"llava{hint}" in arch), "llama")


def _original_arch(lm_type: str) -> tuple[str, str]:
    if lm_type in _ARCHS:
        return _ARCHS[lm_type]
    camel = "".join(part.capitalize() for part in lm_type.split("_"))
    return f"Llava{camel}ForCausalLM", f"llava_{lm_type}"


def to_original_config(config: LlavaConfig, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """config.json as the original's training writes it (LM fields flat, then the mm keys).

    Our own fields with no original key (the tower's architecture, the placeholder id, the
    template, ...) go under `llava_extra`, so our original-layout folders load offline.
    """
    lm_type = config.text_config.model_type
    arch, model_type = _original_arch(lm_type)
    text = {k: v for k, v in config.text_config.to_dict().items() if k not in _FILE_KEYS}
    out: dict[str, Any] = {"architectures": [arch], "model_type": model_type, **text, **TRAINING_DEFAULTS}
    out.update(config.extra)
    out.update({
        "mm_vision_tower": config.vision_tower_name,
        "mm_projector_type": config.projector_type,
        "mm_hidden_size": config.vision_hidden_size,
        "mm_vision_select_layer": config.vision_feature_layer,
        "mm_vision_select_feature": config.vision_feature_select,
        "mm_patch_merge_type": config.mm_patch_merge_type,
        "image_aspect_ratio": config.image_aspect_ratio,
        "tokenizer_model_max_length": config.tokenizer_model_max_length,
    })
    if config.image_grid_pinpoints is not None:
        out["image_grid_pinpoints"] = [list(p) for p in config.image_grid_pinpoints]
    if dtype is not None:
        out["torch_dtype"] = str(dtype).removeprefix("torch.")
    out[EXTRA_KEY] = {
        "text_model_type": lm_type,
        "vision_config": config.vision_config.to_dict(),
        "image_token_index": config.image_token_index,
        "template": config.template,
        "anyres_rounding": config.anyres_rounding,
        "image_mean": config.image_mean,
        "image_std": config.image_std,
    }
    return out


# Original keys that become LlavaConfig fields; the other LLaVA keys are kept in `extra`.
_CONSUMED = {"mm_vision_tower", "vision_tower", "mm_projector_type", "mm_hidden_size", "mm_vision_select_layer",
             "mm_vision_select_feature", "mm_patch_merge_type", "image_aspect_ratio", "image_grid_pinpoints",
             "tokenizer_model_max_length", EXTRA_KEY}


def from_original_config(cfg: dict[str, Any], vision_tower: str | None = None,
                         state: keys.StateDict | None = None) -> LlavaConfig:
    """LlavaConfig from an original config.json dict.

    `vision_tower` overrides where the tower's architecture comes from; `state` (our names)
    lets it be inferred from stored tower weights as a last resort. Absent keys take the
    original code's defaults: merge `flat`, aspect `square` (its training default), and
    `mm_use_im_patch_token` True (its loader's default, which adds a token).
    """
    if not is_original_config(cfg):
        raise CheckpointError("not an original LLaVA config (no mm_* keys, no llava model_type or architecture)")
    extra_ours = dict(cfg.get(EXTRA_KEY) or {})
    lm_type = _lm_model_type(cfg)
    text = {k: v for k, v in cfg.items()
            if k not in _FILE_KEYS and k not in _LLAVA_KEYS and not k.startswith("mm_")}
    text_config = AutoConfig.for_model(lm_type, **text)
    vision_config = resolve_vision_config(cfg, vision_tower, state)
    mm_hidden = cfg.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != vision_config.hidden_size:
        raise CheckpointMismatch(f"the config's mm_hidden_size is {mm_hidden} but the vision tower "
                         f"({_tower_name(cfg, vision_tower)}) has hidden size {vision_config.hidden_size}; "
                         f"is it the right tower? {TOWER_HELP}")
    aspect = cfg.get("image_aspect_ratio") or "square"
    pinpoints = cfg.get("image_grid_pinpoints")
    if pinpoints is not None:
        pinpoints = parse_pinpoints(pinpoints, vision_config.image_size)
    kept = {k: v for k, v in cfg.items() if (k in _LLAVA_KEYS or k.startswith("mm_")) and k not in _CONSUMED}
    kept.setdefault("mm_use_im_patch_token", True)
    kept.setdefault("mm_use_im_start_end", False)
    data: dict[str, Any] = dict(
        text_config=text_config, vision_config=vision_config,
        projector_type=cfg.get("mm_projector_type") or "linear",
        vision_feature_layer=int(cfg.get("mm_vision_select_layer", -1)),
        vision_feature_select=cfg.get("mm_vision_select_feature") or "patch",
        image_aspect_ratio=aspect, image_grid_pinpoints=pinpoints,
        mm_patch_merge_type=cfg.get("mm_patch_merge_type") or "flat",
        image_token_index=-200, vision_tower_name=_tower_name(cfg, None),
        tokenizer_model_max_length=cfg.get("tokenizer_model_max_length"), extra=kept,
    )
    for name in ("image_token_index", "template", "anyres_rounding", "image_mean", "image_std"):
        if extra_ours.get(name) is not None:
            data[name] = extra_ours[name]
    return LlavaConfig.from_dict(data)


def _tower_name(cfg: dict[str, Any], override: str | None) -> str | None:
    return override or cfg.get("mm_vision_tower") or cfg.get("vision_tower")


def resolve_vision_config(cfg: dict[str, Any], override: str | None = None,
                          state: keys.StateDict | None = None) -> PretrainedConfig:
    """The tower's architecture, first found of: the `override` folder/name, our own embedded
    copy, a local `mm_vision_tower` folder, a known hub name, the hub, the stored tower weights."""
    if override:
        return tower_config(override)
    embedded = (cfg.get(EXTRA_KEY) or {}).get("vision_config")
    if embedded:
        return _as_vision_config(embedded)
    name = _tower_name(cfg, None)
    if name and os.path.isdir(name):
        return tower_config(name)
    if name in KNOWN_TOWERS:
        return _as_vision_config(KNOWN_TOWERS[name])
    hub_error = ""
    if name:
        try:
            return tower_config(name)
        except FileNotFoundError as err:
            hub_error = str(err)
    inferred = vision_config_from_weights(state or {})
    if inferred is not None:
        warnings.warn(f"vision tower {name!r} not found; its architecture was inferred from the checkpoint's "
                      "tower weights (assuming 64-wide attention heads and quick_gelu, as OpenAI CLIP). "
                      + TOWER_HELP, UserWarning, stacklevel=2)
        return inferred
    where = f"names vision tower {name!r}, which is not a local folder, not a known tower, and not on the hub" \
        if name else "names no vision tower (mm_vision_tower)"
    raise CheckpointNotFound(f"cannot build the vision tower: the checkpoint config {where}, and the checkpoint holds "
                            f"no tower weights. {TOWER_HELP}" + (f" (hub lookup: {hub_error})" if hub_error else ""))


def tower_config(name_or_path: str) -> PretrainedConfig:
    """A tower's config by folder or hub name. A local folder's config.json is checked first, so a
    corrupt one is named (transformers reports it as an unnamed JSON error); a hub name is looked
    up without transformers' ~25 s of retries when there is no network."""
    if os.path.isdir(name_or_path):
        read_config(name_or_path)
        return vision_config_from_pretrained(name_or_path)
    if looks_like_hub_id(name_or_path):
        return tower_config(os.path.dirname(hub_snapshot(name_or_path, "config.json")))
    raise CheckpointNotFound(f"vision tower {name_or_path!r} is neither a local folder nor a hub name")


def _as_vision_config(data: dict[str, Any]) -> PretrainedConfig:
    data = dict(data)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def vision_config_from_weights(state: keys.StateDict) -> PretrainedConfig | None:
    """A CLIP vision config read off stored tower weights (None if there are none or they are not CLIP).

    Head count and activation are not recorded in weights; OpenAI CLIP's (64-wide heads,
    quick_gelu) are assumed, which holds for every CLIP tower LLaVA released.
    """
    tower = {re.sub(r"^vision_tower\.(vision_model\.)?", "", k): v for k, v in state.items()
             if k.startswith("vision_tower.")}
    patch = tower.get("embeddings.patch_embedding.weight")
    pos = tower.get("embeddings.position_embedding.weight")
    fc1 = tower.get("encoder.layers.0.mlp.fc1.weight")
    if patch is None or pos is None or fc1 is None or "embeddings.class_embedding" not in tower:
        return None
    hidden, channels, patch_size = int(patch.shape[0]), int(patch.shape[1]), int(patch.shape[2])
    side = math.isqrt(int(pos.shape[0]) - 1)
    if hidden % 64 or side * side != int(pos.shape[0]) - 1:
        return None
    layers = 1 + max(int(m.group(1)) for k in tower if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    return AutoConfig.for_model("clip_vision_model", hidden_size=hidden, intermediate_size=int(fc1.shape[0]),
                                num_hidden_layers=layers, num_attention_heads=hidden // 64, num_channels=channels,
                                image_size=side * patch_size, patch_size=patch_size, hidden_act="quick_gelu")


# Files ------------------------------------------------------------------------------------------
def save_original(state: keys.StateDict, config: LlavaConfig, path: str | os.PathLike,
                  max_shard_bytes: int = 5 * 2**30, safe_serialization: bool = True) -> None:
    """Write config.json + weights (safetensors, or torch .bin as v1.5 shipped; sharded with an index)."""
    os.makedirs(path, exist_ok=True)
    dtype = next((v.dtype for k, v in state.items() if k.startswith("language_model.") and v.is_floating_point()), None)
    cfg = to_original_config(config, dtype=dtype)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    write_weights(keys.to_original(state), path, max_shard_bytes=max_shard_bytes,
                  safe_serialization=safe_serialization)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A folder's config.json; missing, empty or invalid ones raise errors naming the file."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointNotFound(f"no config.json in {path}")
    return read_json_object(config_path, "a model config")


def read_original(path: str | os.PathLike, vision_tower: str | None = None) -> tuple[LlavaConfig, keys.StateDict]:
    """Config and weights (our names) of a full original-layout folder; tower weights may be absent."""
    cfg = read_config(path)
    state = keys.from_original(read_state_dict(path))
    return from_original_config(cfg, vision_tower, state), state
