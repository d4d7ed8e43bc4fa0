"""int8 weights times int8 activations on the CPU: `torch._int_mm` (oneDNN, VNNI where the CPU has it).

The "int8-dynamic" quantization mode. Weights are symmetric int8 with one scale per output row;
each input row is quantized on the fly, symmetric int8 with one scale per row, and the integer
product is rescaled by both. That is torch.ao's dynamic int8 (which this replaces: it is
deprecated, fp32-only, and quantizes weights and activations per tensor, on 7 bits for the
activations) with finer scales, and llama.cpp's q8_0 way of multiplying (int8 x int8), with
coarser ones (q8_0 scales every 32 values).

Why it exists beside `Int8WeightOnlyLinear`: oneDNN's int8 matrix-vector product reads the
weights at 23-37 GB/s on our 2-core machines (bench-200m's linears, one row), against ~20 for
the weight-only kernel and the compiled word reduction, so compiled one-row decoding is ~1.25x
faster (at llama.cpp's q8_0 speed); a 512-row prefill's linears take about half of a bf16 GEMM's
time. The price is accuracy: rounding each activation row to 255 levels adds noise that the
weight-only mode does not have (greedy agreement with fp32 on the bundled model is the same, 78%
over 32 tokens, but on random weights the first token already differs; benchmarks/README.md).

One code path serves every row count, eager and inside `torch.compile` (Inductor fuses the
activation quantization and the rescale around the `_int_mm` call). Any shape works.

Batches of a few rows read the weights badly through `_int_mm` (8 rows: ~16 GB/s against ~44
for one row; bench-200m's linears, 2 AVX-512 VNNI cores). So 2-16 rows take llava's VNNI kernel
where it runs (`llava.model.cpu_kernels`: the plain weight, the codes shifted by 128 as unsigned
bytes, the shift's product subtracted through each weight row's sum: the same exact integers).
Elsewhere, oneDNN's quantized linear on a weight it has reordered (`onednn.qlinear_prepack`, the
kernel PyTorch's x86 int8 inference path uses) reads them at ~30 GB/s from 2 to 8 rows, but not
faster for one row (34) nor for hundreds, so `packed_weight()` makes that copy for the compiled
step's batches (`Engine(pack_weights=True)`, as for float weights). It takes the same unsigned
activations, the shift's product subtracted by oneDNN (exact where the CPU multiplies u8 x s8 into
32 bits, VNNI; on AVX2 alone pairs of such products saturate 16 bits, so there it declines:
checked once).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from llava.model import cpu_kernels
from llava.model.woq import FEW_ROWS, check_cpu, finish, quantize_rows, same_input, share_rows


class Int8DynamicLinear(nn.Module):
    """int8 weights [out, in] with fp32 per-row scales; activations quantized per row at each call."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 weight_sums: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        # Float bits as integers, so a model-wide `.to(dtype)` cannot round them (llava.model.woq).
        self.register_buffer("scale_bits", scale.float().view(torch.int32))
        self.register_buffer("bias", bias)
        # Few rows take llava's VNNI kernel where it runs (module docstring); decided here, not at the
        # first call, which may come while torch.compile traces. It takes the codes + 128 as unsigned
        # bytes and subtracts 128 * each weight row's sum.
        self.native = weight.device.type == "cpu" and cpu_kernels.available()
        if weight_sums is None and self.native:
            weight_sums = weight.sum(1, dtype=torch.int32)
        self.register_buffer("weight_sums", weight_sums, persistent=False)

    @property
    def scale(self) -> torch.Tensor:
        return self.scale_bits.view(torch.float32)

    @staticmethod
    def fits(linear: nn.Linear) -> bool:
        return True

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8DynamicLinear":
        check_cpu(linear, "int8-dynamic")
        weight, scale = quantize_rows(linear.weight.detach())
        return cls(weight, scale, None if linear.bias is None else linear.bias.detach().clone())

    @classmethod
    def concatenated(cls, parts: Sequence["Int8DynamicLinear"]) -> "Int8DynamicLinear | None":
        """One layer whose output is `parts`' outputs side by side (`llava.model.woq.fuse_outputs`)."""
        if not same_input(parts):
            return None
        sums = share_rows(parts, "weight_sums") if all(p.weight_sums is not None for p in parts) else None
        return cls(share_rows(parts, "weight"), share_rows(parts, "scale_bits").view(torch.float32),
                   share_rows(parts, "bias"), sums)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.native and 1 < rows <= FEW_ROWS:
            return self.few_rows_product(x)
        return self.kernel_product(x)

    def kernel_product(self, x: torch.Tensor) -> torch.Tensor:
        """The `_int_mm` form: one row's fast path, a prefill's GEMM, and what Inductor's x86 int8 pass
        turns into its GEMM templates (`llava.generate.compiled.AUTOTUNED`)."""
        codes, row_scale = _row_codes(x)
        product = torch._int_mm(codes.to(torch.int8), self.weight.t())  # the transposed view: the fast one-row path
        return finish(product.float() * row_scale * self.scale, x, self.bias)

    def few_rows_product(self, x: torch.Tensor) -> torch.Tensor:
        """A few rows through llava's VNNI kernel where it runs (`llava.model.cpu_kernels`): the same
        integer products as `kernel_product`'s, which serves elsewhere."""
        if not self.native:
            return self.kernel_product(x)
        codes, row_scale = _row_codes(x)
        product = torch.ops.llava_cpu.int8_codes_mm((codes + 128).to(torch.uint8), self.weight, self.weight_sums)
        return finish(product.float() * row_scale * self.scale, x, self.bias)

    def packed_weight(self) -> torch.Tensor | None:
        """The weight reordered by oneDNN for batches (module docstring), or None where this CPU's
        oneDNN does not multiply unsigned activations exactly, or where llava's kernel takes the
        batches (it reads the plain weight faster: a copy would only add memory).
        `llava.model.onednn.WeightPacker` keeps it; `on_packed` uses it."""
        if self.weight.device.type != "cpu" or self.native or not exact_unsigned_product():
            return None
        return torch.ops.onednn.qlinear_prepack(self.weight, None)

    def on_packed(self, packed: torch.Tensor) -> "PackedInt8DynamicLinear":
        return PackedInt8DynamicLinear(self, packed, torch.zeros(self.out_features, dtype=torch.int64))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _row_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x's rows as integer codes in -127..127 (held in fp32) and their per-row scales."""
    rows = x.reshape(-1, x.shape[-1]).float()
    row_scale = rows.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
    return (rows / row_scale).round(), row_scale


