"""Reading and writing weight files (safetensors or torch .bin, single or sharded)."""

from __future__ import annotations

import glob
import json
import os
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llava.errors import CheckpointMismatch  # re-exported: raised here

StateDict = dict[str, torch.Tensor]

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Files that sit beside (or instead of) full weights but are not the model's weights.
NOT_MODEL_WEIGHTS = frozenset({"mm_projector.bin", "non_lora_trainables.bin", "adapter_model.bin",
                               "adapter_model.safetensors", "training_args.bin", "optimizer.bin", "scheduler.bin"})



def load_torch_file(path: str) -> StateDict:
    """A .bin/.pt state dict, loaded without running pickled code (weights_only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types here; name the file instead of a deep traceback
        raise CheckpointMismatch(f"could not read weights file {path}: {err}") from None


def _load_one(path: str) -> StateDict:
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except Exception as err:
            raise CheckpointMismatch(f"could not read weights file {path}: {err}") from None
    return load_torch_file(path)


def weight_files(folder: str | os.PathLike) -> list[str]:
    """A folder's full-model weight files: an index's shards, the standard file, else any *.safetensors/*.bin."""
    folder = str(folder)
    for index in WEIGHT_INDEXES:
        index_path = os.path.join(folder, index)
        if os.path.exists(index_path):
            with open(index_path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(folder, s) for s in shards]
    for name in WEIGHT_FILES:
        if os.path.exists(os.path.join(folder, name)):
            return [os.path.join(folder, name)]

    def candidates(pattern: str) -> list[str]:
        found = glob.glob(os.path.join(folder, pattern))
        return sorted(p for p in found if os.path.basename(p) not in NOT_MODEL_WEIGHTS)

    return candidates("*.safetensors") or candidates("*.bin")


def read_state_dict(folder: str | os.PathLike) -> StateDict:
    files = weight_files(folder)
    if not files:
        raise CheckpointMismatch(f"no weight files (model.safetensors, pytorch_model.bin, shards) in {folder}")
    state: StateDict = {}
    for path in files:
        state.update(_load_one(path))
    return state


def _split_shards(state: StateDict, max_shard_bytes: int) -> list[StateDict]:
    """Group tensors (sorted by name) into shards of at most max_shard_bytes (one tensor may exceed it)."""
    shards: list[StateDict] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    return shards


def _own_storage(state: StateDict) -> StateDict:
    """Contiguous CPU tensors, each with its own storage (tied weights are copied: safetensors refuses shared ones)."""
    out: StateDict = {}
    seen: set[int] = set()
    for key, value in state.items():
        value = value.detach().contiguous().cpu()
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen and value.numel():
            value = value.clone()
        seen.add(ptr)
        out[key] = value
    return out


def write_weights(state: StateDict, folder: str | os.PathLike, max_shard_bytes: int = 5 * 2**30,
                  safe_serialization: bool = True) -> list[str]:
    """Write `model.safetensors` (or `pytorch_model.bin`), or shards plus the standard index file.

    The file names and index format are transformers' own, so its `from_pretrained` and ours
    read the result alike.
    """
    folder = str(folder)
    state = _own_storage(state)
    shards = _split_shards(state, max_shard_bytes)
    stem, ext, index = (("model", "safetensors", WEIGHT_INDEXES[0]) if safe_serialization
                        else ("pytorch_model", "bin", WEIGHT_INDEXES[1]))

    def save(shard: StateDict, name: str) -> None:
        if safe_serialization:
            save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        else:
            torch.save(shard, os.path.join(folder, name))

    if len(shards) == 1:
        save(shards[0], f"{stem}.{ext}")
        return [f"{stem}.{ext}"]
    names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save(shard, name)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    with open(os.path.join(folder, index), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def write_safetensors(state: StateDict, folder: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    return write_weights(state, folder, max_shard_bytes, safe_serialization=True)


def check_state(expected: dict[str, tuple[int, ...]], state: StateDict, allow_missing: Iterable[str] = (),
                tied: Iterable[str] = ()) -> None:
    """Raise CheckpointMismatch naming mis-shaped, unexpected or missing tensors.

    `expected` maps names to shapes (a model built on the meta device gives it for free, so
    a 7B checkpoint is checked before any memory is spent on the model).
    """
    bad_shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k])}"
                  for k, v in state.items() if k in expected and tuple(expected[k]) != tuple(v.shape)]
    if bad_shapes:
        raise CheckpointMismatch("weight shapes do not match the config: " + "; ".join(bad_shapes[:10])
                                 + (f" (+{len(bad_shapes) - 10} more)" if len(bad_shapes) > 10 else ""))
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointMismatch(f"checkpoint has {len(unexpected)} weights the model does not: {unexpected[:8]}")
    allow, tied = tuple(allow_missing), set(tied)
    missing = sorted(k for k in set(expected) - set(state) if not k.startswith(allow) and k not in tied)
    if missing:
        raise CheckpointMismatch(f"checkpoint lacks {len(missing)} weights: {missing[:8]}")


def load_into(model: nn.Module, state: StateDict, allow_missing: Iterable[str] = ()) -> None:
    """Copy `state` into `model`, naming every missing, unexpected or mis-shaped tensor.

    `allow_missing` lists key prefixes that may be absent (e.g. a vision tower loaded by name).
    Tied weights (lm_head = embed_tokens) count as present when their source is.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state(expected, state, allow_missing, tied_targets(model))
    model.load_state_dict(state, strict=False)


def tied_targets(model: nn.Module) -> set[str]:
    """Names of parameters that share storage with an earlier parameter (tied embeddings)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        else:
            seen[id(param)] = name
    return tied
