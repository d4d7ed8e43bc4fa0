"""Weight-name tables between our modules and the two published layouts.

Ours (in memory)                    llava-hf file                          original file
vision_tower.<tower keys>           vision_tower.vision_model.<tower keys> model.vision_tower.vision_tower.vision_model.<tower keys>
projector.0 / projector.2           multi_modal_projector.linear_1 / _2    model.mm_projector.0 / .2
projector.<i> (other projectors)    (not expressible)                      model.mm_projector.<i>
language_model.<k>                  language_model.<k>                     <k>  (model.layers.*, lm_head.weight, ...)
image_newline                       image_newline                          model.image_newline

Tower keys are stored with the `vision_model.` prefix that CLIP/SigLIP checkpoints use;
transformers 5 keeps them without it in memory, older releases with it, so the prefix is
matched to the live module on load.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch

from llava.errors import CheckpointMismatch, InputError

StateDict = dict[str, torch.Tensor]

_HF_PROJECTOR = {"0": "linear_1", "2": "linear_2"}
_HF_PROJECTOR_BACK = {v: k for k, v in _HF_PROJECTOR.items()}
DROP_SUFFIXES = (".inv_freq",)  # rotary buffers some old checkpoints saved


def _tower_key_to_file(key: str) -> str:
    return key if key.startswith("vision_model.") else "vision_model." + key


def _tower_key_from_file(key: str) -> str:
    return key[len("vision_model."):] if key.startswith("vision_model.") else key


def to_hf(state: StateDict, projector_type: str) -> StateDict:
    if projector_type != "mlp2x_gelu":
        raise InputError(
            f"the llava-hf layout only has the mlp2x_gelu projector (this model has {projector_type!r}); "
            "save with layout='original' (CLI: --to original) instead")
    out: StateDict = {}
    for key, value in state.items():
        if key.startswith("vision_tower."):
            out["vision_tower." + _tower_key_to_file(key[len("vision_tower."):])] = value
        elif key.startswith("projector."):
            idx, rest = key[len("projector."):].split(".", 1)
            out[f"multi_modal_projector.{_HF_PROJECTOR[idx]}.{rest}"] = value
        else:  # language_model.*, image_newline
            out[key] = value
    return out


def from_hf(state: StateDict) -> StateDict:
    """Accepts the published layout and transformers 5's own (model.language_model.*, lm_head.*)."""
    out: StateDict = {}
    for key, value in state.items():
        if key.endswith(DROP_SUFFIXES):
            continue
        k = key
        # transformers >= 4.52 in-memory names, as written by its save_pretrained in some releases
        if k.startswith("model.language_model."):
            k = "language_model.model." + k[len("model.language_model."):]
        elif k == "lm_head.weight":
            k = "language_model.lm_head.weight"
        elif k.startswith("model."):
            k = k[len("model."):]
        if k.startswith("vision_tower."):
            out["vision_tower." + _tower_key_from_file(k[len("vision_tower."):])] = value
        elif k.startswith("multi_modal_projector."):
            name, rest = k[len("multi_modal_projector."):].split(".", 1)
            if name not in _HF_PROJECTOR_BACK:
                raise CheckpointMismatch(f"unexpected projector weight {key!r} in a llava-hf checkpoint")
            out[f"projector.{_HF_PROJECTOR_BACK[name]}.{rest}"] = value
        else:
            out[k] = value
    return out


def to_original(state: StateDict) -> StateDict:
    out: StateDict = {}
    for key, value in state.items():
        if key.startswith("vision_tower."):
            out["model.vision_tower.vision_tower." + _tower_key_to_file(key[len("vision_tower."):])] = value
        elif key.startswith("projector."):
            out["model.mm_projector." + key[len("projector."):]] = value
        elif key == "image_newline":
            out["model.image_newline"] = value
        elif key.startswith("language_model."):
            out[key[len("language_model."):]] = value
        else:
            raise ValueError(f"no original-layout name for weight {key!r}")
    return out


def from_original(state: StateDict) -> StateDict:
    """Also accepts projector-only files (mm_projector.bin) and PEFT `base_model.model.` prefixes."""
    out: StateDict = {}
    for key, value in state.items():
        if key.endswith(DROP_SUFFIXES):
            continue
        k = re.sub(r"^base_model\.model\.", "", key)
        if k.startswith("model.vision_tower.vision_tower."):
            out["vision_tower." + _tower_key_from_file(k[len("model.vision_tower.vision_tower."):])] = value
        elif "mm_projector." in k:
            out["projector." + k.split("mm_projector.", 1)[1]] = value
        elif k == "model.image_newline":
            out["image_newline"] = value
        elif k.startswith("model.vision_resampler") or k.startswith("model.vision_tower."):
            continue  # legacy resampler slots / non-standard tower wrappers, unused by any release
        else:
            out["language_model." + k] = value
    return out


def match_tower_prefix(state: StateDict, tower_keys: Iterable[str]) -> StateDict:
    """Give tower weights the `vision_model.` prefix exactly when the live tower module uses it."""
    wants_prefix = any(k.startswith("vision_model.") for k in tower_keys)
    out: StateDict = {}
    for key, value in state.items():
        if key.startswith("vision_tower."):
            inner = _tower_key_from_file(key[len("vision_tower."):])
            key = "vision_tower." + (_tower_key_to_file(inner) if wants_prefix else inner)
        out[key] = value
    return out
