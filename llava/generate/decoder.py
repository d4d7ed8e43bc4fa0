"""A lean forward for Llama-family language models (Llama, Mistral, Qwen2) with a preallocated KV cache.

Why it exists: on a small model each decode step costs Python and dispatch time, and
transformers' forward spends most of it on work a left-padded decode loop does not need
(mask construction for every layout, cache-class bookkeeping, output containers). This
forward keeps only the arithmetic. It runs the model's own submodules (norms, projections,
the rotary embedding), so its weights, dtype and quantized linears are the model's, and only
the attention plumbing and the cache are ours. Like gpt-fast it writes keys and values into
a cache allocated once per batch, and a step attends over the filled columns only.

One CPU-specific choice: a decode step's linears (up to 16 rows) are matrix-vector products,
bound by how fast the weights stream from memory; fp32 ones take oneDNN's linear, and with
`pack_weights` every plain CPU linear reads oneDNN-packed copies of the weights
(`llava.model.onednn` says why and what it costs). Without oneDNN, few fp32 rows of a large
weight go as `W @ x.T`, several times faster than `x @ W.T` with MKL on AVX2 machines (lm_head
at 8 rows: 11 ms against 42 ms).

`unsupported_reason` says when a model needs transformers' own forward instead (another
architecture, or a sliding window shorter than the context the batch needs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llava.model import cpu_kernels
from llava.model.onednn import PackedLinear, WeightPacker, onednn_dtypes
from llava.model.onednn import linear as onednn_or_f_linear
from llava.model.woq import fuse_outputs

FAMILIES = ("llama", "mistral", "qwen2")
FEW_ROWS = 16  # without oneDNN, up to this many fp32 rows (a decode step) go as W @ x.T ...
SKINNY_MIN_WEIGHT = 1 << 18  # ... for a weight this large (elements)


@dataclass
class KVCache:
    """Per-layer key and value tensors [B, kv_heads, capacity, head_dim]; columns fill left to right."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def row_view(self, rows: slice) -> "KVCache":
        """These batch rows as views: a forward over them writes into this cache (chunked prefill)."""
        return KVCache([k[rows] for k in self.keys], [v[rows] for v in self.values])

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only these batch rows (finished rows leave the batch)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]


NATIVE_ATTENTION_DTYPES = (torch.float32, torch.bfloat16)  # caches llava's decode-attention kernel reads


def native_attention(device: torch.device, head_dim: int, build: bool = True) -> bool:
    """Whether llava's decode-attention kernel (`llava.model.cpu_kernels`) attends one new row over a cache
    here (one in `NATIVE_ATTENTION_DTYPES`): on CPUs where the kernels run, for the head sizes it was built
    for; with `build=False` only if something in this process has built them already. Bench-200m, bf16
    cache, ~100 columns: in the compiled step Inductor's loops over `attend_one_row` take 115 us a layer at
    8 rows and 20 at one row, the kernel 50-75 and ~10. Eager, where SDPA first converts a bf16 cache to the
    model's dtype, decoding is 3-8% faster with it (bench-200m and the bundled model, batches of 1 and 8):
    too little for the eager default path to build the kernels (~10 s, once per machine) for it alone."""
    if device.type != "cpu" or head_dim not in (16, 32, 64, 80, 96, 128):
        return False
    return cpu_kernels.available() if build else cpu_kernels.loaded()


