"""oneDNN's CPU linear for inference: on the model's own weights, or on packed copies.

In fp32 on our 2-core AMD machines, oneDNN's linear (`mkldnn._linear_pointwise`, the op
Inductor emits for CPU linears) is about twice as fast as `F.linear` (MKL's GEMM) at every row
count: a decode step's matrix-vector products read the weights at twice MKL's speed, and a
512-token prefill's linears take half the time (benchmarks/README.md). So `linear` sends fp32
CPU products without autograd there; bf16's `F.linear` is oneDNN already.

oneDNN reads faster still from weights reordered once into its blocked layout
(`mkldnn._reorder_linear_weight`): 8 rows at 38 GB/s against 23 (fp32) and 32 against 18-20
(bf16), one bf16 row at 32 GB/s against 15; prefills gain 5-20% (benchmarks/README.md). The
packed copy is an opaque tensor beside the model's weights, so it doubles the language model's
weight memory: `WeightPacker` is opt-in (`Engine(pack_weights=True)`, `--pack-weights`), and
keeps one copy per weight across prefills, made again only when the weight changes.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

T = TypeVar("T")


@functools.cache
def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def onednn_dtypes() -> frozenset[torch.dtype]:
    """The dtypes whose CPU linears `linear` sends through oneDNN on unpacked weights: fp32.
    (bf16's `F.linear` is oneDNN already: routing it measured no faster.)"""
    return frozenset({torch.float32}) if onednn_available() else frozenset()


@functools.cache
def native_bf16() -> bool:
    """Whether oneDNN has bf16 instructions here (AVX512_BF16 or AMX; elsewhere it emulates bf16)."""
    return onednn_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@functools.cache
def amx() -> bool:
    """Whether the CPU has AMX tiles: oneDNN's bf16 and int8 GEMMs, and Inductor's GEMM templates, run
    on them several times faster than on AVX-512."""
    return torch.cpu._is_amx_tile_supported()


@functools.cache
def packable_dtypes() -> frozenset[torch.dtype]:
    """The dtypes whose CPU weights oneDNN can pack here: fp32, and bf16 where it is native."""
    if not onednn_available():
        return frozenset()
    return frozenset({torch.float32, torch.bfloat16} if native_bf16() else {torch.float32})


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, except that CPU products in `onednn_dtypes()` that need no gradient take oneDNN."""
    if (x.device.type == "cpu" and x.dtype in onednn_dtypes() and weight.dtype == x.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def cpu_linear_path(dtype: torch.dtype, packed: bool = False) -> str:
    """Which kernel the lean forward's plain CPU linears use in `dtype`, for benchmarks to print
    (without oneDNN, `llava.generate.decoder` sends few fp32 rows as W @ x.T)."""
    isa = torch.backends.cpu.get_cpu_capability()
    if packed and dtype in packable_dtypes():
        return f"oneDNN linear, packed weights ({isa})"
    if dtype in onednn_dtypes():
        return f"oneDNN linear ({isa})"
    return "W @ x.T (MKL)" if dtype == torch.float32 else "F.linear"


@torch.library.custom_op("llava::onednn_linear", mutates_args=())
def compiled_linear(x: torch.Tensor, weight: torch.Tensor, out_features: int, bias: torch.Tensor | None
                    ) -> torch.Tensor:
    """oneDNN's linear on a plain or packed weight, as an op `torch.compile` keeps whole (Inductor
    lowers `mkldnn._linear_pointwise` only on weights it packed itself). Inference only."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@compiled_linear.register_fake
