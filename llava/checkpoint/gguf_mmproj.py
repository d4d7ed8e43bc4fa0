"""The `mmproj` GGUF file: the CLIP vision tower + the LLaVA projector, for llama.cpp's mtmd (clip.cpp).

Written as llama.cpp's LLaVA converter (`tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py`,
still its only path for CLIP LLaVA models) lays it out, and as `tools/mtmd/clip.cpp` reads it:

- `general.architecture = "clip"`, `clip.has_vision_encoder`, `clip.has_llava_projector`,
  `clip.projector_type = "mlp"` (mm.0 -> GELU -> mm.2: LLaVA's mlp2x_gelu, the only projector
  clip.cpp's "mlp" graph computes), `clip.use_gelu` (false = quick_gelu, CLIP-L's activation).
- The tower is cut at the feature layer: `hidden_states[k]` (k = n + layer + 1 for LLaVA's -2) is
  the output of the first k blocks, so blocks 0..k-1 are stored, `clip.vision.block_count = k`,
  and `clip.vision.feature_layer = [k]` says to run exactly those. llama.cpp's LLaVA graph runs
  `block_count - 1` blocks when no feature layer is given (the legacy files' convention, one block
  short; llama.cpp issue #25817), so the explicit feature layer is what makes it run k.
  `post_layernorm` is not written: LLaVA's features are taken before it.
- The CLS row is dropped by clip.cpp itself (vision_feature_select "patch").
- LLaVA-1.6 anyres: `clip.vision.image_grid_pinpoints` (flat width,height pairs),
  `clip.vision.mm_patch_merge_type = "spatial_unpad"` and the `v.image_newline` tensor.
Tensor names come from gguf-py's TensorNameMap (MODEL_ARCH.MMPROJ), which also maps CLIP's fc1/fc2
to ffn_up/ffn_down (clip.cpp swaps the legacy files' reversed pair back by shape).
"""

from __future__ import annotations

import re
import warnings

import gguf
import torch

from llava.checkpoint import keys
from llava.config import LlavaConfig
from llava.errors import CheckpointError, InputError

# clip-impl.h keys gguf-py has no constant for
FEATURE_LAYER_KEY = "clip.vision.feature_layer"
GRID_PINPOINTS_KEY = "clip.vision.image_grid_pinpoints"
MERGE_TYPE_KEY = "clip.vision.mm_patch_merge_type"
HAS_TEXT_KEY = "clip.has_text_encoder"  # required by llama.cpp's clip.cpp before its 2025 mtmd rewrite
IMAGE_NEWLINE = "v.image_newline"  # TN_IMAGE_NEWLINE
_LAYOUTS = (("pad", "flat"), ("square", "flat"), ("anyres", "spatial_unpad"))  # (aspect ratio, merge type)
_GELU = {"quick_gelu": False, "gelu": True}  # clip.use_gelu: false runs quick_gelu
_SUFFIXES = (".weight", ".bias")
_LAYER = re.compile(r"\.encoder\.layers\.(\d+)\.")


def check_vision(config: LlavaConfig) -> None:
    """Refuse, before anything is written, what clip.cpp's LLaVA graph would compute differently."""
    problems = []
    if config.vision_family != "clip":
        problems.append(f"a {config.vision_config.model_type} tower (llama.cpp's LLaVA graph is written for CLIP)")
    if config.projector_type != "mlp2x_gelu":
        problems.append(f"the {config.projector_type!r} projector (llama.cpp's 'mlp' is mlp2x_gelu only)")
    if config.vision_feature_select != "patch":
        problems.append(f"vision_feature_select {config.vision_feature_select!r} (llama.cpp always drops CLS)")
    if getattr(config.vision_config, "hidden_act", "quick_gelu") not in _GELU:
        problems.append(f"the tower activation {config.vision_config.hidden_act!r} (quick_gelu or gelu only)")
    if (config.image_aspect_ratio, config.mm_patch_merge_type) not in _LAYOUTS:
        problems.append(f"image_aspect_ratio {config.image_aspect_ratio!r} with mm_patch_merge_type "
                        f"{config.mm_patch_merge_type!r} (llama.cpp has pad or square + flat (v1.5) and anyres + "
                        "spatial_unpad (v1.6))")
    if not 1 <= kept_blocks(config) <= config.vision_config.num_hidden_layers:
        problems.append(f"vision_feature_layer {config.vision_feature_layer} (outside the tower)")
    if problems:
        raise InputError("cannot write a llama.cpp mmproj for " + "; ".join(problems))
    if config.image_aspect_ratio == "square":
        warnings.warn("this model resizes and centre-crops images ('square'); llama.cpp pads them to a square "
                      "first, as LLaVA-1.5's 'pad': non-square images will be seen whole, not cropped", stacklevel=3)


