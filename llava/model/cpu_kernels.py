"""Native CPU kernels, built at first use: quantized weights times a few rows of activations, and
the decode step's attention.

Why: a batch of 8 decoding rows is bound by arithmetic more than by reading the weights, and
PyTorch's weight-only kernels (`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`) widen
the weights to fp32 and multiply 16 at a time: 115-170 G multiply-adds/s at 8 rows on our 2-core
AVX-512 EPYC, where its bf16 products reach 440-520. Nothing maintained multiplies bf16 activations
by int8 or int4 weights at bf16's rate on CPUs without AMX (benchmarks/README.md, session 39, lists
what was checked). These kernels (`cpu_kernels.cpp`) read int8 weights in the layout ATen's kernels
read, and int4 ones in a layout of their own, one copy either way (bench-200m's shapes, weights
streamed from memory as a decode step reads them, 8 rows; ATen's kernels in brackets):
- int8 weights x bf16 activations: widened to bf16, which holds them exactly, and multiplied into
  fp32 by AVX512-BF16's `vdpbf16ps`, each widened tile serving up to 8 rows: 280-315 G/s (115-125).
- int4 weights x activations taken as int8 codes per group of 32 columns, as llama.cpp's q4_0 takes
  q8_0 ones: `vpdpbusd` (VNNI) multiplies 4 codes by 4 at once, twice the products an instruction of
  bf16's `vdpbf16ps`, and the 4-bit codes need no widening: 350-410 G/s at 8 rows (145-160; widened
  to bf16, as session 40 had it, 240-300); one row 40-65 GB/s (25-30). Those figures are from ATen's
  int4pack bytes; llava's own row-block layout (`llava.model.int4_weight`) needs no permutation to
  unpack them: one row 14-18% faster again, 8 rows 0-6%.
  The codes cost ~1% of each output against bf16 activations, where the 4-bit weights cost ~8%.
  Also a one-pass dequantization of the row blocks for a prefill's GEMM where the CPU has AMX
  (its int4pack predecessor took 0.04-0.2 ms a bench-200m weight against 0.3-1.8 through PyTorch ops).
- int8 weights x int8-dynamic's activation codes: `vpdpbusd` (VNNI), exact in int32 like `_int_mm`,
  on the plain weight where oneDNN's fast batch kernel needs a reordered copy.
- attention of one new query row per head over the KV cache, fp32 or bf16, in fp32 (the compiled
  decode step's `attend_one_row`, which Inductor turns into loops at 20-40 GB/s): at 8 rows, ~100
  cache columns, 50-75 us a bench-200m layer in the step against 115.

Where: CPUs with AVX512-BF16 and VNNI (AMD Zen 4 on, Intel Cooper Lake and Sapphire Rapids on), when a
C++ compiler and ninja are present: `torch.utils.cpp_extension` builds them into its cache (~10 s,
once per machine and source). Elsewhere, or with `LLAVA_CPU_KERNELS=0`, the quantized layers
(`llava.model.woq`, `llava.model.int8_dynamic`) keep PyTorch's kernels; `kernel_path()` says which
run, and a build that fails says why, once.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx512vnni", "-fopenmp"]
_LIBRARY = torch.library.Library("llava_cpu", "DEF")  # the ops' schemas; cpu_kernels.cpp registers their CPU code
_LIBRARY.define("int8_weight_mm(Tensor x, Tensor weight, Tensor scale) -> Tensor")
_LIBRARY.define("int8_codes_mm(Tensor codes, Tensor weight, Tensor weight_sums) -> Tensor")
_LIBRARY.define("int4_weight_mm(Tensor x, Tensor packed) -> Tensor")
_LIBRARY.define("int4_dequantize_t(Tensor packed) -> Tensor")
_LIBRARY.define("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor mask, float scale) -> Tensor")

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_unavailable: str | None = None  # why the kernels do not run here, once known
_built = False


@torch.library.register_fake("llava_cpu::int8_weight_mm")
def _int8_weight_mm_shape(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


@torch.library.register_fake("llava_cpu::int8_codes_mm")
def _int8_codes_mm_shape(codes: torch.Tensor, weight: torch.Tensor, weight_sums: torch.Tensor) -> torch.Tensor:
    return codes.new_empty(codes.shape[0], weight.shape[0], dtype=torch.int32)


@torch.library.register_fake("llava_cpu::int4_weight_mm")
def _int4_weight_mm_shape(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], packed.shape[0] * 16, dtype=torch.float32)


@torch.library.register_fake("llava_cpu::int4_dequantize_t")
def _int4_dequantize_t_shape(packed: torch.Tensor) -> torch.Tensor:
    return packed.new_empty(packed.shape[1] * 32, packed.shape[0] * 16, dtype=torch.bfloat16)


@torch.library.register_fake("llava_cpu::decode_attention")
def _decode_attention_shape(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                            scale: float) -> torch.Tensor:
    return torch.empty_like(q)


def available() -> bool:
    """Whether the `torch.ops.llava_cpu` kernels run here, building them the first time it is asked.

    `torch.ops.llava_cpu.int8_weight_mm(x, weight, scale)`: x bf16 [M, K], weight int8 [N, K], scale
    fp32 [N] -> fp32 [M, N]. `int8_codes_mm(codes, weight, weight_sums)`: int8-dynamic's activation
    codes + 128 as uint8 [M, K], weight int8 [N, K] and its rows' int32 sums [N] -> the exact
    (codes - 128) @ weight.T, int32 [M, N].
    `int4_weight_mm(x, packed)`: x bf16 [M, K] (taken as int8 codes per group of 32), 4-bit weights
    in llava's row-block layout, uint8 [N / 16, K / 32, 320] (`llava.model.int4_weight`) -> fp32 [M,
    N]. `int4_dequantize_t(packed)`: those weights, transposed, bf16 [K, N] (for a prefill's GEMM on
    CPUs with AMX). `decode_attention(q, keys, values, mask, scale)`: q fp32 [B,
    kv_heads, group, dim] against a cache fp32 or bf16 [B, kv_heads, capacity, dim], read up to the
    additive fp32 mask's length [B, span] -> fp32 like q."""
    global _unavailable, _built
    if _built or _unavailable is not None:
        return _built
    with _lock:
        if not _built and _unavailable is None:
            _unavailable = _build()
            _built = _unavailable is None
    return _built


def loaded() -> bool:
    """Whether the kernels are built and loaded in this process already (this never builds them)."""
    return _built


def kernel_path() -> str:
    """Which kernels the quantized layers' few rows take here, for benchmarks and logs to print."""
    if available():
        return "llava's AVX512-BF16 and VNNI kernels (cpu_kernels.cpp)"
    return f"ATen's kernels ({_unavailable})"


def _build() -> str | None:
    """Build and load the kernels; None when they are loaded, else the reason they are not."""
    if os.environ.get("LLAVA_CPU_KERNELS", "1") == "0":
        return "LLAVA_CPU_KERNELS=0"
    if not all(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                         "_is_vnni_supported")):
        return "this CPU has no AVX512-BF16 and VNNI"
    try:
        from torch.utils.cpp_extension import load

        load(name="llava_cpu_kernels", sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
    except Exception as error:  # no compiler, no ninja, an old compiler without AVX512-BF16, ...
        reason = f"llava's CPU kernels could not be built: {str(error).strip().splitlines()[-1][:300]}"
        logger.warning("llava: %s; quantized layers use PyTorch's kernels", reason)
        return reason
    return None