def _compiled_linear_shape(x: torch.Tensor, weight: torch.Tensor, out_features: int,
                           bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


@dataclass(frozen=True, slots=True)
class PackedLinear:
    """Plain CPU linears that read one input, as one oneDNN product on a packed copy of their weights
    (`packed`: opaque, no strides, no autograd). One linear, or several stacked (q/k/v, gate/up), the
    output being theirs side by side: one kernel call instead of two or three, and a wider product
    that oneDNN blocks better (bench-200m's layers, 8 bf16 rows, 5.46 -> 4.93 ms a step; one row
    4.71 -> 4.07; AVX-512 EPYC, benchmarks/README.md). `parts` are the linears' own (weight, bias):
    for calls that need gradients, and for the compiled step's one row."""

    packed: torch.Tensor
    parts: tuple[tuple[torch.Tensor, torch.Tensor | None], ...]
    bias: torch.Tensor | None  # the parts' biases, concatenated where there are several

    @property
    def out_features(self) -> int:
        return sum(weight.shape[0] for weight, _ in self.parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w, _ in self.parts))
        if wants_grad or x.dtype != self.packed.dtype:
            return side_by_side([F.linear(x, weight, bias) for weight, bias in self.parts])
        if torch.compiler.is_compiling():
            return compiled_linear(x, self.packed, self.out_features, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def side_by_side(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Linears' outputs concatenated on the last axis (one output as itself, not copied)."""
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


class WeightPacker:
    """Packed copies of CPU linear weights, made once per weight and remade when it changes
    (another tensor after a cast or move, or an in-place update that bumps its version).

    `plain=False` packs only the quantized layers that pack themselves: where a compiled step's
    frozen graphs prepack the plain weights their own way (`llava.generate.compiled.AUTOTUNED`), a
    copy here would only add memory (a bf16 prefill gains nothing from it: 512 tokens of bench-200m,
    0.139 s packed against 0.124).
    """

    def __init__(self, plain: bool = True) -> None:
        self.plain = plain
        self._copies: dict[tuple[int, ...], tuple[tuple[weakref.ref, ...], tuple, object]] = {}

    def part(self, module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """`module` on a packed copy of its weight, or None when it cannot be packed here: an
        `nn.Linear` as a `PackedLinear`; a quantized layer that packs itself (`packed_weight()`,
        `on_packed(copy)`: `llava.model.int8_dynamic`) as what `on_packed` returns."""
        own = type(module) is nn.Linear
        if (own and not self._packable(module)) or (not own and not callable(getattr(module, "packed_weight", None))):
            return None
        make = (lambda: torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None)) if own \
            else module.packed_weight
        packed = self._copy((module.weight,), make)
        if packed is None:
            return None
        return PackedLinear(packed, ((module.weight, module.bias),), module.bias) if own else module.on_packed(packed)

    def fused(self, modules: Sequence[nn.Module]) -> PackedLinear | None:
        """Plain linears that read the same input as one `PackedLinear` (one packed copy of their
        weights stacked, in place of a copy each), or None where any cannot be packed here."""
        if not all(type(m) is nn.Linear and self._packable(m) for m in modules):
            return None
        first = modules[0]
        if any(m.in_features != first.in_features or m.weight.dtype != first.weight.dtype
               or (m.bias is None) != (first.bias is None) for m in modules):
            return None
        weights = tuple(m.weight for m in modules)
        biases = () if first.bias is None else tuple(m.bias for m in modules)

        def stack() -> tuple[torch.Tensor, torch.Tensor | None]:
            packed = torch.ops.mkldnn._reorder_linear_weight(torch.cat([w.detach() for w in weights]), None)
            return packed, torch.cat([b.detach() for b in biases]) if biases else None

        packed, bias = self._copy(weights + biases, stack)  # the biases' copy is kept with the weights'
        return PackedLinear(packed, tuple((m.weight, m.bias) for m in modules), bias)

    def _packable(self, linear: nn.Linear) -> bool:
        weight = linear.weight
        return (self.plain and weight.device.type == "cpu" and weight.dtype in packable_dtypes()
                and (linear.bias is None or linear.bias.dtype == weight.dtype))

    def _copy(self, sources: tuple[torch.Tensor, ...], make: Callable[[], T | None]) -> T | None:
        """What `make` copies from `sources` (a packed weight; stacked, with the biases' concatenation),
        kept until one of them changes."""
        key = tuple(id(t) for t in sources)
        state = tuple((t._version, t.data_ptr(), t.dtype, t.shape) for t in sources)  # `.to()` keeps the Parameter
        held = self._copies.get(key)
        if held is None or any(ref() is not t for ref, t in zip(held[0], sources)) or held[1] != state:
            with torch.no_grad():
                copy = make()
            if copy is None:
                return None
            held = (tuple(weakref.ref(t) for t in sources), state, copy)
            self._copies[key] = held
        return held[2]

    def forget_dead(self) -> None:
        """Drop the copies of weights that no longer exist (modules replaced or freed since)."""
        for key in [k for k, (refs, _, _) in self._copies.items() if any(ref() is None for ref in refs)]:
            del self._copies[key]

    @property
    def nbytes(self) -> int:
        """Bytes the packed copies take (what packing adds to the model's own weights)."""
        return sum(ref().numel() * ref().element_size() for refs, _, _ in self._copies.values() for ref in refs
                   if ref() is not None)