def kept_blocks(config: LlavaConfig) -> int:
    """How many tower blocks produce `hidden_states[vision_feature_layer]` (embeddings are index 0)."""
    layer, n = config.vision_feature_layer, config.vision_config.num_hidden_layers
    return n + layer + 1 if layer < 0 else layer


def add_mmproj_metadata(writer: gguf.GGUFWriter, config: LlavaConfig, name: str, file_type: int,
                        mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    vision, blocks = config.vision_config, kept_blocks(config)
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(name)
    writer.add_description("image encoder for LLaVA")
    writer.add_file_type(file_type)
    writer.add_clip_has_vision_encoder(True)
    writer.add_bool(gguf.Keys.Clip.HAS_LLAVA_PROJECTOR, True)
    writer.add_bool(HAS_TEXT_KEY, False)
    writer.add_clip_projector_type(gguf.VISION_PROJECTOR_TYPE_NAMES[gguf.VISION_PROJECTOR_TYPE.MLP])
    writer.add_vision_image_size(vision.image_size)
    writer.add_vision_patch_size(vision.patch_size)
    writer.add_vision_embedding_length(vision.hidden_size)
    writer.add_vision_feed_forward_length(vision.intermediate_size)
    writer.add_vision_projection_dim(config.hidden_size)  # the projector's output: the LM's width
    writer.add_vision_block_count(blocks)
    writer.add_vision_head_count(vision.num_attention_heads)
    writer.add_vision_attention_layernorm_eps(vision.layer_norm_eps)
    writer.add_vision_image_mean(list(mean))
    writer.add_vision_image_std(list(std))
    writer.add_vision_use_gelu(_GELU[getattr(vision, "hidden_act", "quick_gelu")])
    writer.add_array(FEATURE_LAYER_KEY, [blocks])
    writer.add_string(MERGE_TYPE_KEY, config.mm_patch_merge_type)
    if config.image_aspect_ratio == "anyres":
        writer.add_array(GRID_PINPOINTS_KEY, [v for (w, h) in config.image_grid_pinpoints for v in (w, h)])


def mmproj_tensors(state: dict[str, torch.Tensor], config: LlavaConfig) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for the kept tower blocks, the projector and image_newline."""
    blocks = kept_blocks(config)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.MMPROJ, blocks)
    out = []
    for key, value in state.items():
        if key.startswith("vision_tower."):
            hf_key = "vision_tower.vision_model." + key[len("vision_tower."):].removeprefix("vision_model.")
            layer = _LAYER.search(hf_key)
            if (layer and int(layer.group(1)) >= blocks) or ".post_layernorm." in hf_key \
                    or hf_key.endswith(".position_ids"):
                continue  # past the feature layer, or the final norm LLaVA's features skip
            name = names.get_name(hf_key, try_suffixes=_SUFFIXES)
        elif key.startswith("projector."):
            index, rest = key[len("projector."):].split(".", 1)
            name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ].format(bid=int(index)) + "." + rest
        elif key == "image_newline":  # model.image_newline; gguf-py maps it from 0.19 on
            name = names.get_name(next(iter(keys.to_original({key: value})))) or IMAGE_NEWLINE
        else:
            continue  # the language model
        if name is None:
            raise CheckpointError(f"no llama.cpp (GGUF) name for the vision weight {key!r}")
        out.append((name, value))
    return out