@dataclass(frozen=True, slots=True)
class PackedInt8DynamicLinear:
    """An `Int8DynamicLinear` whose weight oneDNN has also reordered: one row goes through the
    layer itself (`_int_mm` reads faster there), more through `packed_int8_product`."""

    module: Int8DynamicLinear
    packed: torch.Tensor
    zero_points: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1]:
            return self.module(x)
        codes, row_scale = _row_codes(x)
        product = packed_int8_product((codes + 128).to(torch.uint8), self.packed, self.module.scale, self.zero_points)
        return finish(product * row_scale, x, self.module.bias)


@torch.library.custom_op("llava::packed_int8_product", mutates_args=())
def packed_int8_product(codes: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor,
                        zero_points: torch.Tensor) -> torch.Tensor:
    """(codes - 128) [rows, in] @ weight.T * weight_scale in fp32, `packed` the weight reordered by
    `onednn.qlinear_prepack`; an op `torch.compile` keeps whole (it cannot trace the opaque copy)."""
    return torch.ops.onednn.qlinear_pointwise(codes, 1.0, 128, packed, weight_scale, zero_points, None, 1.0, 0,
                                              torch.float32, "none", [], "")


@packed_int8_product.register_fake
def _packed_int8_product_shape(codes: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor,
                               zero_points: torch.Tensor) -> torch.Tensor:
    return codes.new_empty(codes.shape[0], weight_scale.shape[0], dtype=torch.float32)


@functools.cache
def exact_unsigned_product() -> bool:
    """Whether oneDNN's quantized linear gives `_int_mm`'s exact products for the largest codes
    (255 x +-127 in every pair of a row, where 16-bit pair sums would saturate)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")):
        return False
    weight = torch.tensor([[127] * 64, [-127] * 64, [127, -127] * 32, [-127, 127] * 32], dtype=torch.int8)
    codes = torch.tensor([[255] * 64, [1] * 64, [255, 1] * 32], dtype=torch.uint8)
    try:
        packed = torch.ops.onednn.qlinear_prepack(weight, None)
        got = packed_int8_product(codes, packed, torch.ones(4), torch.zeros(4, dtype=torch.int64))
    except RuntimeError:
        return False
    want = torch._int_mm((codes.int() - 128).to(torch.int8), weight.t()).float()
    return torch.equal(got, want)
