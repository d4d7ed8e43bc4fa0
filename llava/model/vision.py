"""Vision towers: CLIP or SigLIP vision models from transformers, and feature selection.

LLaVA reads one hidden layer of the tower (the penultimate, usually), so transformers' forward
with `output_hidden_states=True` runs layers whose output nobody reads and keeps every layer's
states. Without gradients, `select_features` runs a lean forward of its own instead
(`lean_hidden_state`): the tower's own embeddings, norms and activations, its linear weights
through `llava.model.onednn.linear` (oneDNN, about twice MKL's speed on CPUs; `F.linear`
elsewhere) and SDPA, stopping at the layer LLaVA reads. Towers it does not know (LoRA or
quantized linears, dropout in training mode) keep transformers' forward.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from llava.model import onednn

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


def resize_tower_input(tower: PreTrainedModel, image_size: int) -> None:
    """Make `tower` take `image_size`-px pictures, to fine-tune it at another resolution (a model
    trained at a low one goes on at a higher one, as the later stages of other VLM recipes do).

    The patch grid's position embeddings are resampled bicubically to the new grid (CLIP's class
    position is kept as it is); the patch weights are unchanged, so each patch still covers
    `patch_size` pixels and a picture gives more patches. The tower's config says the new size.
    """
    body, config = _body(tower), tower.config
    patch = config.patch_size
    if image_size % patch:
        raise ValueError(f"image size {image_size} is not a multiple of the tower's patch size {patch}")
    old = body.embeddings
    weight = old.position_embedding.weight.detach()
    extra = weight.shape[0] - old.num_patches  # CLIP's class position; SigLIP has none
    grid, new_grid = config.image_size // patch, image_size // patch
    patches = weight[extra:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    config.image_size = image_size
    new = type(old)(config).to(device=weight.device, dtype=weight.dtype)
    state = {k: v for k, v in old.state_dict().items() if not k.startswith("position_embedding")}
    new.load_state_dict({**state, "position_embedding.weight": torch.cat(
        (weight[:extra], patches.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1).to(weight.dtype)))})
    new.train(old.training)
    body.embeddings = new


def looks_like_local_tower(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


def select_features(tower: PreTrainedModel, pixel_values: torch.Tensor, layer: int, select: str) -> torch.Tensor:
    """Hidden states of one tower layer, CLS dropped for `patch`.

    `layer` indexes `hidden_states` (embeddings first), so -2 is the output of the penultimate
    encoder layer, as the original uses; the final layer norm is never applied.
    """
    pixel_values = pixel_values.to(tower.dtype)
    if lean_forward_fits(tower):
        features = lean_hidden_state(tower, pixel_values, layer)
    else:
        features = tower(pixel_values, output_hidden_states=True).hidden_states[layer]
    if select == "patch" and tower.config.model_type == "clip_vision_model":
        features = features[:, 1:]  # SigLIP has no CLS token
    return features


def _body(tower: nn.Module) -> nn.Module:
    """The module holding embeddings and encoder (transformers 5.0 nests it in `vision_model`)."""
    return getattr(tower, "vision_model", tower)


def lean_forward_fits(tower: nn.Module) -> bool:
    """Whether `lean_hidden_state` computes what the tower's own forward does, here and now."""
    if torch.is_grad_enabled() or getattr(tower.config, "model_type", None) not in VISION_MODEL_TYPES:
        return False
    body = _body(tower)
    if not hasattr(body, "embeddings") or not hasattr(body, "encoder"):
        return False
    if tower.training and getattr(tower.config, "attention_dropout", 0.0):
        return False
    return all(type(m) is nn.Linear for layer in body.encoder.layers
               for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                         layer.self_attn.out_proj, layer.mlp.fc1, layer.mlp.fc2))


def lean_hidden_state(tower: nn.Module, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
    """`tower(pixel_values, output_hidden_states=True).hidden_states[layer]`, running only the
    encoder layers before it (`hidden_states[0]` is the embeddings' output, after CLIP's pre-norm)."""
    body = _body(tower)
    layers = body.encoder.layers
    n_layers = range(len(layers) + 1)[layer]  # IndexError for a layer the tower does not have, as the tuple
    hidden = body.embeddings(pixel_values)
    if hasattr(body, "pre_layrnorm"):  # CLIP; SigLIP has none
        hidden = body.pre_layrnorm(hidden)
    for encoder_layer in layers[:n_layers]:
        hidden = hidden + _attention(encoder_layer.self_attn, encoder_layer.layer_norm1(hidden))
        mlp = encoder_layer.mlp
        inner = mlp.activation_fn(onednn.linear(encoder_layer.layer_norm2(hidden), mlp.fc1.weight, mlp.fc1.bias))
        hidden = hidden + onednn.linear(inner, mlp.fc2.weight, mlp.fc2.bias)
    return hidden


def _attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    batch, length, width = x.shape
    heads = (batch, length, attn.num_heads, width // attn.num_heads)
    q, k, v = (onednn.linear(x, p.weight, p.bias).view(heads).transpose(1, 2)
               for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    return onednn.linear(out.transpose(1, 2).reshape(batch, length, width), attn.out_proj.weight, attn.out_proj.bias)
