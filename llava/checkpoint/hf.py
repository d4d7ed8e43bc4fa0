"""The transformers `llava-hf` layout: LlavaForConditionalGeneration / LlavaNextForConditionalGeneration.

Reading accepts both the published file names and transformers 5's own; writing always uses
the published names (`language_model.model.*`, `vision_tower.vision_model.*`,
`multi_modal_projector.linear_{1,2}.*`), which transformers, vLLM and SGLang all load.
"""

from __future__ import annotations

import json
import os
from typing import Any

from llava.checkpoint import keys
from llava.checkpoint.io import read_state_dict, write_safetensors
from llava.config import LlavaConfig

HF_ARCHITECTURES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}
# Keys of ours that llava-hf has no field for; kept in config.json under this name for round trips.
EXTRA_KEY = "llava_extra"


def is_hf_config(cfg: dict[str, Any]) -> bool:
    return "text_config" in cfg and cfg.get("model_type") in HF_ARCHITECTURES


def hf_model_type(config: LlavaConfig) -> str:
    return "llava_next" if config.image_aspect_ratio == "anyres" else "llava"


def to_hf_config(config: LlavaConfig) -> dict[str, Any]:
    """A config.json that transformers' Llava(Next)Config accepts for the same model."""
    if config.projector_type != "mlp2x_gelu":
        keys.to_hf({}, config.projector_type)  # raises the explanatory error
    model_type = hf_model_type(config)
    if model_type == "llava_next" and config.mm_patch_merge_type != "spatial_unpad":
        raise ValueError("llava-hf NeXT always uses spatial_unpad with image_newline; "
                         f"this model has mm_patch_merge_type={config.mm_patch_merge_type!r}: save with layout='original'")
    if model_type == "llava" and config.mm_patch_merge_type != "flat":
        raise ValueError(f"llava-hf Llava has no mm_patch_merge_type={config.mm_patch_merge_type!r}; save with layout='original'")
    out: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "text_config": config.text_config.to_dict(),
        "vision_config": config.vision_config.to_dict(),
        "image_token_index": config.image_token_index,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": "default" if config.vision_feature_select == "patch" else "full",
        "image_seq_length": config.tokens_per_crop,
        "tie_word_embeddings": bool(getattr(config.text_config, "tie_word_embeddings", False)),
    }
    if model_type == "llava_next":
        out["image_grid_pinpoints"] = [[h, w] for (w, h) in config.image_grid_pinpoints]  # llava-hf: (height, width)
    out[EXTRA_KEY] = {
        "vision_tower_name": config.vision_tower_name,
        "template": config.template,
        "tokenizer_model_max_length": config.tokenizer_model_max_length,
        "image_aspect_ratio": config.image_aspect_ratio,
        "anyres_rounding": config.anyres_rounding,
        "image_mean": config.image_mean,
        "image_std": config.image_std,
    }
    return out


def from_hf_config(cfg: dict[str, Any]) -> LlavaConfig:
    model_type = cfg.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise ValueError(f"not a llava-hf config (model_type {model_type!r}; expected one of {sorted(HF_ARCHITECTURES)})")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    layer = cfg.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer lists {layer!r}: several feature layers are not supported")
    if cfg.get("projector_hidden_act", "gelu") != "gelu" or not cfg.get("multimodal_projector_bias", True):
        raise ValueError("only the gelu projector with biases (LLaVA's mlp2x_gelu) is supported")
    text = dict(cfg["text_config"])
    text.setdefault("model_type", "llama")
    vision = dict(cfg.get("vision_config") or {})
    vision.setdefault("model_type", "clip_vision_model")
    data: dict[str, Any] = dict(
        text_config=text, vision_config=vision, projector_type="mlp2x_gelu", vision_feature_layer=layer,
        vision_feature_select="patch" if strategy == "default" else "cls_patch",
        image_token_index=cfg.get("image_token_index", cfg.get("image_token_id", 32000)),
    )
    if model_type == "llava_next":
        pins = cfg.get("image_grid_pinpoints") or [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        data.update(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                    image_grid_pinpoints=[(w, h) for (h, w) in pins], anyres_rounding="hf")
    extra = {k: v for k, v in (cfg.get(EXTRA_KEY) or {}).items() if v is not None}
    data.update(extra)
    return LlavaConfig.from_dict(data)


def save_hf(state: keys.StateDict, config: LlavaConfig, path: str | os.PathLike,
            max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json + model(-0000x-of-0000y).safetensors in the published llava-hf layout."""
    os.makedirs(path, exist_ok=True)
    cfg = to_hf_config(config)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    write_safetensors(keys.to_hf(state, config.projector_type), path, max_shard_bytes=max_shard_bytes)


def read_hf(path: str | os.PathLike) -> tuple[LlavaConfig, keys.StateDict]:
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    return from_hf_config(cfg), keys.from_hf(read_state_dict(path))
