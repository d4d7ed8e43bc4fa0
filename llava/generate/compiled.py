"""The lean forward's decode step, compiled over a static KV cache (gpt-fast's recipe).

Batch-1 decoding on a CPU is a memory-bandwidth problem: every weight is read once per
token. MKL's matrix-vector products read weights at 11-16 GB/s on our 2-core machines
whatever the thread count, oneDNN's at 15-30 (fp32) and 10-15 (bf16) on unpacked weights,
while the memory gives 32-48 GB/s. Written as a multiply-and-sum (`gemv`) inside a compiled
graph, Inductor emits one vectorised loop per matrix that streams its rows across the threads
at 26-41 GB/s (benchmarks/README.md). So the one-row step computes plain CPU linears that way,
attention by llava's kernel where it runs (`native_attention`), else as two matrix products and a
softmax in fp32 (`attend_one_row`: Inductor fuses them; `scaled_dot_product_attention`'s CPU
kernel took 70 us a layer for one fp32 query row and 175 in bf16, a quarter of a bf16 step), and
everything else (norms, rotary, quantized layers) as the eager lean forward does (where quantized
q/k/v and gate/up run as one layer each: `llava.model.woq.fuse_outputs`, two kernel calls instead
of five a layer). With `pack_weights` the one-row step still reads the plain weights: oneDNN on
packed bf16 weights, called from the graph, decoded bench-200m at 107-110 tokens/s against the
reduction's 129-144, as the op boundary keeps the norm that feeds each linear out of its loop.

Batches take the same step, with their linears on oneDNN (`decode_linear`; packed copies
through the `llava::onednn_linear` op, and int8-dynamic layers' through oneDNN's packed int8
kernel, `llava::packed_int8_product`, when the engine packs weights): at 8 rows the
reductions re-read each weight row per input row and ran ~3x slower than a GEMM. Compiled, a
batch of 8 loses the eager forward's per-op overhead (bench-200m, bf16: 400 -> 630 tokens/s, 800
with packed weights; int8-dynamic 840 -> 1080 with packed weights). A quantized or bf16 model
whose engine packs weights compiles a second, frozen graph through Inductor's autotuned GEMM
templates instead (`AUTOTUNED`: batches of weight-only layers everywhere; one row, int8-dynamic
layers and bf16 ones, where the CPU has AMX). Batches compile once, with the batch dimension
symbolic from the first, so one graph serves every batch size as rows join and leave (one row has
its own: its forms differ).

The graph is compiled once for every answer: the step writes its keys and values at a column
given as a tensor (`index_copy_` into the whole cache), and attends over the filled columns
only, a slice whose length, like the cache's capacity, is symbolic from the first compilation
(`maybe_mark_dynamic`), with an additive mask from the rows' padding. Attending over the whole
capacity instead cost a fixed share of every step (batch 8, int4, a 256-column cache about 100
full: 142 us a layer for attention, 121 sliced). Compiling bench-200m takes 20-60 s on 2 cores,
once per process (Inductor caches kernels on disk).
"""

from __future__ import annotations

import types
from typing import Callable

import torch
import torch.nn.functional as F

from llava.generate.decoder import (
    NATIVE_ATTENTION_DTYPES,
    KVCache,
    Linear,
    LlamaFamilyDecoder,
    _linear_part,
    _rms_norm,
    attend_natively,
    native_attention,
    plan_layers,
    rotary_tables,
    rotate,
)
from llava.model.int8_dynamic import Int8DynamicLinear
from llava.model.onednn import PackedLinear, amx, compiled_linear, onednn_dtypes, side_by_side
from llava.model.quantize import WEIGHT_ONLY

ONEDNN_DTYPES = onednn_dtypes()  # read once, outside any graph (Dynamo cannot trace the check)
AMX = amx()  # where Inductor's int8/bf16 GEMM templates have AMX micro-kernels


