"""The transformers `llava-hf` layout: LlavaForConditionalGeneration / LlavaNextForConditionalGeneration.

Reading accepts both the published file names and transformers 5's own; writing always uses
the published names (`language_model.model.*`, `vision_tower.vision_model.*`,
`multi_modal_projector.linear_{1,2}.*`), which transformers, vLLM and SGLang all load.
`save_hf_processor` adds what their processors need beside the weights: `processor_config.json`
(patch size, feature strategy, image token, image processor) and the conversation template
as `chat_template.jinja`, so `AutoProcessor.from_pretrained` + `apply_chat_template` build the
prompts and image placeholders our pipeline builds.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import TYPE_CHECKING, Any

from llava.checkpoint import keys
from llava.checkpoint.io import write_safetensors
from llava.checkpoint.stored import read_state_dict
from llava.checkpoint.tokenizer import IMAGE_TOKEN, complete_tokenizer_files, token_id
from llava.config import LlavaConfig
from llava.errors import CheckpointError
from llava.processing.templates import get_template, template_for_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, ProcessorMixin

    from llava.processing.image import ImageProcessor

HF_ARCHITECTURES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}
HF_PROCESSORS = {"llava": "LlavaProcessor", "llava_next": "LlavaNextProcessor"}
# Keys of ours that llava-hf has no field for; kept in config.json under this name for round trips.
EXTRA_KEY = "llava_extra"


def is_hf_config(cfg: dict[str, Any]) -> bool:
    return "text_config" in cfg and cfg.get("model_type") in HF_ARCHITECTURES


def hf_model_type(config: LlavaConfig) -> str:
    return "llava_next" if config.image_aspect_ratio == "anyres" else "llava"


def hf_feature_strategy(config: LlavaConfig) -> str:
    """transformers' vision_feature_select_strategy for our feature choice.

    "default" drops the first feature row, which is CLIP's CLS; SigLIP has no CLS, so all its
    rows ("full") are what our `patch` (and `cls_patch`) select.
    """
    if config.vision_family == "siglip" or config.vision_feature_select == "cls_patch":
        return "full"
    return "default"


def hf_processor_kwargs(config: LlavaConfig) -> dict[str, Any]:
    """Llava(Next)Processor arguments that make its image-token count equal the model's."""
    return {
        "patch_size": config.vision_config.patch_size,
        "vision_feature_select_strategy": hf_feature_strategy(config),
        "num_additional_image_tokens": 0 if config.vision_family == "siglip" else 1,  # CLIP's CLS
        "image_token": IMAGE_TOKEN,
    }


def template_name(config: LlavaConfig, path: str | os.PathLike) -> str:
    """The template a saved folder is used with: the config's, else the one its name implies
    (`<parent>_<checkpoint-N>` for trainer checkpoints, as the loader names them)."""
    if config.template:
        return config.template
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    name = f"{parts[-2]}_{parts[-1]}" if parts[-1].startswith("checkpoint-") and len(parts) > 1 else parts[-1]
    return template_for_model(name)


