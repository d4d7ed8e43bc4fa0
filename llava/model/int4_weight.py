"""Weight-only 4-bit linears for CPU decoding: asymmetric in groups of 32 inputs (a scale and a zero
per group, as llama.cpp's q4_1), activations left in the model's dtype.

Two layouts, chosen when a layer is quantized, by what multiplies it on this CPU:
- llava's row-block layout (`pack_row_blocks`), wherever llava's VNNI kernel runs
  (`llava.model.cpu_kernels`): the kernel takes the activations as int8 codes per group of 32, as
  llama.cpp's q4_0 takes q8_0 ones (~1% of each output, where the 4-bit weights cost ~8%). Each 16
  output rows are one stream of codes with their scales beside them, unpacked by one AND and one
  shift (cpu_kernels.cpp; Zen 5 EPYC, bench-1b's layers at one row 42 GB/s against 35 from ATen's
  int4pack bytes). Without AMX it takes every row count, a prefill's too, as llama.cpp multiplies
  q4_0 by q8_0 there (bench-200m's layers at 512 rows: faster than the dequantized bf16 GEMM). With
  AMX, whose bf16 GEMM is several times AVX-512's, more than `FEW_ROWS` rows dequantize the blocks in
  one pass and take that GEMM.
- PyTorch's CPU int4pack layout (`aten._convert_weight_to_int4pack_for_cpu`) elsewhere: few rows
  through `aten._weight_int4pack_mm_for_cpu` (bf16 activations; ~40x slower with fp32 ones), many
  rows read the codes back, dequantize and take a GEMM. Its layout depends on the CPU (blocks of 64
  output rows on AVX-512, 32 on AVX2), so each layer checks at quantization that reading its codes
  back gives them exactly, and keeps ATen's kernel for every row count where it does not.

Inductor's GEMM templates (`llava.generate.compiled.AUTOTUNED`) read the int4pack layout, but on the
AMX Xeon they ran int4 batches of 8 at 2.4x one row (session 36: bound by unpacking the codes), where
llava's kernel runs them at 4-5x on AVX-512 alone; so CPUs with AMX take the row blocks too.

The layer is CPU-only, and its outputs come back in the input's dtype. Scales are stored as
integer bits (in the packed bytes, or as int16), so a model-wide `.to(dtype)` leaves them alone.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from llava.model import cpu_kernels, onednn
from llava.model.woq import FEW_ROWS, check_cpu, finish, prefill_dtype, same_input, share_rows

INT4_GROUP = 32
ROW_BLOCK = 16  # output rows a block of llava's layout
INT4_PACKED_BLOCKS = (64, 32)  # ATen's blocks of output rows: AVX-512, AVX2


class Int4WeightOnlyLinear(nn.Module):
    """4-bit weights: `packed` in llava's row-block layout, uint8 [out / 16, in / 32, 320] with the
    scales inside, or in ATen's int4pack layout beside bf16 (scale, zero) [in / 32, out, 2]."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor | None, bias: torch.Tensor | None,
                 in_features: int, out_features: int, packed_block: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.row_blocks = scales_and_zeros is None  # llava's layout: the scales are in `packed`
        self.packed_block = packed_block  # int4pack's rows per block if `_unpack_int4pack` reads it back
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros_bits", None if self.row_blocks else scales_and_zeros.view(torch.int16))
        self.register_buffer("bias", bias)
        self.native = packed.device.type == "cpu" and cpu_kernels.available()  # llava's kernels run here
        # Rows up to which the kernel runs, more dequantizing for a GEMM (None: every count): row blocks, all
        # but on AMX; int4pack, FEW_ROWS where `_unpack_int4pack` reads its codes back.
        if self.row_blocks:
            self.kernel_rows = FEW_ROWS if onednn.amx() else None
        else:
            self.kernel_rows = None if packed_block is None else FEW_ROWS

    @property
    def scales_and_zeros(self) -> torch.Tensor:
        """bf16 (scale, zero) [in / 32, out, 2] (a copy, for llava's layout)."""
        if not self.row_blocks:
            return self.scales_and_zeros_bits.view(torch.bfloat16)
        pairs = self.packed[..., 4 * 64:].view(torch.bfloat16).unflatten(-1, (ROW_BLOCK, 2))  # [out/16, G, 16, 2]
        return pairs.permute(1, 0, 2, 3).reshape(self.in_features // INT4_GROUP, self.out_features, 2)

    @staticmethod
    def fits(linear: nn.Linear) -> bool:
        return linear.in_features % INT4_GROUP == 0 and linear.out_features % ROW_BLOCK == 0

    @staticmethod
    def row_blocks_here() -> bool:
        """Whether layers quantized here take llava's layout (where its kernel runs)."""
        return cpu_kernels.available()

    @classmethod
    def from_linear(cls, linear: nn.Linear, row_blocks: bool | None = None) -> "Int4WeightOnlyLinear":
        """`linear` quantized; `row_blocks` picks the layout (None: `row_blocks_here()`)."""
        check_cpu(linear, "int4-weight")
        out_features, in_features = linear.weight.shape
        if not cls.fits(linear):
            raise ValueError(f"int4-weight needs in_features divisible by {INT4_GROUP} and out_features by "
                             f"{ROW_BLOCK} (the kernels' packing), got {in_features} -> {out_features}")
        groups = linear.weight.detach().float().view(out_features, in_features // INT4_GROUP, INT4_GROUP)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-12)
        codes = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
        codes = codes.view(out_features, in_features)
        # (code - 8) * scale + zero is the weight, so zero is the value of code 8.
        scales_and_zeros = torch.stack((scale, low + 8 * scale), -1).transpose(0, 1).contiguous().bfloat16()
        bias = None if linear.bias is None else linear.bias.detach().clone()
        if row_blocks if row_blocks is not None else cls.row_blocks_here():
            return cls(pack_row_blocks(codes, scales_and_zeros), None, bias, in_features, out_features)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        block = next((b for b in INT4_PACKED_BLOCKS if packed.dtype == torch.uint8 and out_features % b == 0
                      and torch.equal(_unpack_int4pack(packed, out_features, b), codes)), None)
        return cls(packed, scales_and_zeros, bias, in_features, out_features, block)

    @classmethod
    def concatenated(cls, parts: Sequence["Int4WeightOnlyLinear"]) -> "Int4WeightOnlyLinear | None":
        """One layer whose output is `parts`' outputs side by side (`llava.model.woq.fuse_outputs`).
        Both layouts store whole blocks of output rows one after another, so where every part is in
        the same layout (and, for int4pack, whole blocks of it), its bytes simply follow the previous
        part's; a layout this cannot read is not fused."""
        first = parts[0]
        if not same_input(parts) or any(p.row_blocks != first.row_blocks for p in parts):
            return None
        out_features = sum(p.out_features for p in parts)
        if first.row_blocks:
            return cls(share_rows(parts, "packed"), None, share_rows(parts, "bias"), first.in_features, out_features)
        block = first.packed_block
        if block is None or any(p.packed_block != block or p.out_features % block for p in parts):
            return None
        scales = torch.cat([p.scales_and_zeros for p in parts], dim=1)  # [groups, out, 2]: small, copied
        return cls(share_rows(parts, "packed"), scales, share_rows(parts, "bias"), first.in_features, out_features,
                   block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.kernel_rows is None or flat.shape[0] <= self.kernel_rows:
            return self.few_rows_product(x)
        compute = prefill_dtype(x)
        if self.row_blocks and compute == torch.bfloat16:  # one pass over the bytes, ~8x `dequantized`'s speed
            transposed = torch.ops.llava_cpu.int4_dequantize_t(self.packed)
            return finish(flat.to(compute) @ transposed, x, self.bias)
        return finish(onednn.linear(flat.to(compute), self.dequantized(compute)), x, self.bias)

    def few_rows_product(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T: llava's VNNI kernel in its layout (`llava.model.cpu_kernels`: the activations as
        int8 codes per group of 32), else ATen's (`kernel_product`)."""
        if not self.row_blocks:
            return self.kernel_product(x)
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        return finish(torch.ops.llava_cpu.int4_weight_mm(flat, self.packed), x, self.bias)

    def kernel_product(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T through `aten._weight_int4pack_mm_for_cpu` (bf16 activations): the form Inductor's GEMM
        templates replace in a frozen graph (`llava.generate.compiled.AUTOTUNED`); row blocks keep llava's
        kernel there."""
        if self.row_blocks:
            return self.few_rows_product(x)
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, INT4_GROUP, self.scales_and_zeros)
        return finish(out, x, self.bias)

    def codes(self) -> torch.Tensor:
        """The 4-bit codes, uint8 [out, in] (int4pack: needs `packed_block`)."""
        if self.row_blocks:
            return _unpack_row_blocks(self.packed, self.out_features, self.in_features)
        return _unpack_int4pack(self.packed, self.out_features, self.packed_block)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight, [out, in], in `dtype`."""
        scale, zero = self.scales_and_zeros.to(dtype).permute(2, 1, 0).unsqueeze(-1)  # each [out, groups, 1]
        grouped = self.codes().view(self.out_features, -1, INT4_GROUP).to(dtype)
        return ((grouped - 8) * scale + zero).view(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        layout = "row blocks" if self.row_blocks else f"int4pack (blocks of {self.packed_block})"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"layout={layout}")


def pack_row_blocks(codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """llava's layout (cpu_kernels.cpp, `int4_weight_mm`) of codes uint8 [out, in] and bf16 (scale, zero)
    [in / 32, out, 2]: per block of 16 output rows and group of 32 inputs, four 64-byte vectors whose
    dword r holds row r's codes of 8 columns (byte j: column j low, column 4 + j high), then the 16
    rows' pairs; uint8 [out / 16, in / 32, 320]."""
    out_features, in_features = codes.shape
    eights = codes.view(out_features // ROW_BLOCK, ROW_BLOCK, in_features // 8, 2, 4)
    nibbles = eights[..., 0, :] | (eights[..., 1, :] << 4)  # [blocks, 16, in / 8, 4]
    vectors = nibbles.permute(0, 2, 1, 3).reshape(out_features // ROW_BLOCK, in_features // INT4_GROUP, 4 * 64)
    pairs = scales_and_zeros.contiguous().view(torch.uint8).view(in_features // INT4_GROUP, -1, 4 * ROW_BLOCK)
    return torch.cat((vectors, pairs.transpose(0, 1)), -1)


def _unpack_row_blocks(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    vectors = packed[..., :4 * 64].unflatten(-1, (4, ROW_BLOCK, 4))  # [blocks, groups, vector, row, byte]
    eights = torch.stack((vectors & 15, vectors >> 4), -2)  # [blocks, groups, vector, row, half, byte]
    return eights.permute(0, 3, 1, 2, 4, 5).reshape(out_features, in_features)


def _unpack_int4pack(packed: torch.Tensor, out_features: int, block: int) -> torch.Tensor:
    """Codes [out, in] from ATen's blocked packing: per block of `block` output rows and per input
    column, `block / 2` bytes whose low nibbles are the block's first half of rows, high the rest."""
    in_features = packed.numel() * 2 // out_features
    pairs = packed.view(out_features // block, in_features, block // 2)
    return torch.cat((pairs & 15, pairs >> 4), -1).transpose(1, 2).reshape(out_features, in_features)