def gemv(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight.T (+ bias), as a multiply-and-sum over the input axis in fp32.

    Laid out [out, rows, in] so the generated loop walks the weight once, row by row.
    """
    rows = x.reshape(-1, x.shape[-1])
    out = (weight.float().unsqueeze(1) * rows.float().unsqueeze(0)).sum(-1).t().to(x.dtype)
    out = out.reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias


def attend_one_row(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Attention of one query row per head over a static cache: q [B, kv_heads, group, dim] against
    keys/values [B, kv_heads, capacity, dim], `mask` additive. Written out, in fp32 (as SDPA's CPU
    kernel accumulates), for Inductor to fuse into loops over the cache (module docstring)."""
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * scale + mask
    return torch.matmul(torch.softmax(scores, -1), values.float()).to(q.dtype)


# Inductor's options for the step. By default Inductor does not store a cheap pointwise result read at
# most 4 times (`realize_reads_threshold`) but recomputes it inside each loop that reads it, so the
# RMS norm feeding a one-row matrix product written as a reduction was recomputed for every output
# row: int8-weight's loop over int32 words reads its row as 4 slices, and plain q, k and v (`gemv`)
# read one norm 3 times. Threshold 1 stores any result read more than once. bench-200m, one row,
# 2-core Xeon with AMX, interleaved, without -> with: int8-weight 73.7 -> 87.1 tokens/s (75.8 -> 91.3
# in another run), fp32 53.9 -> 55.5 (it reads at the full bandwidth either way), int8-dynamic 81.9 ->
# 83.4, bf16 72.4 -> 69.9 (71.6 -> 78.9 in another run: noise), int4 188 -> 192; batches within noise.
STEP_OPTIONS = {"realize_reads_threshold": 1}

# Inductor's options for the step of a quantized or bf16 model where the engine packs weights (memory for
# speed; `templated_layers` says which). With frozen weights and max-autotune, Inductor times its own C++ GEMM
# templates (AMX or AVX-512 micro-kernels reading bf16, int8 or int4 weights, prepacked at compile time) against
# ATen's kernel for each shape and keeps the faster; its x86 int8 pass also turns int8-dynamic's `_int_mm` and
# rescale into a quantized linear for them. Freezing is set around the call: torch.compile's `options` reach
# Inductor after the choice to freeze is made.
#
# bench-200m, 2-core Xeon with AMX, interleaved, tokens/s, own forms -> templates:
#   batch 8: int4 459 -> 613, int8-weight 293 -> 622, int8-dynamic 452 -> 635 (its packed oneDNN kernel),
#            bf16 387 -> 540 (oneDNN on packed copies);
#   one row: int4 128 -> 162, int8-weight 78 -> 123, int8-dynamic 65 -> 115, bf16 74 -> 87 (the reduction).
# The cost: compiling takes 30-120 s more, and each frozen graph (one row, batches) holds its own prepacked
# weights, up to about a copy of the language model's. Resident memory beyond the model's own, unpacked -> here:
# int4 122 -> 178 MB, int8-dynamic 114 -> 398, int8-weight 125 -> 587, bf16 325 (its packed copy) -> 509
# (benchmarks/README.md). The engine then packs no plain weights of its own (`WeightPacker(plain=False)`).
#
# int8-weight layers take their kernel form at one row too (`decode_linear(templates=True)`): freezing folds
# everything computed from weights alone, so the fp32 word loop would read the weight converted to fp32 (79 -> 53
# tokens/s). One row, int8-dynamic and bf16 take this graph only where the CPU has AMX (`one_row_templates`): on
# the AVX-512 EPYC without AMX, one row, own forms -> this graph (interleaved, tokens/s): int4 365 -> 370,
# int8-weight 324 -> 243, int8-dynamic 345 -> 44 (autotuning's choices: Inductor's reference micro-kernel, qlinear),
# bf16 240 -> 99 (session 39, benchmarks/README.md). Batches of weight-only layers take it everywhere: autotuning
# keeps ATen's kernel where that is faster (there, `_weight_int8pack_mm` for every shape at 8 rows).
AUTOTUNED = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


def templated_layers(lm: torch.nn.Module) -> bool:
    """Whether `lm` has layers that Inductor's GEMM templates take (`AUTOTUNED`): weight-only int8/int4
    (`llava.model.woq`, `llava.model.int4_weight`) everywhere (int4 in llava's row blocks keeps its own
    kernel inside that graph); int8-dynamic layers, and plain bf16 CPU linears, where the CPU has AMX."""
    return any(_templated(module) for module in lm.modules())


def _templated(module: torch.nn.Module) -> bool:
    if isinstance(module, tuple(WEIGHT_ONLY.values())):
        return True
    if not AMX:
        return False
    plain_bf16 = (type(module) is torch.nn.Linear and module.weight.dtype == torch.bfloat16
                  and module.weight.device.type == "cpu")
    return plain_bf16 or isinstance(module, Int8DynamicLinear)


def _own_code(method: types.MethodType) -> Callable:
    """`method` rebuilt on a copy of its code object. torch.compile keeps compiled graphs, and
    counts them against `recompile_limit` (8), per code object: engines compiling the one shared
    `_step` (a graph or three each: one row, batches) would exhaust it together, and every engine
    after that would decode eagerly without a word (seen in a benchmark with eight of them)."""
    function = method.__func__
    copy = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)
    return types.MethodType(copy, method.__self__)


