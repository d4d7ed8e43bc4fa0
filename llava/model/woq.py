"""Weight-only int8 linears for CPU decoding, and what the quantized CPU layers share (`finish`,
`fuse_outputs`, `share_rows`, ...); 4-bit ones are `llava.model.int4_weight`'s.

Decoding one token reads every language-model weight once, so on a CPU its speed is weight
bytes over memory bandwidth. These layers keep the weights small and leave the activations in
the model's dtype (unlike `llava.model.int8_dynamic`), computing with PyTorch's own packed CPU
kernels, or llava's where they run (`llava.model.cpu_kernels`).

`Int8WeightOnlyLinear`: symmetric int8, one fp32 scale per output row (llama.cpp's q8_0 has one
per 32 weights). Few rows go through llava's AVX512-BF16 kernel where the CPU has those
instructions (`llava.model.cpu_kernels`: about twice ATen's rate at 8 rows), else through
`aten._weight_int8pack_mm`, which reads the same int8 [out, in]; many rows (a prefill; past 128
where llava's kernel runs, 16 elsewhere) through a GEMM on the codes converted (exact in bf16)
and the scales applied to its product, several times faster than ATen's kernel there and faster
than llava's past ~128 rows: in bf16 where the CPU has bf16 instructions (the few-row kernel
takes bf16 activations too; a 512-row prefill's linears in 0.6 of fp32's time), else in the
model's dtype through `onednn.linear`. Where llava's kernel does not run, inside `torch.compile`
(the compiled decode step, `llava.generate.compiled`) one fp32 row takes a reduction over the
weight read as int32 words, which Inductor turns into one streaming loop at near memory
bandwidth; its columns are stored in the order that makes those words line up with contiguous
slices of the input (`_word_order`). A bf16 row keeps the kernel: Inductor's loop over bf16
inputs converts the words element by element (bench-200m, int8-weight on a bf16 model: 64
tokens/s that way, 210 with the kernel; on an fp32 model the loop's 240).

It is CPU-only. Outputs come back in the input's dtype, so an fp32 or bf16 model keeps its dtype
everywhere else. A linear whose shape a kernel cannot take (`fits`: in_features % 4 == 0; int4's
in its module) is left unquantized by `llava.model.quantize`, as torchao's configs leave such
layers. Scales are stored as integer views of their float bits: a model-wide `.to(dtype)` (a
loader's, a user's) casts floating buffers, which would round the fp32 scales to bf16.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from llava.device import return_freed_memory
from llava.model import cpu_kernels, onednn

FEW_ROWS = 16  # up to this many rows use ATen's packed matrix-vector kernels; more rows dequantize
# Up to this many rows int8-weight takes llava's kernel where it runs. Zen 5 EPYC, bench-200m's layers,
# kernel against the dequantized bf16 GEMM: 64 rows 0.35-0.82 ms against 0.49-1.17; 128 rows 0.68-1.40
# against 0.70-1.64; 256 rows 1.42-2.77 against 1.14-9.4.
NATIVE_INT8_ROWS = 128


def _word_order(in_features: int) -> torch.Tensor:
    """Stored column c holds input column order[c]: byte k of int32 word j (little-endian, as on
    every CPU torch runs on) is column k * (in/4) + j, so the word's k-th byte multiplies the
    contiguous input slice x[k * in/4 : (k + 1) * in/4]."""
    quarter = in_features // 4
    return torch.arange(in_features).view(4, quarter).t().reshape(-1)


class Int8WeightOnlyLinear(nn.Module):
    """int8 weights ([out, in], columns in `_word_order`), fp32 per-row scales, optional bias."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 order: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("scale_bits", scale.float().view(torch.int32))  # float bits (module docstring)
        # The few-row kernel's bf16 scales, kept: computed in a compiled graph, Inductor cannot lower it.
        self.register_buffer("kernel_scale_bits", scale.bfloat16().view(torch.int16), persistent=False)
        self.register_buffer("bias", bias)
        self.register_buffer("order", order, persistent=False)
        # Decided here, not at the first call: that may come while torch.compile traces the step.
        self.native = weight.device.type == "cpu" and cpu_kernels.available()

    @property
    def scale(self) -> torch.Tensor:
        return self.scale_bits.view(torch.float32)

    @staticmethod
    def fits(linear: nn.Linear) -> bool:
        return linear.in_features % 4 == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8WeightOnlyLinear":
        check_cpu(linear, "int8-weight")
        if not cls.fits(linear):
            raise ValueError(f"int8-weight needs in_features divisible by 4, got {linear.in_features}")
        quantized, scale = quantize_rows(linear.weight.detach())
        order = _word_order(linear.in_features)
        quantized = quantized[:, order].contiguous()
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(quantized, scale, bias, order)

    @classmethod
    def concatenated(cls, parts: Sequence["Int8WeightOnlyLinear"]) -> "Int8WeightOnlyLinear | None":
        """One layer whose output is `parts`' outputs side by side (`fuse_outputs`)."""
        if not same_input(parts):
            return None
        return cls(share_rows(parts, "weight"), share_rows(parts, "scale_bits").view(torch.float32),
                   share_rows(parts, "bias"), parts[0].order)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in the model's column order, in `dtype`."""
        weight = torch.empty(self.weight.shape, dtype=dtype, device=self.weight.device)
        weight[:, self.order] = (self.weight.float() * self.scale[:, None]).to(dtype)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > (NATIVE_INT8_ROWS if self.native else FEW_ROWS):
            # The input's columns put in the stored order: cheaper than scattering W's. The codes are exact in
            # bf16, and the scales are applied to the product: at 512 rows a quarter to a third of the time of
            # scaling the weight in fp32 first on bench-1b's gate/up (29 ms against 95), and more accurate.
            compute = prefill_dtype(x)
            out = onednn.linear(self._in_stored_order(x, compute), self.weight.to(compute)) * self.scale
        elif torch.compiler.is_compiling() and rows == 1 and x.dtype == torch.float32 and not self.native:
            # More rows re-read the weight per row; a bf16 input makes Inductor tile the loop 32 wide,
            # where its int32 -> float conversion goes element by element (6 GB/s against 44). Where
            # llava's kernel runs it is faster still: bench-200m, one row, 288 -> 329 tokens/s (session 40).
            out = self._word_reduction(x.reshape(rows, -1)).reshape(*x.shape[:-1], -1)
        else:
            return self.few_rows_product(x)
        return finish(out, x, self.bias)

    def _in_stored_order(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x [..., in] with its columns in the stored order, in `dtype`. `_word_order` transposes
        [4, in / 4], so this is a strided view converted, then copied: for 512 rows of 768 inputs,
        0.09 ms against 0.28 gathered by index (whose 3-d `index_select` took 1.4)."""
        return x.unflatten(-1, (4, self.in_features // 4)).transpose(-1, -2).to(dtype).flatten(-2)

    def few_rows_product(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T for a few rows: llava's AVX512-BF16 kernel where it runs (`llava.model.cpu_kernels`:
        at 8 rows about twice ATen's rate), else ATen's (`kernel_product`)."""
        if not self.native:
            return self.kernel_product(x)
        stored = self._in_stored_order(x.reshape(-1, x.shape[-1]), torch.bfloat16)
        return finish(torch.ops.llava_cpu.int8_weight_mm(stored, self.weight, self.scale), x, self.bias)

    def kernel_product(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T through `aten._weight_int8pack_mm` whatever the rows (bf16 activations): the form
        Inductor's GEMM templates replace in a frozen graph (`llava.generate.compiled.AUTOTUNED`)."""
        stored = self._in_stored_order(x.reshape(-1, x.shape[-1]), torch.bfloat16)
        out = torch.ops.aten._weight_int8pack_mm(stored, self.weight, self.kernel_scale_bits.view(torch.bfloat16))
        return finish(out, x, self.bias)

    def _word_reduction(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, in] -> [rows, out] as one reduction over int32 words (written for Inductor, which
        fuses it into a single pass over the weight; eager it would materialise four matrices)."""
        words = self.weight.view(torch.int32)  # [out, in / 4]
        parts = x.float().view(x.shape[0], 4, -1)
        acc = None
        for k in range(4):
            signed_byte = ((words << (24 - 8 * k)) >> 24).float()
            term = (signed_byte * parts[:, k, None, :]).sum(-1)
            acc = term if acc is None else acc + term
        return (acc * self.scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def finish(out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A kernel's [rows, out] result as a layer's output for x [..., in]: x's dtype and leading
    dimensions, plus the bias."""
    out = out.to(x.dtype).reshape(*x.shape[:-1], -1)
    return out if bias is None else out + bias.to(out.dtype)


def prefill_dtype(x: torch.Tensor) -> torch.dtype:
    """What a dequantized prefill multiplies in: bf16 for fp32 inputs where the CPU has bf16
    instructions (about 0.6 of fp32's time), else the input's dtype."""
    return torch.bfloat16 if x.dtype == torch.float32 and onednn.native_bf16() else x.dtype


def quantize_rows(weight: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one fp32 scale per row: (int8 [rows, cols], scale [rows]).

    A few rows at a time, so a quantizing load's peak memory holds one weight, not its fp32
    temporaries too (an lm_head's would be several times the int8 result)."""
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], chunk):
        rows = weight[start:start + chunk].float()
        low, high = rows.aminmax(dim=1)
        part = torch.maximum(-low, high).clamp(min=1e-12) / 127
        scale[start:start + chunk] = part
        codes[start:start + chunk] = (rows / part[:, None]).round_().clamp_(-127, 127)
    return codes, scale


def same_input(parts: Sequence[nn.Module]) -> bool:
    """Whether `parts` (two or more layers of one type) read the same input size and all or none has a bias."""
    return (len(parts) > 1 and len({type(p) for p in parts}) == 1 and len({p.in_features for p in parts}) == 1
            and len({p.bias is None for p in parts}) == 1)


def share_rows(parts: Sequence[nn.Module], name: str) -> torch.Tensor | None:
    """Buffer `name` of every part stacked along its first axis, each part's own buffer becoming a
    view of its rows: the fused layer costs no second copy of the weights."""
    buffers = [getattr(p, name) for p in parts]
    if buffers[0] is None:
        return None
    if _consecutive_views(buffers):  # fused before (another engine on this model): the same rows again
        first = buffers[0]
        shape = (sum(b.shape[0] for b in buffers), *first.shape[1:])
        return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), shape)
    whole = torch.cat(buffers)
    start = 0
    for part, buffer in zip(parts, buffers):
        setattr(part, name, whole[start:start + buffer.shape[0]])
        start += buffer.shape[0]
    del buffer, buffers
    return_freed_memory()  # the parts' old copies, just freed
    return whole


