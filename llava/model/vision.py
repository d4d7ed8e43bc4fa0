"""Vision towers: CLIP or SigLIP vision models from transformers, and feature selection."""

from __future__ import annotations

import os

import torch
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

VISION_MODEL_TYPES = ("clip_vision_model", "siglip_vision_model")


def build_vision_tower(vision_config: PretrainedConfig) -> PreTrainedModel:
    """A randomly initialised tower of the given config (weights come from a checkpoint)."""
    if vision_config.model_type not in VISION_MODEL_TYPES:
        raise ValueError(f"unsupported vision tower type {vision_config.model_type!r}; valid: {', '.join(VISION_MODEL_TYPES)}")
    return AutoModel.from_config(vision_config)


def vision_config_from_pretrained(name_or_path: str) -> PretrainedConfig:
    """The vision part of a CLIP/SigLIP config found locally or on the hub."""
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"vision tower {name_or_path!r} could not be found (not a local folder, and not loadable from the hub: {err}). "
            "Pass a local copy of the tower with --vision-tower PATH (Python: vision_tower=PATH), e.g. a folder holding "
            "openai/clip-vit-large-patch14-336's config.json and weights."
        ) from None
    return getattr(config, "vision_config", config)


def load_vision_tower(name_or_path: str, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load pretrained tower weights by hub name or local path (a full CLIP/SigLIP checkpoint also works)."""
    config = vision_config_from_pretrained(name_or_path)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return _tower_class(config).from_pretrained(name_or_path, config=config, **kwargs)


def _tower_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    from transformers import CLIPVisionModel, SiglipVisionModel

    if config.model_type == "clip_vision_model":
        return CLIPVisionModel
    if config.model_type == "siglip_vision_model":
        return SiglipVisionModel
    raise ValueError(f"unsupported vision tower type {config.model_type!r}; valid: {', '.join(VISION_MODEL_TYPES)}")


def looks_like_local_tower(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


def select_features(tower: PreTrainedModel, pixel_values: torch.Tensor, layer: int, select: str) -> torch.Tensor:
    """Hidden states of one tower layer, CLS dropped for `patch`.

    `layer` indexes `hidden_states` (embeddings first), so -2 is the output of the penultimate
    encoder layer, as the original uses; the final layer norm is never applied.
    """
    out = tower(pixel_values.to(tower.dtype), output_hidden_states=True)
    features = out.hidden_states[layer]
    if select == "patch" and tower.config.model_type == "clip_vision_model":
        features = features[:, 1:]  # SigLIP has no CLS token
    return features
