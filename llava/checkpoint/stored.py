"""Weights files read lazily: each tensor's name, shape and dtype now, its data when it is used.

`read_state_dict` returns a folder's weights as `StoredTensor`s (safetensors headers parsed,
torch .bin archives mapped), so a loader checks names and shapes and builds the model on the
meta device before any weight is in memory, then reads each tensor once, straight into the
dtype and device it is used in (`as_tensor`). Split from `llava.checkpoint.io`, whose error
reporting and file checks it uses.
"""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
import os
import sys
from typing import BinaryIO, Callable

import torch

from llava.checkpoint.io import (
    REDO,
    StateDict,
    check_readable,
    error_detail,
    load_torch_file,
    torch_file_error,
    weight_files,
    weight_header,
)
from llava.errors import CheckpointError, CheckpointNotFound, LlavaError

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_CONVERT_CHUNK = 4 * 2**20  # bytes read at a time when a tensor changes dtype on the way in


def read_state_dict(folder: str | os.PathLike) -> StateDict:
    """Every weight of a folder's weight files by name, as `StoredTensor`s: each file's header is
    read and checked now, tensor data only when the model is filled (`StoredTensor.load`)."""
    files = weight_files(folder)
    if not files:
        raise CheckpointNotFound(f"no weight files (model.safetensors, pytorch_model.bin, shards) in {folder}")
    state: StateDict = {}
    for path in files:
        state.update(stored_tensors(path))
    return state



# Reading one tensor at a time -------------------------------------------------------------------
class StoredTensor:
    """A tensor in a weights file whose shape and dtype are known but whose data is not yet read.

    Readers hand these around in place of tensors (`.shape`, `.dtype` and `.is_floating_point()`
    answer as a tensor's would), so names and shapes are checked and the model is built before
    any weight is in memory; `load` then reads one tensor straight into the dtype and device it
    is used in, and the process never holds a second copy of the checkpoint.
    """

    __slots__ = ("path", "shape", "dtype", "_read")

    def __init__(self, path: str, shape: torch.Size, dtype: torch.dtype,
                 read: Callable[[torch.dtype], torch.Tensor]) -> None:
        self.path, self.shape, self.dtype, self._read = path, shape, dtype, read

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return self.dtype.itemsize

    def __repr__(self) -> str:
        return f"StoredTensor({os.path.basename(self.path)}, {tuple(self.shape)}, {self.dtype})"

    def load(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """The data, converted to `dtype` while it is read (a CPU tensor, then moved to `device`)."""
        try:
            tensor = self._read(dtype or self.dtype)
        except LlavaError:
            raise
        except Exception as err:  # OSError, or torch failing on a damaged mmapped archive
            raise CheckpointError(f"cannot read a tensor of {self.path} ({error_detail(err)}); it may be truncated or "
                                  f"corrupt: {REDO}") from None
        return tensor if device is None else tensor.to(device)


def as_tensor(value: torch.Tensor | StoredTensor, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> torch.Tensor:
    """A real tensor in `dtype` (floating values only) on `device`, read from its file when stored."""
    target = dtype if dtype is not None and value.is_floating_point() else None
    if isinstance(value, StoredTensor):
        return value.load(target, device)
    return value.to(device=device, dtype=target)


def stored_tensors(path: str) -> dict[str, StoredTensor | torch.Tensor]:
    """One weights file's tensors by name, none of their data read (see `StoredTensor`)."""
    if path.endswith(".safetensors"):
        return _safetensors_entries(path)
    return _torch_entries(path)


def _safetensors_entries(path: str) -> dict[str, StoredTensor]:
    weight_header(path)  # safetensors' own checks (header, offsets, file length), failures named
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {info['dtype']}, which is not supported here")
        shape = torch.Size(info["shape"])
        offset = 8 + size + info["data_offsets"][0]
        out[key] = StoredTensor(path, shape, dtype, functools.partial(_read_safetensor, path, offset, shape, dtype))
    return out


def _read_safetensor(path: str, offset: int, shape: torch.Size, stored: torch.dtype,
                     dtype: torch.dtype) -> torch.Tensor:
    """Read one tensor with plain file reads into memory of its final dtype (no mmap: safetensors'
    own mmap keeps every page it touched resident until the file is closed)."""
    out = torch.empty(shape, dtype=dtype)
    if out.numel() == 0:
        return out
    flat = out.view(-1)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        if dtype == stored:
            _read_exactly(f, flat.view(torch.uint8), path)
            return out
        step = max(1, _CONVERT_CHUNK // stored.itemsize)
        buffer = torch.empty(min(step, flat.numel()), dtype=stored)
        for start in range(0, flat.numel(), step):
            part = buffer[:min(step, flat.numel() - start)]
            _read_exactly(f, part.view(torch.uint8), path)
            flat[start:start + part.numel()].copy_(part)
    return out


def _read_exactly(f: BinaryIO, into: torch.Tensor, path: str) -> None:
    view = memoryview(into.numpy()).cast("B")
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{path} ends inside its tensor data: it was cut short; {REDO}")
        done += n


def _torch_entries(path: str) -> dict[str, StoredTensor | torch.Tensor]:
    """A .bin file mapped into memory (its pickle read, no tensor data); legacy non-zip files,
    which cannot be mapped, are read whole, as before."""
    check_readable(path, "torch weights")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        return load_torch_file(path)  # legacy format, or a damaged file: named there
    except Exception as err:
        raise torch_file_error(path, err) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of weights")
    mapped = _mapped_ranges(path)
    return {k: StoredTensor(path, v.shape, v.dtype, functools.partial(_copy_mapped, v, mapped))
            if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _copy_mapped(tensor: torch.Tensor, mapped: list[tuple[int, int]], dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(tensor.shape, dtype=dtype)
    out.copy_(tensor)
    _drop_pages(tensor, mapped)
    return out


def _mapped_ranges(path: str) -> list[tuple[int, int]]:
    """Address ranges at which this process maps `path` (Linux /proc/self/maps; elsewhere none)."""
    real = os.path.realpath(path)
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") == real:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        return []
    return ranges


@functools.cache
def _madvise() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return fn


def _drop_pages(tensor: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Unmap the pages of a copied-out tensor of an mmapped file (MADV_DONTNEED): read-only file
    pages, re-read from the file if ever touched again; left in place, every page read would stay
    in the process's memory until the whole file is released. Only whole pages inside the tensor's
    storage and inside the file's own mapping are dropped, never other memory."""
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    madvise = _madvise()
    if madvise is None or last <= first or not any(lo <= first and last <= hi for lo, hi in mapped):
        return
    madvise(first, last - first, 4)  # MADV_DONTNEED