def decode_linear(part: Linear, x: torch.Tensor, templates: bool = False) -> torch.Tensor:
    """A planned linear inside the compiled step. One row: plain CPU weights (packed ones too: the
    reduction reads them faster, module docstring) as `gemv`. More rows: oneDNN's linear, on the
    packed copy where there is one. Quantized layers run as themselves (they pick their own forms).
    Under Inductor's templates (`AUTOTUNED`) weight-only layers take their few-row kernels: where the
    CPU has AMX, ATen's, which the templates replace (int4 in llava's row blocks keeps llava's kernel);
    elsewhere llava's AVX512-BF16 ones where they run (`llava.model.cpu_kernels`: about twice the rate
    of ATen's at 8 rows). Plain ones take
    `F.linear` on the frozen weight, at any row count. A packed product (one linear or several
    stacked) runs whole for batches only."""
    one_row = x.numel() == x.shape[-1]
    if templates and isinstance(part, (*WEIGHT_ONLY.values(), Int8DynamicLinear)):
        return part.kernel_product(x) if AMX else part.few_rows_product(x)
    if isinstance(part, PackedLinear) and (templates or one_row):  # its parts, each as a plain linear
        return side_by_side([decode_linear(weight_bias, x, templates) for weight_bias in part.parts])
    if templates and isinstance(part, tuple):  # the frozen weight: a template prepacks it
        return F.linear(x, *part)
    if not isinstance(part, tuple):
        return part(x)
    weight, bias = part
    if x.device.type != "cpu":
        return F.linear(x, weight, bias)
    if one_row:
        return gemv(weight, bias, x)
    if x.dtype in ONEDNN_DTYPES:  # what `onednn.linear` chooses eagerly (its checks do not trace)
        return compiled_linear(x, weight, weight.shape[0], bias)
    return F.linear(x, weight, bias)


