"""Reading and writing checkpoint files (weights as safetensors or torch .bin, single or sharded; JSON).

Every read failure (missing, empty, truncated, corrupt) raises a `CheckpointError` whose
one-line message names the file: the libraries' own errors (SafetensorError, zipfile and
unpickling errors, JSONDecodeError) name neither the file nor what to do.
"""

from __future__ import annotations

import glob
import json
import os
import zipfile
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from llava.errors import CheckpointError, CheckpointMismatch, CheckpointNotFound  # re-exported

StateDict = dict[str, torch.Tensor]

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Files that sit beside (or instead of) full weights but are not the model's weights.
NOT_MODEL_WEIGHTS = frozenset({"mm_projector.bin", "non_lora_trainables.bin", "adapter_model.bin",
                               "adapter_model.safetensors", "training_args.bin", "optimizer.bin", "scheduler.bin"})
REDO = "download or save it again"
# safetensors dtype names (its format spec) -> torch dtypes.


# Reading ----------------------------------------------------------------------------------------
def check_readable(path: str, kind: str) -> None:
    """CheckpointNotFound for a missing file, CheckpointError for an empty one (every reader's first check)."""
    if not os.path.isfile(path):
        raise CheckpointNotFound(f"{path} not found ({kind})")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes; expected {kind}); {REDO}")


def error_detail(err: BaseException) -> str:
    """One line of a library error (some span lines, or are empty)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def read_json(path: str | os.PathLike, kind: str = "a JSON file") -> Any:
    """A JSON file's content; a bad one is named with the parser's line and column."""
    path = os.fspath(path)
    check_readable(path, kind)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON (line {err.lineno} column {err.colno}: {err.msg}); "
                              f"it may be truncated or corrupt: {REDO}") from None
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON (not UTF-8 text: byte {err.start}); {REDO}") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or error_detail(err)}") from None


def read_json_object(path: str | os.PathLike, kind: str = "a JSON object") -> dict[str, Any]:
    """`read_json` for files that must hold an object (configs): `[]` or `"x"` is as bad as a truncated file."""
    data = read_json(path, kind)
    if not isinstance(data, dict):
        raise CheckpointError(f"{os.fspath(path)} holds a JSON {type(data).__name__}, not an object ({kind})")
    return data


def _torch_detail(path: str, err: BaseException) -> str:
    """Why torch could not read a file, said plainly: its own messages blame `weights_only`
    (suggesting the unsafe `weights_only=False`) or say `[Errno 22]` for a truncated archive."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"PK" and not zipfile.is_zipfile(path):
        return "a zip archive without its directory: cut short"
    if magic != b"PK" and str(err).startswith("Weights only load failed"):
        return "neither a torch zip archive nor a legacy torch pickle"
    text = error_detail(err)
    marker = "WeightsUnpickler error:"
    return text[text.index(marker):].split(" Check the documentation")[0] if marker in text else text


def torch_file_error(path: str, err: BaseException) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable torch weights file ({_torch_detail(path, err)}); "
                           f"it may be truncated or corrupt: {REDO}")


def load_torch_file(path: str) -> StateDict:
    """A .bin/.pt state dict, loaded without running pickled code (weights_only)."""
    check_readable(path, "torch weights")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types here (zipfile, unpickling, EOF, Runtime)
        raise torch_file_error(path, err) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of weights")
    return state


def load_weights_file(path: str) -> StateDict:
    """One weights file, safetensors or torch .bin by its extension."""
    if not path.endswith(".safetensors"):
        return load_torch_file(path)
    check_readable(path, "safetensors weights")
    try:
        return load_file(path)
    except Exception as err:  # SafetensorError (truncated header or data), OSError
        raise CheckpointError(f"{path} is not a valid safetensors file ({error_detail(err)}); "
                              f"it may be truncated or corrupt: {REDO}") from None


def weight_header(path: str) -> dict[str, str]:
    """Tensor name -> dtype of one weights file, reading no tensor data (safetensors header;
    a .bin's pickle through mmap), so `llava info` notices a truncated or corrupt file cheaply."""
    if not path.endswith(".safetensors"):
        check_readable(path, "torch weights")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) torch files cannot be mmapped: read them whole
            state = load_torch_file(path)
        except Exception as err:
            raise torch_file_error(path, err) from None
        return {k: str(v.dtype).removeprefix("torch.") for k, v in state.items() if isinstance(v, torch.Tensor)}
    check_readable(path, "safetensors weights")
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except Exception as err:
        raise CheckpointError(f"{path} is not a valid safetensors file ({error_detail(err)}); "
                              f"it may be truncated or corrupt: {REDO}") from None


def _index_shards(index_path: str) -> list[str]:
    """The shard files a sharded checkpoint's index names (each must exist)."""
    index = read_json_object(index_path, "a sharded checkpoint's index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path} has no weight_map (tensor name -> shard file); {REDO}")
    folder = os.path.dirname(index_path)
    shards = [os.path.join(folder, s) for s in sorted(set(weight_map.values()))]
    missing = [os.path.basename(s) for s in shards if not os.path.isfile(s)]
    if missing:
        raise CheckpointNotFound(f"{index_path} names {len(missing)} shard(s) not in {folder}: {missing[:4]}; "
                                 "the download may be incomplete")
    return shards


def weight_files(folder: str | os.PathLike) -> list[str]:
    """A folder's full-model weight files: an index's shards, the standard file, else any *.safetensors/*.bin."""
    folder = str(folder)
    for index in WEIGHT_INDEXES:
        index_path = os.path.join(folder, index)
        if os.path.exists(index_path):
            return _index_shards(index_path)
    for name in WEIGHT_FILES:
        if os.path.exists(os.path.join(folder, name)):
            return [os.path.join(folder, name)]

    def candidates(pattern: str) -> list[str]:
        found = glob.glob(os.path.join(folder, pattern))
        return sorted(p for p in found if os.path.basename(p) not in NOT_MODEL_WEIGHTS)

    return candidates("*.safetensors") or candidates("*.bin")


def read_weight_headers(folder: str | os.PathLike) -> dict[str, str]:
    """Name -> dtype of every weight in a folder's weight files, checking each file's header (not its data)."""
    names: dict[str, str] = {}
    for path in weight_files(folder):
        names.update(weight_header(path))
    return names


# Writing ----------------------------------------------------------------------------------------
def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (else set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str, directory: bool = False) -> None:
    """Give a file (or folder) the mode a plain `open` (`mkdir`) would: safetensors writes through
    a private temp file (mode 0600) and `tempfile.mkdtemp` makes 0700 folders."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


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
        honour_umask(os.path.join(folder, name))

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