def _consecutive_views(buffers: Sequence[torch.Tensor]) -> bool:
    """Whether the buffers are contiguous views that follow each other in one storage."""
    storage = buffers[0].untyped_storage().data_ptr()
    return all(b.is_contiguous() and b.untyped_storage().data_ptr() == storage for b in buffers) and all(
        b.storage_offset() == a.storage_offset() + a.numel() for a, b in zip(buffers, buffers[1:]))


def fuse_outputs(parts: Sequence[nn.Module]) -> nn.Module | None:
    """One quantized layer computing `torch.cat([p(x) for p in parts], -1)`, or None where the
    parts cannot be fused (different kinds or inputs, a bias on some only, a layout unknown).

    Why: a decode step spends ~10 us a kernel call beside the kernel itself; q/k/v and gate/up
    as two calls instead of five save ~0.4 ms of a ~4 ms 4-bit bench-200m step. The parts keep
    working as before, on views of the fused layer's buffers.
    """
    concatenated = getattr(type(parts[0]), "concatenated", None)  # it checks the parts (`same_input`)
    return concatenated(parts) if concatenated is not None else None


def check_cpu(linear: nn.Linear, mode: str) -> None:
    if linear.weight.device.type != "cpu":
        raise ValueError(f"{mode} quantization uses PyTorch's packed CPU kernels, but the model is on "
                         f"{linear.weight.device}; use bnb-8bit / bnb-4bit on a GPU")