def attend_natively(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, additive: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """One new query row per head, q [B, kv_heads, group, dim], over the whole cache read up to the
    additive fp32 mask's length [B, span], through llava's kernel (`native_attention`); q's dtype."""
    return torch.ops.llava_cpu.decode_attention(q.float(), keys, values, additive, scale).to(q.dtype)


# A CPU prompt's queries attend in chunks of this many, each to the keys up to its last query, where the prompt
# is at most PROMPT_CHUNKED long: PyTorch's CPU flash kernel takes keys in blocks of 512, so below ~1024 it
# computes (and masks) the whole square. Zen 5 EPYC, 12 heads of 64, a layer, SDPA whole -> chunked: 512 tokens
# fp32 4.6 -> 3.4 ms, bf16 4.8 -> 3.7; 1024 tokens 13.3 -> 12.0, 13.8 -> 12.9; 2048 43 -> 45, 45 -> 49.
QUERY_CHUNK = 128
PROMPT_CHUNKED = 1024


def prompt_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                     scale: float, gqa: bool) -> torch.Tensor:
    """SDPA for a prompt's queries q [B, H, T, D] at the last T of the key columns [B, KV, S, D], under
    the additive `mask` [B, 1, T, S], or causal where it is None (then S == T)."""
    length, span = q.shape[2], keys.shape[2]
    if q.device.type != "cpu" or length <= QUERY_CHUNK or length > PROMPT_CHUNKED:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale,
                                              is_causal=mask is None, enable_gqa=gqa)
    chunks = []
    for first in range(0, length, QUERY_CHUNK):
        last = min(first + QUERY_CHUNK, length)
        end = span - length + last  # the chunk's last query sees no key after its own column
        if mask is None:
            rows = torch.ones(last - first, end, dtype=torch.bool, device=q.device).tril(first)
        else:
            rows = mask[:, :, first:last, :end]
        chunks.append(F.scaled_dot_product_attention(q[:, :, first:last], keys[:, :, :end], values[:, :, :end],
                                                     attn_mask=rows, scale=scale, enable_gqa=gqa))
    return torch.cat(chunks, dim=2)


def unsupported_reason(lm: nn.Module, capacity: int | None = None) -> str | None:
    """None when `LlamaFamilyDecoder` computes exactly what `lm`'s own forward does, else why not."""
    config = lm.config
    if config.model_type not in FAMILIES:
        return f"model_type {config.model_type!r} is not one of {', '.join(FAMILIES)}"
    body = getattr(lm, "model", None)
    if body is None or not all(hasattr(body, a) for a in ("layers", "norm", "rotary_emb")):
        return "the language model does not have the model.layers / model.norm / model.rotary_emb layout"
    window = _sliding_window(config)
    if window is not None and (capacity is None or capacity > window):
        return f"a sliding window of {window} tokens is shorter than the {capacity or 'unbounded'} tokens needed"
    return None


def _sliding_window(config) -> int | None:
    """The attention window in tokens, or None: Mistral's `sliding_window`, Qwen2's when enabled."""
    window = getattr(config, "sliding_window", None)
    if not window or (config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False)):
        return None
    return int(window)


Linear = tuple[torch.Tensor, torch.Tensor | None] | PackedLinear | nn.Module | Callable  # LayerPlan


@dataclass(slots=True)
class LayerPlan:
    """One decoder layer's parts, read off the model at prefill so a decode step does no module lookups.

    A plain nn.Linear is kept as its (weight, bias), or as a `PackedLinear` when packing; anything
    else (int8, bitsandbytes, LoRA) as the module, whose own forward then runs (in the compiled
    step, an int8-dynamic layer may be its packed form: `CompiledDecoder._for_batches`). q/k/v
    and gate/up run as one product each (`qkv`, `gate_up`) where they can (`_fused_part`): plain
    ones when packing, quantized ones of one kind always. The parts stay planned too (the compiled
    step's one row reads plain weights).
    """

    input_norm: nn.Module
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    post_norm: nn.Module
    gate: Linear
    up: Linear
    down: Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    qkv: Linear | None = None  # q, k and v as one packed product, or quantized layer (the compiled step's)
    gate_up: Linear | None = None  # gate and up, likewise


def _linear_part(module: nn.Module, packer: WeightPacker | None = None) -> Linear:
    if type(module) is not nn.Linear:
        return module
    packed = packer.part(module) if packer is not None else None
    return packed if packed is not None else (module.weight, module.bias)


