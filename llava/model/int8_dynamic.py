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
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from llava.model.woq import check_cpu, quantize_rows, same_input, share_rows


class Int8DynamicLinear(nn.Module):
    """int8 weights [out, in] with fp32 per-row scales; activations quantized per row at each call."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        # Float bits as integers, so a model-wide `.to(dtype)` cannot round them (llava.model.woq).
        self.register_buffer("scale_bits", scale.float().view(torch.int32))
        self.register_buffer("bias", bias)

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
        return cls(share_rows(parts, "weight"), share_rows(parts, "scale_bits").view(torch.float32),
                   share_rows(parts, "bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        row_scale = rows.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
        codes = (rows / row_scale).round().to(torch.int8)
        product = torch._int_mm(codes, self.weight.t())  # the transposed view: oneDNN's fast one-row path
        out = (product.float() * row_scale * self.scale).to(x.dtype).reshape(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
