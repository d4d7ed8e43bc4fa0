"""LLaVA configuration: one dataclass, plus named presets.

A LLaVA model is three parts glued at one point: a vision tower, a projector and a causal
language model. The vision and text parts keep their own transformers configs (so any
transformers causal LM or CLIP/SigLIP tower can be plugged in); the fields here are the
LLaVA-specific glue, named after the original's config keys where one exists.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # transformers is imported where a sub-config is built, so the CLI's parser loads fast
    from transformers import PretrainedConfig

PROJECTOR_TYPES = ("linear", "identity", "mlp{N}x_gelu")
FEATURE_SELECTS = ("patch", "cls_patch")
ASPECT_RATIOS = ("pad", "square", "anyres")
MERGE_TYPES = ("flat", "spatial", "spatial_unpad")

# LLaVA-1.6 grid pinpoints, (width, height) as the original writes them.
V16_PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]


def _as_config(value: PretrainedConfig | dict) -> PretrainedConfig:
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(value, PretrainedConfig):
        return value
    value = dict(value)
    model_type = value.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"sub-config needs a 'model_type' key, got keys {sorted(value)}")
    return AutoConfig.for_model(model_type, **value)


def validate_projector_type(name: str) -> str:
    if name in ("linear", "identity") or re.fullmatch(r"mlp(\d+)x_gelu", name):
        return name
    raise ValueError(f"unknown projector type {name!r}; valid: linear, identity, mlp<N>x_gelu (e.g. mlp2x_gelu)")


def _check_choice(what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


@dataclass
class LlavaConfig:
    """Everything needed to build a LLaVA model (not its weights)."""

    text_config: PretrainedConfig | dict
    vision_config: PretrainedConfig | dict
    projector_type: str = "mlp2x_gelu"  # mm_projector_type
    vision_feature_layer: int = -2  # mm_vision_select_layer: index into the tower's hidden_states
    vision_feature_select: str = "patch"  # mm_vision_select_feature: patch drops CLS, cls_patch keeps it
    image_aspect_ratio: str = "pad"  # pad (v1.5), square, anyres (v1.6)
    image_grid_pinpoints: list[tuple[int, int]] | None = None  # (width, height), anyres only
    mm_patch_merge_type: str = "flat"  # flat (v1.5), spatial, spatial_unpad (v1.6)
    anyres_rounding: str = "original"  # unpad rounding: "original" int(h*s), "hf" int(round(h*s, 7)) as transformers
    image_token_index: int = 32000  # id of the placeholder token that image features replace
    vision_tower_name: str | None = None  # mm_vision_tower: hub name or path of the pretrained tower
    template: str | None = None  # conversation template (conv_mode); None = chosen from the model name
    tokenizer_model_max_length: int | None = None  # context length the model was trained for
    image_mean: tuple[float, float, float] | None = None  # None = the tower family's default
    image_std: tuple[float, float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unrecognised original keys, kept for round trips

    def __post_init__(self) -> None:
        self.text_config = _as_config(self.text_config)
        self.vision_config = _as_config(self.vision_config)
        validate_projector_type(self.projector_type)
        _check_choice("vision feature select", self.vision_feature_select, FEATURE_SELECTS)
        _check_choice("image aspect ratio", self.image_aspect_ratio, ASPECT_RATIOS)
        _check_choice("patch merge type", self.mm_patch_merge_type, MERGE_TYPES)
        if self.image_aspect_ratio == "anyres" and not self.image_grid_pinpoints:
            self.image_grid_pinpoints = list(V16_PINPOINTS)
        if self.image_grid_pinpoints is not None:
            self.image_grid_pinpoints = [tuple(int(v) for v in p) for p in self.image_grid_pinpoints]

    # Derived sizes -----------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def vision_hidden_size(self) -> int:
        return self.vision_config.hidden_size

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size

    @property
    def patches_per_side(self) -> int:
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def tokens_per_crop(self) -> int:
        """Feature rows one square crop turns into (576 for CLIP-L/336 with `patch`)."""
        cls = 1 if self.vision_feature_select == "cls_patch" else 0
        return self.patches_per_side**2 + cls

    @property
    def vision_family(self) -> str:
        return "siglip" if "siglip" in self.vision_config.model_type else "clip"

    @property
    def context_length(self) -> int:
        if self.tokenizer_model_max_length:
            return int(self.tokenizer_model_max_length)
        return int(getattr(self.text_config, "max_position_embeddings", 2048) or 2048)

    # Serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "to_dict"):  # a transformers PretrainedConfig
                value = value.to_dict()
            out[f.name] = copy.deepcopy(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LlavaConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LlavaConfig keys: {unknown}")
        return cls(**data)

    def replace(self, **changes: Any) -> "LlavaConfig":
        data = self.to_dict()
        data.update(changes)
        return LlavaConfig.from_dict(data)


# Presets ------------------------------------------------------------------------------------
CLIP_L_336 = dict(
    model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
    num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
)


def _llama(hidden: int, inter: int, layers: int, heads: int, kv_heads: int | None = None, vocab: int = 32000,
           max_pos: int = 4096, **kw: Any) -> dict[str, Any]:
    return dict(model_type="llama", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads or heads, vocab_size=vocab,
                max_position_embeddings=max_pos, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, tie_word_embeddings=False, **kw)


def _tiny() -> LlavaConfig:
    """A few-thousand-parameter LLaVA for tests: 28-px images, 2x2 patches, 2-layer Llama."""
    return LlavaConfig(
        text_config=_llama(64, 128, 2, 4, 2, vocab=512, max_pos=512),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14,
                           projection_dim=32),
        vision_feature_layer=-2, image_token_index=511, template="vicuna_v1",
    )


def _tiny_anyres() -> LlavaConfig:
    return _tiny().replace(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                           image_grid_pinpoints=[(28, 56), (56, 28), (56, 56), (84, 28), (28, 84)])


def _bench_200m() -> LlavaConfig:
    """~220M parameters: a CLIP ViT-B/16 224-px tower and a 12-layer 768-wide Llama (benchmarks)."""
    return LlavaConfig(
        text_config=_llama(768, 2048, 12, 12, vocab=32064, max_pos=2048),
        vision_config=dict(model_type="clip_vision_model", hidden_size=768, intermediate_size=3072,
                           num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=16,
                           projection_dim=512, hidden_act="quick_gelu"),
        image_token_index=32000, template="vicuna_v1",
    )


def _bench_1b() -> LlavaConfig:
    """~1.2B parameters: bench-200m's tower and a TinyLlama-shaped Llama, 22 x 2048 with 4 KV heads of 32
    (benchmarks: a step where the weights, not per-call costs, set the pace)."""
    return _bench_200m().replace(text_config=_llama(2048, 5632, 22, 32, 4, vocab=32064, max_pos=2048))


def _v15(hidden: int, inter: int, layers: int, heads: int) -> Callable[[], LlavaConfig]:
    return lambda: LlavaConfig(
        text_config=_llama(hidden, inter, layers, heads), vision_config=CLIP_L_336,
        vision_tower_name="openai/clip-vit-large-patch14-336", template="llava_v1",
        image_token_index=-200,
    )


def _v16_vicuna_7b() -> LlavaConfig:
    return _v15(4096, 11008, 32, 32)().replace(
        image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
        image_grid_pinpoints=V16_PINPOINTS, tokenizer_model_max_length=4096)


def _v16_mistral_7b() -> LlavaConfig:
    text = dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768,
                rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, bos_token_id=1, eos_token_id=2)
    return _v16_vicuna_7b().replace(text_config=text, template="mistral_instruct")


PRESETS: dict[str, Callable[[], LlavaConfig]] = {
    "tiny": _tiny,
    "tiny-anyres": _tiny_anyres,
    "bench-200m": _bench_200m,
    "bench-1b": _bench_1b,
    "llava-v1.5-7b": _v15(4096, 11008, 32, 32),
    "llava-v1.5-13b": _v15(5120, 13824, 40, 40),
    "llava-v1.6-vicuna-7b": _v16_vicuna_7b,
    "llava-v1.6-mistral-7b": _v16_mistral_7b,
}


def preset(name: str) -> LlavaConfig:
    """A fresh config for a named preset (architecture only; weights come from a checkpoint)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(sorted(PRESETS))}") from None