def _activation(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return F.silu if type(module).__name__ in ("SiLU", "SiLUActivation") else module


def _fused_part(modules: tuple[nn.Module, ...], packer: WeightPacker | None) -> Linear | None:
    """Linears that read one input as one product: plain ones when packing (one packed copy of their
    weights stacked), quantized ones always (`fuse_outputs`: views of their own buffers, no copy).
    One product in place of two or three: fewer kernel calls a step, and a prefill dequantizes and
    reorders its input once for q/k/v and once for gate/up, not per part."""
    if packer is not None and (fused := packer.fused(modules)) is not None:
        return fused
    return fuse_outputs(modules) if all(type(m) is not nn.Linear for m in modules) else None


def plan_layers(lm: nn.Module, packer: WeightPacker | None = None) -> list[LayerPlan]:
    plans = []
    for layer in lm.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = _fused_part((attn.q_proj, attn.k_proj, attn.v_proj), packer)
        gate_up = _fused_part((mlp.gate_proj, mlp.up_proj), packer)
        q, k, v = (_linear_part(m, None if qkv else packer) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        gate, up = (_linear_part(m, None if gate_up else packer) for m in (mlp.gate_proj, mlp.up_proj))
        o, down = (_linear_part(m, packer) for m in (attn.o_proj, mlp.down_proj))
        plans.append(LayerPlan(layer.input_layernorm, q, k, v, o, layer.post_attention_layernorm, gate, up, down,
                               _activation(mlp.act_fn), qkv, gate_up))
    return plans


def _linear(part: Linear, x: torch.Tensor) -> torch.Tensor:
    """x through a planned linear: fp32 CPU ones take oneDNN, or without it W @ x.T for few rows
    (module docstring)."""
    if not isinstance(part, tuple):
        return part(x)
    weight, bias = part
    rows = x.numel() // x.shape[-1]
    if (1 < rows <= FEW_ROWS and x.dtype == torch.float32 and x.dtype not in onednn_dtypes()
            and x.device.type == "cpu" and weight.numel() >= SKINNY_MIN_WEIGHT):
        out = torch.mm(weight, x.reshape(rows, -1).t()).t().reshape(*x.shape[:-1], -1)
        return out if bias is None else out + bias
    return onednn_or_f_linear(x, weight, bias)


def _rms_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm. In fp32 (where HF's upcast is a no-op) it is rewritten as five ops:
    the module's eight cost ~3x as much on a tiny model, where every op is dispatch time."""
    eps = getattr(module, "variance_epsilon", None)
    if x.dtype != torch.float32 or eps is None:
        return module(x)
    inverse_rms = torch.rsqrt(torch.add(_scalar(eps, x), (x * x).sum(-1, keepdim=True), alpha=1.0 / x.shape[-1]))
    return x * inverse_rms * module.weight


_SCALARS: dict[tuple[float, torch.device], torch.Tensor] = {}


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """A cached 0-d fp32 tensor (adding a Python float wraps it in a new tensor on every call)."""
    key = (value, like.device)
    if key not in _SCALARS:
        _SCALARS[key] = torch.tensor(value, dtype=torch.float32, device=like.device)
    return _SCALARS[key]


def rotary_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin), [B, 1, T, D] each, so that `rotate(x)` equals transformers'
    `x * cos + rotate_half(x) * sin`: rotate_half(x) * sin = swap_halves(x) * cat(-sin1, sin2).
    The sign is folded in once per forward instead of a negation per layer."""
    half = cos.shape[-1] // 2
    return cos.unsqueeze(1), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(1)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * signed_sin


class LlamaFamilyDecoder:
    """Forward passes of a Llama/Mistral/Qwen2 causal LM over a `KVCache`, returning last-position logits."""

    def __init__(self, lm: nn.Module, pack_weights: bool = False, pack_plain: bool = True) -> None:
        reason = unsupported_reason(lm, capacity=1)
        if reason is not None:
            raise ValueError(f"LlamaFamilyDecoder cannot run this model: {reason}")
        config = lm.config
        self.lm = lm
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.scale = self.head_dim**-0.5
        self.packer = WeightPacker(plain=pack_plain) if pack_weights else None
        self._plan()

    def _plan(self) -> None:
        """Read the layers and the output head off the model as it is now."""
        if self.packer is not None:
            self.layers, self.head = [], None  # the old plan holds the old weights alive
            self.packer.forget_dead()
        self.layers = plan_layers(self.lm, self.packer)
        self.head = _linear_part(self.lm.get_output_embeddings(), self.packer)

    def new_cache(self, batch: int, capacity: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        shape = (batch, self.n_kv_heads, capacity, self.head_dim)
        return KVCache([torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers],
                       [torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers])

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(token_ids)

    def forward(self, embeds: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor | None,
                cache: KVCache, start: int) -> torch.Tensor:
        """Run T new positions (embeds [B, T, H]) written at cache columns start..start+T-1.

        `key_mask` [B, >= start+T] marks real (1) and padding (0) columns, None when no row is
        padded (the mask then costs nothing); position ids [B, T] are the rows' rotary
        positions. Returns the last position's logits, [B, V]. A forward from column 0 (a
        prefill) first re-reads the layers, so a model cast, moved, quantized or given
        adapters since the last prefill is seen as it is now.
        """
        if start == 0:
            self._plan()
        body = self.lm.model
        length = embeds.shape[1]
        end = start + length
        rotary = rotary_tables(*body.rotary_emb(embeds, position_ids))
        mask = self._attention_mask(key_mask, start, length, embeds)
        native = (length == 1 and cache.keys[0].dtype in NATIVE_ATTENTION_DTYPES
                  and native_attention(embeds.device, self.head_dim, build=False))
        if native:  # one row through llava's kernel, which takes the mask as [B, end] fp32
            mask = (mask.reshape(-1, end).float() if mask is not None
                    else torch.zeros(embeds.shape[0], end, device=embeds.device))
        hidden = embeds
        for i, layer in enumerate(self.layers):
            x = _rms_norm(layer.input_norm, hidden)
            hidden = hidden + self._attention(layer, x, rotary, mask, cache, i, start, end, native)
            x = _rms_norm(layer.post_norm, hidden)
            if layer.gate_up is not None:
                gate, up = _linear(layer.gate_up, x).chunk(2, dim=-1)
            else:
                gate, up = _linear(layer.gate, x), _linear(layer.up, x)
            hidden = hidden + _linear(layer.down, layer.act(gate) * up)
        last = _rms_norm(body.norm, hidden[:, -1])
        return _linear(self.head, last)

    @staticmethod
    def _attention_mask(key_mask: torch.Tensor | None, start: int, length: int,
                        like: torch.Tensor) -> torch.Tensor | None:
        """Additive [B, 1, T, start+T] mask (0 or -inf), or None for causal attention without padding.

        Real keys at or before each query are visible; a padding query also sees itself (an
        all-masked row would make softmax NaN, and NaN keys poison later layers even when
        masked). Decoding without padding and a prefill from column 0 need no mask at all.
        """
        end = start + length
        if key_mask is None and (length == 1 or start == 0):
            return None
        device = like.device
        keys = (key_mask[:, :end].bool() if key_mask is not None
                else torch.ones((1, end), dtype=torch.bool, device=device))[:, None, None, :]
        if length > 1:
            q = torch.arange(start, end, device=device)[:, None]
            k = torch.arange(end, device=device)[None, :]
            keys = (keys & (k <= q)) | (k == q)
        return torch.zeros(keys.shape, dtype=like.dtype, device=device).masked_fill_(~keys, float("-inf"))

    def _attention(self, layer: LayerPlan, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                   mask: torch.Tensor | None, cache: KVCache, i: int, start: int, end: int,
                   native: bool) -> torch.Tensor:
        batch, length, _ = x.shape
        heads, kv_heads, dim = self.n_heads, self.n_kv_heads, self.head_dim
        if layer.qkv is not None:
            qk, v = _linear(layer.qkv, x).split(((heads + kv_heads) * dim, kv_heads * dim), dim=-1)
        else:
            qk, v = torch.cat((_linear(layer.q, x), _linear(layer.k, x)), dim=-1), _linear(layer.v, x)
        qk = rotate(qk.reshape(batch, length, heads + kv_heads, dim).transpose(1, 2), *rotary)  # [B, H+KV, T, D]
        cache.keys[i][:, :, start:end] = qk[:, heads:]
        cache.values[i][:, :, start:end] = v.reshape(batch, length, kv_heads, dim).transpose(1, 2)
        q = qk[:, :heads]
        group = heads // kv_heads
        if native:  # llava's kernel (`forward` decides, and shapes its mask): the cache read in its own dtype
            out = attend_natively(q.reshape(batch, kv_heads, group, dim), cache.keys[i], cache.values[i], mask,
                                  self.scale)
            return _linear(layer.o, out.reshape(batch, 1, heads * dim))
        keys, values = cache.keys[i][:, :, :end], cache.values[i][:, :, :end]
        if keys.dtype != x.dtype:  # a cache kept in another dtype (Engine's kv_cache_dtype)
            keys, values = keys.to(x.dtype), values.to(x.dtype)
        if length == 1:
            # One query per row: fold the heads that share a KV head into the query axis (no repeat).
            out = F.scaled_dot_product_attention(q.reshape(batch, kv_heads, group, dim), keys, values,
                                                 attn_mask=mask, scale=self.scale)
        else:
            out = prompt_attention(q, keys, values, mask, self.scale, gqa=group > 1)
        return _linear(layer.o, out.reshape(batch, heads, length, dim).transpose(1, 2).reshape(batch, length, -1))
