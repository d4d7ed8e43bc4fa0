"""Which device and dtype to run on: the best available by default, an explicit choice checked.

Checked up front (before any weights load) so `--device cuda` on a machine without CUDA is one
clear error, not an assertion deep inside torch after a long load. And the host's memory: freed
heap pages given back after steps that free large tensors (`return_freed_memory`).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Callable

import torch

from llava.errors import DeviceError, InputError, InputTypeError

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}
DEVICE_HELP = "cpu, cuda, cuda:N or mps"


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """cuda if available, else mps, else cpu; an explicit choice must exist on this machine."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise InputTypeError(f"device must be a string such as {DEVICE_HELP}, not {type(device).__name__}")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"unknown device {str(device)!r}; expected {DEVICE_HELP}") from None
    if chosen.type == "cpu":
        return torch.device("cpu")
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            why = "this build of torch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise DeviceError(f"device {str(device)!r} is not available: {why}; use --device cpu (or leave it out)")
        count = torch.cuda.device_count()
        if chosen.index is not None and chosen.index >= count:
            raise DeviceError(f"device {str(device)!r} does not exist: this machine has {count} CUDA device(s)")
        return chosen
    if chosen.type == "mps":
        if not _mps_available():
            raise DeviceError(f"device {str(device)!r} is not available: MPS needs Apple silicon and a torch "
                              "build with MPS; use --device cpu (or leave it out)")
        return chosen
    raise DeviceError(f"device type {chosen.type!r} is not supported; expected {DEVICE_HELP}")


def resolve_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """float32 on CPU (fp16 matmuls are slow or missing there), bf16 on CUDA when it has it, fp16 on MPS."""
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.").lower()
        if key not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; expected one of {', '.join(sorted(set(DTYPES)))}")
        return DTYPES[key]
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise InputError(f"dtype {dtype} is not supported; expected float32, bfloat16 or float16")
        return dtype
    if dtype is not None:
        raise InputTypeError(f"dtype must be a string such as 'bf16' or a torch.dtype, not {type(dtype).__name__}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Give the process's freed heap pages back to the system (glibc), after a step that freed large
    tensors among small ones: the heap keeps most of those pages otherwise. A quantizing load would end
    near the full-precision size (2.3 GiB instead of 1.3 for a 0.8 GiB 4-bit model), and an engine's
    first fusing of quantized q/k/v and gate/up (`llava.model.woq.share_rows`) left the parts' old
    copies resident (a 1.26 GiB int8 1B model: 0.38 GiB)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
