"""Turning (config, state dict) into a ready LlavaModel without a random-init pass.

A model is first built on the meta device (free) to check every name and shape against the
checkpoint, so a wrong file fails before memory is spent. The language model and tower are
then made by transformers' public `from_pretrained(None, config=..., state_dict=...)`, which
skips weight initialisation and shares the loaded tensors when dtypes agree: a 7B model
loads without the 28 GB fp32 detour and the minutes of random init a plain build costs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING, PretrainedConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from llava.checkpoint import keys
from llava.checkpoint.io import CheckpointMismatch, check_state, tied_targets
from llava.config import LlavaConfig
from llava.model.llava import LlavaModel
from llava.model.vision import load_vision_tower
from llava.processing.image import CLIP_MEAN, CLIP_STD, ImageProcessor

SIGLIP_MEAN_STD = (0.5, 0.5, 0.5)


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """cuda if available, else mps, else cpu (an explicit choice always wins)."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, dtype: torch.dtype | str | None = None) -> torch.dtype:
    """float32 on CPU (fp16 matmuls are unsupported or slow there), bf16 on CUDA when it has it, fp16 on MPS."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    if dtype is not None:
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide transformers' per-part progress bars; names and shapes were already checked."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _sub(state: keys.StateDict, prefix: str) -> keys.StateDict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _from_state(model_class: type[PreTrainedModel], config: PretrainedConfig, state: keys.StateDict,
                dtype: torch.dtype) -> PreTrainedModel:
    with _quiet_loading():
        return model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype)


def expected_shapes(config: LlavaConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Every weight name and shape of the model a config builds, plus its tied names (meta device: no memory)."""
    with torch.device("meta"):
        meta = LlavaModel(config)
    return {k: tuple(v.shape) for k, v in meta.state_dict().items()}, tied_targets(meta)


def build_model(config: LlavaConfig, state: keys.StateDict, dtype: torch.dtype = torch.float32,
                tower_source: str | None = None) -> LlavaModel:
    """A LlavaModel holding exactly `state` (our names), in `dtype`, on the CPU.

    When `state` has no tower weights (released v1.5), the tower is loaded from
    `tower_source` (a local folder or hub name).
    """
    expected, tied = expected_shapes(config)
    tower_keys = [k[len("vision_tower."):] for k in expected if k.startswith("vision_tower.")]
    state = keys.match_tower_prefix(state, tower_keys)
    has_tower = any(k.startswith("vision_tower.") for k in state)
    check_state(expected, state, allow_missing=() if has_tower else ("vision_tower.",), tied=tied)

    lm = _from_state(MODEL_FOR_CAUSAL_LM_MAPPING[type(config.text_config)], config.text_config,
                     _sub(state, "language_model."), dtype)
    if has_tower:
        tower = _from_state(MODEL_MAPPING[type(config.vision_config)], config.vision_config,
                            _sub(state, "vision_tower."), dtype)
    else:
        tower = _load_tower(tower_source, dtype, {k: v for k, v in expected.items() if k.startswith("vision_tower.")})
    model = LlavaModel(config, language_model=lm, vision_tower=tower)
    rest = {k: v for k, v in state.items() if not k.startswith(("language_model.", "vision_tower."))}
    model.load_state_dict(rest, strict=False)  # projector, image_newline: already checked complete
    model.config.text_config = lm.config  # one config object, so later vocab resizes stay in sync
    return model.to(dtype)


def _load_tower(source: str | None, dtype: torch.dtype, expected: dict[str, tuple[int, ...]]) -> PreTrainedModel:
    from llava.checkpoint.original import TOWER_HELP

    if not source:
        raise FileNotFoundError(f"the checkpoint holds no vision tower weights and names no tower to load them from. "
                                f"{TOWER_HELP}")
    with _quiet_loading():
        tower = load_vision_tower(source, dtype=dtype)
    found = {"vision_tower." + k: v for k, v in tower.state_dict().items()}
    try:
        check_state(expected, found)
    except CheckpointMismatch as err:
        raise CheckpointMismatch(f"vision tower {source!r} does not fit this checkpoint: {err}. {TOWER_HELP}") from None
    return tower


def resize_vocab(model: LlavaModel, size: int) -> None:
    """Grow the LM's embedding (and unshared output) rows to `size`; new rows = mean of old rows.

    Mean rows, as the original does for its added tokens, keep the new tokens' logits
    ordinary instead of random.
    """
    lm = model.language_model
    old = lm.get_input_embeddings().weight.shape[0]
    if size <= old:
        return
    lm.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        emb = lm.get_input_embeddings().weight
        emb[old:] = emb[:old].mean(0)
        out = lm.get_output_embeddings()
        if out is not None and out.weight is not emb:
            out.weight[old:] = out.weight[:old].mean(0)
    model.config.text_config = lm.config


def image_processor_for(config: LlavaConfig, folder: str | os.PathLike | None = None) -> ImageProcessor:
    """The folder's preprocessor_config.json if any, else the tower family's defaults; the
    model config's aspect mode, pinpoints and mean/std always win (they are what it was trained with)."""
    overrides: dict = {"aspect": config.image_aspect_ratio,
                       "pinpoints": config.image_grid_pinpoints if config.image_aspect_ratio == "anyres" else None}
    if config.image_mean is not None:
        overrides["mean"] = config.image_mean
    if config.image_std is not None:
        overrides["std"] = config.image_std
    if folder is not None and os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
        return ImageProcessor.from_pretrained(folder, **overrides)
    siglip = config.vision_family == "siglip"
    defaults = dict(crop_size=config.image_size, resize_mode="square" if siglip else "shortest_edge",
                    mean=SIGLIP_MEAN_STD if siglip else CLIP_MEAN, std=SIGLIP_MEAN_STD if siglip else CLIP_STD)
    defaults.update(overrides)
    return ImageProcessor(**defaults)