def to_hf_config(config: LlavaConfig) -> dict[str, Any]:
    """A config.json that transformers' Llava(Next)Config accepts for the same model."""
    if config.projector_type != "mlp2x_gelu":
        keys.to_hf({}, config.projector_type)  # raises the explanatory error
    model_type = hf_model_type(config)
    if model_type == "llava_next" and config.mm_patch_merge_type != "spatial_unpad":
        raise CheckpointError("llava-hf NeXT always uses spatial_unpad with image_newline; this model has "
                              f"mm_patch_merge_type={config.mm_patch_merge_type!r}: save with layout='original'")
    if model_type == "llava" and config.mm_patch_merge_type != "flat":
        raise CheckpointError(f"llava-hf Llava has no mm_patch_merge_type={config.mm_patch_merge_type!r}; "
                              "save with layout='original'")
    out: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "text_config": config.text_config.to_dict(),
        "vision_config": config.vision_config.to_dict(),
        "image_token_index": config.image_token_index,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": config.vision_feature_layer,
        "vision_feature_select_strategy": hf_feature_strategy(config),
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
        raise CheckpointError(f"not a llava-hf config (model_type {model_type!r}; "
                              f"expected one of {sorted(HF_ARCHITECTURES)})")
    strategy = cfg.get("vision_feature_select_strategy", "default")
    layer = cfg.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise CheckpointError(f"vision_feature_layer lists {layer!r}: several feature layers are not supported")
    if cfg.get("projector_hidden_act", "gelu") != "gelu" or not cfg.get("multimodal_projector_bias", True):
        raise CheckpointError("only the gelu projector with biases (LLaVA's mlp2x_gelu) is supported")
    text = dict(cfg["text_config"])
    text.setdefault("model_type", "llama")
    vision = dict(cfg.get("vision_config") or {})
    vision.setdefault("model_type", "clip_vision_model")
    siglip = "siglip" in vision["model_type"]
    # Our own exports (they carry EXTRA_KEY) once wrote "default" for SigLIP meaning all rows; read them so.
    if siglip and strategy == "default" and EXTRA_KEY not in cfg:
        raise CheckpointError("vision_feature_select_strategy 'default' with a SigLIP tower drops a real patch "
                              "(SigLIP has no CLS token); only 'full' is supported for SigLIP")
    data: dict[str, Any] = dict(
        text_config=text, vision_config=vision, projector_type="mlp2x_gelu", vision_feature_layer=layer,
        vision_feature_select="patch" if strategy == "default" or siglip else "cls_patch",
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
    """Write config.json + model(-0000x-of-0000y).safetensors in the published llava-hf layout.

    The template is pinned in config.json (see `template_name`), so renaming the folder later
    changes neither our choice nor the `chat_template.jinja` that `save_hf_processor` writes.
    """
    os.makedirs(path, exist_ok=True)
    cfg = to_hf_config(config)
    cfg[EXTRA_KEY]["template"] = template_name(config, path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    write_safetensors(keys.to_hf(state, config.projector_type), path, max_shard_bytes=max_shard_bytes)


def read_hf(path: str | os.PathLike) -> tuple[LlavaConfig, keys.StateDict]:
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    return from_hf_config(cfg), keys.from_hf(read_state_dict(path))


def build_hf_processor(config: LlavaConfig, tokenizer: PreTrainedTokenizerBase,
                       preprocessor_config: dict[str, Any], chat_template: str | None = None) -> ProcessorMixin:
    """transformers' own Llava(Next)Processor for this model, built offline from our parts.

    The image processor is read back from `preprocessor_config` the way `AutoImageProcessor`
    reads a folder, so it is the class (and backend) transformers users will get.
    """
    import transformers
    from transformers import AutoImageProcessor

    if token_id(tokenizer, IMAGE_TOKEN) != config.image_token_index:
        raise CheckpointError(f"the tokenizer's {IMAGE_TOKEN} id ({token_id(tokenizer, IMAGE_TOKEN)}) is not the "
                              f"model's image_token_index ({config.image_token_index}); save through "
                              "save_checkpoint(layout='hf'), which adds the token")
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
            json.dump(preprocessor_config, f)
        image_processor = AutoImageProcessor.from_pretrained(tmp)
    processor_class = getattr(transformers, HF_PROCESSORS[hf_model_type(config)])
    return processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                           **hf_processor_kwargs(config))


def save_hf_processor(path: str | os.PathLike, config: LlavaConfig, tokenizer: PreTrainedTokenizerBase,
                      image_processor: ImageProcessor) -> None:
    """Write the tokenizer, processor_config.json, chat_template.jinja and preprocessor_config.json.

    Run after `save_hf`: the processor's own `save_pretrained` writes the files, so they have the
    form the installed transformers reads (v5 nests the image processor in processor_config.json
    and prefers it there); preprocessor_config.json keeps the same settings for older readers
    and our loader. The chat template renders our template (`Template.chat_template`).
    """
    path = str(path)
    with open(os.path.join(path, "config.json")) as f:
        name = (json.load(f).get(EXTRA_KEY) or {}).get("template") or template_name(config, path)
    preprocessor_config = image_processor.to_preprocessor_config()
    processor = build_hf_processor(config, tokenizer, preprocessor_config, get_template(name).chat_template())
    processor.save_pretrained(path)
    complete_tokenizer_files(tokenizer, path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor_config, f, indent=2)
