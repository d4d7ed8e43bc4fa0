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
from llava.checkpoint.io import check_state, read_json_object, read_weight_headers, tied_targets
from llava.checkpoint.paths import hub_snapshot, looks_like_hub_id
from llava.config import LlavaConfig
from llava.errors import CheckpointError, CheckpointMismatch, CheckpointNotFound, LlavaError
from llava.model.llava import LlavaModel
from llava.model.vision import load_vision_tower
from llava.processing.image import CLIP_MEAN, CLIP_STD, ImageProcessor

SIGLIP_MEAN_STD = (0.5, 0.5, 0.5)


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
    """The tower's weights from a local folder or hub name (for checkpoints that hold none)."""
    from llava.checkpoint.original import TOWER_HELP, tower_config

    if not source:
        raise CheckpointNotFound(f"the checkpoint holds no vision tower weights and names no tower to load them from. "
                                 f"{TOWER_HELP}")
    folder = source
    if not os.path.isdir(source):  # a hub name: fetched (or found cached) without transformers' ~25 s of retries
        if not looks_like_hub_id(source):
            raise CheckpointNotFound(f"vision tower {source!r} is neither a local folder nor a hub name. {TOWER_HELP}")
        try:
            folder = hub_snapshot(source)
        except CheckpointNotFound as err:
            raise CheckpointNotFound(f"vision tower: {err}. {TOWER_HELP}") from None
    tower_config(folder)  # a corrupt config.json or weights file is named, as for the checkpoint's own
    read_weight_headers(folder)
    try:
        with _quiet_loading():
            tower = load_vision_tower(folder, dtype=dtype)
    except LlavaError:
        raise
    except (OSError, ValueError) as err:
        raise CheckpointError(f"could not load vision tower {source!r} ({folder}): {' '.join(str(err).split())}") \
            from None
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
    path = os.path.join(folder, "preprocessor_config.json") if folder is not None else ""
    if path and os.path.isfile(path):
        cfg = read_json_object(path, "an image processor config")
        try:
            return ImageProcessor.from_pretrained(cfg, **overrides)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CheckpointError(f"{path} does not describe an image processor "
                                  f"({type(err).__name__}: {' '.join(str(err).split())})") from None
    siglip = config.vision_family == "siglip"
    defaults = dict(crop_size=config.image_size, resize_mode="square" if siglip else "shortest_edge",
                    mean=SIGLIP_MEAN_STD if siglip else CLIP_MEAN, std=SIGLIP_MEAN_STD if siglip else CLIP_STD)
    defaults.update(overrides)
    return ImageProcessor(**defaults)