class CompiledDecoder:
    """`step` runs one token per row through a `KVCache` like `LlamaFamilyDecoder.forward`, compiled.

    The layers are planned once, here: the compiled graph belongs to the model as it was when
    the engine was made (a model cast, quantized or given adapters later needs a new Engine).
    """

    def __init__(self, decoder: LlamaFamilyDecoder, templates: bool | None = None) -> None:
        """`templates`: compile through Inductor's GEMM templates too (`AUTOTUNED`); by default where the
        decoder packs weights and has layers they take. The engine decides it once, for its packer too."""
        self.decoder = decoder
        self._compiled = torch.compile(_own_code(self._step), dynamic=None, options=STEP_OPTIONS)
        self._autotuned = None  # the step, frozen, through Inductor's GEMM templates (`AUTOTUNED`)
        self.one_row_templates = AMX  # one row takes that graph too (`AUTOTUNED` says where it was measured)
        if templates is None:
            templates = decoder.packer is not None and templated_layers(decoder.lm)
        if templates:
            self._autotuned = torch.compile(_own_code(self._step), dynamic=None,
                                            options={**STEP_OPTIONS, **AUTOTUNED})
        self.layers = plan_layers(decoder.lm, decoder.packer)
        # llava's attention kernel where it runs (decided here: the first call is traced; the cache's dtype is
        # checked there); the cache is made where the model's weights are.
        self.native_attention = native_attention(next(decoder.lm.parameters()).device, decoder.head_dim)
        for plan in self.layers:  # q/k/v and gate/up come fused where they can be (`plan_layers`)
            called = ("o", "down") + (("qkv",) if plan.qkv is not None else ("q", "k", "v")) + (
                ("gate_up",) if plan.gate_up is not None else ("gate", "up"))
            for name in called:
                setattr(plan, name, self._for_batches(getattr(plan, name)))
        self.head = self._for_batches(_linear_part(decoder.lm.get_output_embeddings(), decoder.packer))

    def _for_batches(self, part: Linear | None) -> Linear | None:
        """A quantized layer with a packed copy for batches, where the engine packs weights and the
        layer packs (`llava.model.int8_dynamic`) but Inductor's templates do not take it (they prepack
        their own); its parts' own copies would only add memory, so only the layers the step calls
        are packed (after fusing)."""
        packer = self.decoder.packer
        if packer is None or self._autotuned is not None or not isinstance(part, torch.nn.Module):  # plain: planned
            return part
        return packer.part(part) or part

    def step(self, token_ids: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor,
             cache: KVCache, column: int) -> torch.Tensor:
        """Token ids [B, 1] at rotary positions [B, 1], written at cache column `column`; `key_mask`
        [B, capacity] marks the real columns (1) up to `column` at least. Returns [B, V] logits."""
        # Inference tensors whoever made them (sampled tokens are not): a graph guards on the dispatch keys
        # of its inputs, so a plain tensor in the place of an inference one would compile the step again.
        if not (token_ids.is_inference() and position_ids.is_inference()):
            with torch.inference_mode():
                token_ids, position_ids = token_ids.clone(), position_ids.clone()
        where = torch.tensor([column], device=token_ids.device)
        filled = key_mask[:, :column + 1]  # the columns attended: a symbolic length in the graph
        torch._dynamo.maybe_mark_dynamic(filled, 1)
        for tensor in (*cache.keys, *cache.values):  # and any capacity: one graph for every answer's cache
            torch._dynamo.maybe_mark_dynamic(tensor, 2)
        if token_ids.shape[0] > 1:  # a symbolic batch from the first: one graph for every batch size
            for tensor in (token_ids, position_ids, filled, *cache.keys, *cache.values):
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        args = (token_ids, position_ids, filled, where, cache.keys, cache.values)
        if self._autotuned is None or (token_ids.shape[0] == 1 and not self.one_row_templates):
            return self._compiled(*args, templates=False)
        with torch._inductor.config.patch(freezing=True):  # read before `options` apply (`AUTOTUNED`)
            return self._autotuned(*args, templates=True)

    def _step(self, token_ids: torch.Tensor, position_ids: torch.Tensor, filled: torch.Tensor,
              column: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
              templates: bool) -> torch.Tensor:
        dec = self.decoder
        body = dec.lm.model
        hidden = dec.lm.get_input_embeddings()(token_ids)
        batch, span = filled.shape  # the row mask of columns 0..column
        rotary = rotary_tables(*body.rotary_emb(hidden, position_ids))
        native = self.native_attention and keys[0].dtype in NATIVE_ATTENTION_DTYPES
        mask = torch.zeros(filled.shape, dtype=torch.float32 if native else hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(filled == 0, float("-inf"))
        mask = mask if native else mask[:, None, None, :]
        heads, kv_heads, dim = dec.n_heads, dec.n_kv_heads, dec.head_dim
        for i, layer in enumerate(self.layers):
            x = _rms_norm(layer.input_norm, hidden)
            if layer.qkv is not None:
                qk, v = decode_linear(layer.qkv, x, templates).split(((heads + kv_heads) * dim, kv_heads * dim), -1)
            else:
                qk = torch.cat((decode_linear(layer.q, x, templates), decode_linear(layer.k, x, templates)), dim=-1)
                v = decode_linear(layer.v, x, templates)
            qk = rotate(qk.reshape(batch, 1, heads + kv_heads, dim).transpose(1, 2), *rotary)
            keys[i].index_copy_(2, column, qk[:, heads:].to(keys[i].dtype))
            values[i].index_copy_(2, column, v.reshape(batch, 1, kv_heads, dim).transpose(1, 2).to(values[i].dtype))
            q = qk[:, :heads].reshape(batch, kv_heads, heads // kv_heads, dim)  # heads sharing a KV head: one axis
            if native:  # the whole cache, read up to the mask's length
                out = attend_natively(q, keys[i], values[i], mask, dec.scale)
            else:
                out = attend_one_row(q, keys[i][:, :, :span], values[i][:, :, :span], mask, dec.scale)
            hidden = hidden + decode_linear(layer.o, out.reshape(batch, 1, heads * dim), templates)
            x = _rms_norm(layer.post_norm, hidden)
            if layer.gate_up is not None:
                gate, up = decode_linear(layer.gate_up, x, templates).chunk(2, dim=-1)
            else:
                gate, up = decode_linear(layer.gate, x, templates), decode_linear(layer.up, x, templates)
            gated = layer.act(gate) * up
            hidden = hidden + decode_linear(layer.down, gated, templates)
        last = _rms_norm(body.norm, hidden[:, -1])
        return decode_linear(self.head, last, templates).float()  # the same values; argmax over bf16 was 4x slower
