"""A native CPU kernel, built at first use: int8 weights times bf16 activations, for a few rows.

Why: a batch of 8 decoding rows is bound by arithmetic, not by reading the weights, and PyTorch's
weight-only int8 kernel (`aten._weight_int8pack_mm`) widens the weights to fp32 and multiplies 16 at
a time: 140-180 G multiply-adds/s at 8 rows on our 2-core AVX-512 EPYC, where the CPU's bf16
products reach 460-520. Nothing maintained multiplies bf16 activations by int8 weights at bf16's
rate on CPUs without AMX (benchmarks/README.md, session 39, lists what was checked). This kernel
(`cpu_kernels.cpp`) widens 32 weights at a time to bf16, which holds them exactly, and multiplies
them into fp32 with AVX512-BF16's `vdpbf16ps`, reusing each widened tile for up to 8 rows: 350-420
G/s at 8 rows, 1.5-1.9x ATen's kernel at 2-4 rows, and no slower at one (bench-200m's shapes,
session 40). It reads the weight in the layout ATen's kernel reads (int8 [out, in]), so no second
copy is kept, and it multiplies by the fp32 scales where ATen's kernel rounds them to bf16.

Where: CPUs with AVX512-BF16 (AMD Zen 4 on, Intel Cooper Lake and Sapphire Rapids on), when a C++
compiler and ninja are present: `torch.utils.cpp_extension` builds it into its cache (~7 s, once
per machine and source). Elsewhere, or with `LLAVA_CPU_KERNELS=0`, `Int8WeightOnlyLinear` keeps
ATen's kernel; `int8_weight_path()` says which one runs, and a build that fails says why, once.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-fopenmp"]
_LIBRARY = torch.library.Library("llava_cpu", "DEF")  # the op's schema; cpu_kernels.cpp registers its CPU code
_LIBRARY.define("int8_weight_mm(Tensor x, Tensor weight, Tensor scale) -> Tensor")

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_unavailable: str | None = None  # why the kernel does not run here, once known
_built = False


@torch.library.register_fake("llava_cpu::int8_weight_mm")
def _int8_weight_mm_shape(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


def int8_weight_mm_available() -> bool:
    """Whether `torch.ops.llava_cpu.int8_weight_mm` runs here, building it the first time it is asked."""
    global _unavailable, _built
    if _built or _unavailable is not None:
        return _built
    with _lock:
        if not _built and _unavailable is None:
            _unavailable = _build()
            _built = _unavailable is None
    return _built


def int8_weight_path() -> str:
    """Which kernel an int8-weight layer's few rows take here, for benchmarks and logs to print."""
    if int8_weight_mm_available():
        return "llava's AVX512-BF16 kernel (cpu_kernels.cpp)"
    return f"aten._weight_int8pack_mm ({_unavailable})"


def _build() -> str | None:
    """Build and load the kernel; None when it is loaded, else the reason it is not."""
    if os.environ.get("LLAVA_CPU_KERNELS", "1") == "0":
        return "LLAVA_CPU_KERNELS=0"
    if not torch.cpu._is_avx512_bf16_supported():
        return "this CPU has no AVX512-BF16"
    try:
        from torch.utils.cpp_extension import load

        load(name="llava_cpu_kernels", sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
    except Exception as error:  # no compiler, no ninja, an old compiler without AVX512-BF16, ...
        reason = f"the AVX512-BF16 kernel could not be built: {str(error).strip().splitlines()[-1][:300]}"
        logger.warning("llava: %s; int8-weight layers use PyTorch's kernel", reason)
        return reason
    return None
