"""Turning (config, state dict) into a ready LlavaModel, each weight materialised once, in place.

The model is built with every parameter on the meta device (free, and no random init), which
also checks every name and shape against the checkpoint before memory is spent. Each weight is
then read from its file (`StoredTensor`), converted to the target dtype as it is read, put on
the target device and assigned to its parameter, one tensor at a time, so loading peaks at the
loaded model's size plus one tensor: never the checkpoint plus the model, nor an fp32 detour.
A quantizing load swaps each language-model linear for its quantized form as soon as its weights
are in (`quantize_linear`), so the full-precision model never exists at once either.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Protocol

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from llava.checkpoint import keys
from llava.checkpoint.io import check_state, read_json_object, read_weight_headers, tied_targets
from llava.checkpoint.paths import hub_snapshot, looks_like_hub_id
from llava.checkpoint.stored import as_tensor
from llava.config import LlavaConfig
from llava.device import return_freed_memory
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


class QuantizeLinear(Protocol):
    """A linear of the model, by its name, just filled -> its replacement (a quantized layer), or None
    to keep it (`llava.model.quantize.LinearQuantizer`)."""

    def __call__(self, model: LlavaModel, name: str, linear: nn.Linear) -> nn.Module | None: ...

    def reads_stored(self, name: str) -> bool:
        """Whether the replacement is the same from linear `name`'s weight in any float precision."""
        ...


def expected_shapes(config: LlavaConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Every weight name and shape of the model a config builds, plus its tied names (meta device: no memory)."""
    with torch.device("meta"):
        meta = LlavaModel(config)
    return {k: tuple(v.shape) for k, v in meta.state_dict().items()}, tied_targets(meta)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Parameters created inside (by this thread) land on the meta device: no memory, no random init.

    Unlike a `torch.device("meta")` build, buffers and plain attributes are computed as usual, so
    the ones no checkpoint holds (rotary frequencies, position ids) come out right, on the CPU.
    """
    thread = threading.get_ident()

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or param.is_meta or threading.get_ident() != thread:
            return None
        return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    handle = nn.modules.module.register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


def empty_model(config: LlavaConfig, dtype: torch.dtype) -> LlavaModel:
    """The model `config` describes, parameters on the meta device; the language model made by
    transformers' `from_config` in `dtype` (its config then says `dtype`, as a loaded one does)."""
    with parameters_on_meta():
        lm = AutoModelForCausalLM.from_config(config.text_config, dtype=dtype)
        return LlavaModel(config, language_model=lm)


def build_model(config: LlavaConfig, state: keys.StateDict, dtype: torch.dtype = torch.float32,
                tower_source: str | None = None, device: torch.device | str = "cpu",
                quantize_linear: QuantizeLinear | None = None, tower_dtype: torch.dtype | None = None) -> LlavaModel:
    """A LlavaModel holding exactly `state` (our names; tensors or `StoredTensor`s), in `dtype`, on `device`.

    When `state` has no tower weights (released v1.5), the tower is loaded from
    `tower_source` (a local folder or hub name). `quantize_linear` may swap each linear as soon
    as its weights are in (see `llava.model.quantize.linear_quantizer`). `tower_dtype`: the vision
    tower's, where it is not `dtype` (`llava.model.quantize.vision_tower_dtype`).
    """
    def dtype_of(name: str) -> torch.dtype:
        return tower_dtype if tower_dtype is not None and name.startswith("vision_tower.") else dtype

    model = empty_model(config, dtype)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tower_keys = [k[len("vision_tower."):] for k in expected if k.startswith("vision_tower.")]
    state = keys.match_tower_prefix(state, tower_keys)
    has_tower = any(k.startswith("vision_tower.") for k in state)
    check_state(expected, state, allow_missing=() if has_tower else ("vision_tower.",), tied=tied_targets(model))
    if not has_tower:
        tower = _load_tower(tower_source, dtype, {k: v for k, v in expected.items() if k.startswith("vision_tower.")})
        model.vision_tower = tower.to(device=device, dtype=dtype_of("vision_tower."))
    shared, present = _shared_parameters(model), set(state)
    _fill(model, state, dtype_of, torch.device(device), quantize_linear)
    _retie(model, shared, present)
    _finish_buffers(model, dtype_of, torch.device(device))
    model.config.text_config = model.language_model.config  # one config object, so later vocab resizes stay in sync
    return model


def _fill(model: LlavaModel, state: keys.StateDict, dtype_of: Callable[[str], torch.dtype], device: torch.device,
          quantize_linear: QuantizeLinear | None) -> None:
    """Read each weight into its parameter, in `dtype_of(name)` on `device`, one at a time (`state` is emptied
    as it goes, so nothing holds a read tensor but the model); a linear whose weights are all in
    may be swapped at once by `quantize_linear` (a tied one is not: it waits on meta for `_retie`).
    A weight it takes in any precision is read in the file's where that is narrower, and widened
    only if its linear is kept."""
    for key in list(state):
        owner_name, _, leaf = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        stored, dtype = state.pop(key), dtype_of(key)
        if (quantize_linear is not None and leaf == "weight" and type(owner) is nn.Linear
                and quantize_linear.reads_stored(owner_name) and stored.is_floating_point()
                and stored.dtype.itemsize < dtype.itemsize):  # a bias is read as the model's: it is copied as is
            dtype = stored.dtype
        owner.load_state_dict({leaf: as_tensor(stored, dtype, device)}, strict=False, assign=True)
        del stored
        filled = type(owner) is nn.Linear and not any(p.is_meta for p in owner.parameters())
        del owner  # a replaced linear's full-precision weight is freed at once, not an iteration later
        if filled and quantize_linear is not None:
            _quantize_filled(model, owner_name, quantize_linear, dtype_of(key))
        elif quantize_linear is not None:  # a converted read's temporaries too (int8 1B: peak 1.71 -> 1.63 GiB)
            return_freed_memory()


def _quantize_filled(model: LlavaModel, name: str, quantize_linear: QuantizeLinear, dtype: torch.dtype) -> None:
    linear = model.get_submodule(name)
    replacement = quantize_linear(model, name, linear)
    if replacement is None:
        linear.to(dtype)  # kept: a weight read in the file's narrower precision takes the model's
    else:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replacement)
    del linear, replacement
    return_freed_memory()


def _shared_parameters(model: nn.Module) -> list[list[str]]:
    """Groups of names sharing one parameter (tied embeddings), the first being the one loaded."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _retie(model: nn.Module, groups: list[list[str]], present: set[str]) -> None:
    """Share the loaded parameter again (assigning it replaced one name of each tied group only),
    with the names the checkpoint lacks; one it holds keeps its own values, as in transformers 5."""
    for source, *targets in groups:
        param = model.get_parameter(source)
        for target in targets:
            if target in present:
                continue
            owner, _, leaf = target.rpartition(".")
            setattr(model.get_submodule(owner), leaf, param)


def _finish_buffers(model: nn.Module, dtype_of: Callable[[str], torch.dtype], device: torch.device) -> None:
    """Buffers (the built ones no checkpoint holds: rotary frequencies, position ids) to `device`,
    floating ones in `dtype_of(name)` as a `model.to(dtype)` would; then nothing may be left on meta."""
    done: dict[int, torch.Tensor] = {}
    for name, buffer in list(model.named_buffers(remove_duplicate=False)):
        if id(buffer) not in done:
            done[id(buffer)] = buffer.to(device=device, dtype=dtype_of(name) if buffer.is_floating_point() else None)
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, done[id(buffer)])
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointMismatch(f"checkpoint lacks {len(left)} weights: {left[:8]}")


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
