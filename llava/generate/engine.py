"""Batched LLaVA generation: one prefill over merged image+text embeddings, then a lean decode loop.

The shape follows gpt-fast: `prefill` and `decode_step` are separate functions, and the
per-token work outside the model is kept to one sampled-id read per step. Two forwards are
swappable under the loop: the lean one (`llava.generate.decoder`: the model's own modules
over a preallocated KV cache, for Llama, Mistral and Qwen2) and transformers' public
forward (`inputs_embeds`, `attention_mask`, `position_ids`, `cache`, `logits_to_keep`),
which serves every other causal LM. Both run in any dtype and with quantized linears.
`compile=True` compiles the lean forward's decode step, one row or a batch (`llava.generate.compiled`),
or transformers' decode step over its static cache for other models.

Batching uses left padding: every row's last prompt token sits in the same column, so one
`logits_to_keep=1` prefill gives each row's next-token logits, and position ids come from
the attention mask so padding never shifts a row's rotary positions.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import Cache

from llava.errors import ContextTooLong, InputError  # ContextTooLong re-exported: raised here
from llava.generate.compiled import CompiledDecoder, templated_layers
from llava.generate.decoder import KVCache, LlamaFamilyDecoder, unsupported_reason
from llava.generate.detokenize import RowText
from llava.generate.sampling import SamplingParams, make_generator, sample
from llava.model.llava import LlavaModel, positions_from_mask

__all__ = ["SamplingParams", "Request", "Completion", "ContextTooLong", "DecodeState", "Engine"]

CACHE_KINDS = ("dynamic", "static")
FORWARDS = ("auto", "lean", "transformers")
# Prefill (tower and language model) runs at most this many tokens per forward on these devices.
# On a 2-core CPU, 16 bench-200m questions (400-token prompts, 197-token images) prefilled in one
# forward took 1.7x as long as in row chunks (benchmarks/README.md): the [rows, tokens, 3072] MLP
# activations outgrow the caches. GPUs want the whole batch at once, so they have no budget.
PREFILL_TOKEN_BUDGET = {"cpu": 1024}
CAPACITY_STEP = 128  # compiled decoding's caches come in multiples of this many columns (`Engine._capacity`)


@dataclass
class Request:
    """One prompt: token ids with image placeholders already expanded, and each image's features.

    The features come from `LlavaModel.encode_images`, computed once by the caller; the
    engine uses them only at prefill. Or the caller leaves the images as preprocessed pixels
    (`pixel_values`, `image_sizes`) and the engine encodes them at prefill, all of a batch's
    images in one tower pass.
    """

    input_ids: list[int]
    image_features: list[torch.Tensor] = field(default_factory=list)
    pixel_values: list[torch.Tensor] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Completion:
    """Generated ids and text; finish_reason is "stop" (stop string), "eos" or "length".

    `token_ids` excludes the EOS token; after a stop string it includes the tokens that
    formed it, while `text` is cut just before it.
    """

    token_ids: list[int]
    text: str
    finish_reason: str



@dataclass
class DecodeState:
    """What the decode loop carries between steps (all tensors on the model's device).

    `attention_mask` is allocated once for prompt + all new tokens, with the future columns
    already set to 1, so each step passes a view of it instead of building a new mask.
    """

    cache: Cache | KVCache  # KVCache on the lean forward
    attention_mask: torch.Tensor  # [B, capacity] long
    position_ids: torch.Tensor  # [B, 1] position of each row's next token
    length: int  # cache columns filled so far (same for every row: left padding)
    logits: torch.Tensor  # [B, V] next-token logits
    rows: list[int]  # request index of each batch row; rows leave as they finish (dynamic cache)
    padded: bool = True  # whether any row has padding columns (the lean forward skips the mask if not)


def cache_argument(lm: torch.nn.Module) -> str:
    """The LM's name for the KV-cache argument: `cache` in recent transformers 5 releases,
    `past_key_values` in earlier ones (a 5.17 install failed on `out.cache`)."""
    params = inspect.signature(lm.forward).parameters
    return "past_key_values" if "past_key_values" in params and "cache" not in params else "cache"


class Engine:
    """Generates for batches of `Request`s with a LLaVA model on whatever device/dtype it lives on.

    forward="auto" uses the lean forward when the language model is a Llama, Mistral or Qwen2
    (and the batch fits any sliding window), transformers' forward otherwise; "lean" insists
    (ValueError with the reason when it cannot), "transformers" never uses it. The cache
    options belong to transformers' forward: cache="static" preallocates its KV cache. The lean
    forward always preallocates. compile=True compiles the decode step: on the lean forward
    `CompiledDecoder`'s (one row and batches; prefills stay eager), on transformers' forward its
    step over the static cache (fixed shapes avoid recompiles). On a
    2-core CPU (benchmarks/README.md) the lean forward decodes the tiny model ~2.5x as fast as
    transformers' `generate` and batches of 8 at 200M ~2.3x as fast; compiling costs 20-60 s
    up front and lifts bench-200m's batch-1 decode 2-3x. pack_weights=True gives the lean
    forward's plain CPU linears oneDNN-packed copies of their weights (`llava.model.onednn`):
    faster prefills and batches (bench-200m's compiled batch of 8: fp32 ~1.5x, bf16 ~1.6x), at the cost
    of a second copy of the language model's weights. With compile=True, a quantized model's step
    compiles through Inductor's autotuned GEMM templates, each of its two graphs (one row, batches)
    prepacking its own copy (`compiled.AUTOTUNED`: batches of weight-only int8/int4 layers
    everywhere; one row, int8-dynamic layers and bf16 models, where the CPU has AMX; on an AMX
    Xeon, bench-200m: one row int8-dynamic ~1.8x, int8-weight ~1.6x, int4 ~1.25x, bf16 ~1.17x, 8 rows
    1.3-2x, for up to about a copy of the language model's weights per graph: `compiled.AUTOTUNED`
    gives the measured memory); without AMX int8-dynamic layers get a packed copy for batches
    instead (~1.3x at 8 rows; `llava.model.int8_dynamic`). Elsewhere it changes nothing.
    kv_cache_dtype (lean forward only; default the model's dtype) stores keys and values in
    another dtype: torch.bfloat16 halves what each decode step's attention reads, as llama.cpp
    keeps its cache in f16 under f32 weights (attention still computes in the model's dtype).
    """

    def __init__(self, model: LlavaModel, tokenizer, eos_token_ids: Sequence[int] | None = None,
                 context_length: int | None = None, cache: str = "dynamic", compile: bool = False,
                 forward: str = "auto", pack_weights: bool = False,
                 kv_cache_dtype: torch.dtype | None = None) -> None:
        if cache not in CACHE_KINDS:
            raise ValueError(f"unknown cache kind {cache!r}; valid: {', '.join(CACHE_KINDS)}")
        if forward not in FORWARDS:
            raise ValueError(f"unknown forward {forward!r}; valid: {', '.join(FORWARDS)}")
        self.model = model
        self.lm = model.language_model
        self.tokenizer = tokenizer
        self.context_length = int(context_length or model.config.context_length)
        self.eos_token_ids = frozenset(default_eos_ids(model, tokenizer) if eos_token_ids is None else eos_token_ids)
        self.cache_kind = "static" if compile else cache
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = 0 if pad is None or pad == model.config.image_token_index else int(pad)
        self.compiled = compile
        self.forward_kind = forward
        self._cache_arg = cache_argument(self.lm)
        self.lean: LlamaFamilyDecoder | None = None
        self.compiled_lean: CompiledDecoder | None = None
        if forward == "lean" or (forward == "auto" and (cache == "dynamic" or compile)):
            reason = unsupported_reason(self.lm, capacity=1)
            if reason is None:
                templated = compile and pack_weights and templated_layers(self.lm)  # they pack their own
                self.lean = LlamaFamilyDecoder(self.lm, pack_weights=pack_weights, pack_plain=not templated)
                self.compiled_lean = CompiledDecoder(self.lean, templates=templated) if compile else None
            elif forward == "lean":
                raise ValueError(f"the lean forward cannot run this language model: {reason}; use forward='auto'")
        if kv_cache_dtype is not None and self.lean is None:
            raise InputError("kv_cache_dtype applies to the lean forward's cache (Llama, Mistral, Qwen2 language "
                             f"models), which this engine does not use (forward={forward!r}, cache={cache!r})")
        self.kv_cache_dtype = kv_cache_dtype
        self._decode_forward: Callable[..., torch.Tensor] = self._forward_one
        if compile and self.lean is None:
            # torch's default shape policy: the first shape compiles static, a second one compiles a
            # dynamic graph that then serves every batch size and cache bucket without recompiling.
            self._decode_forward = torch.compile(self._forward_one)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # Checks ---------------------------------------------------------------------------------
    def check_context(self, request: Request) -> int:
        """Room left for new tokens; raises ContextTooLong when there is none (before any compute)."""
        n = len(request.input_ids)
        room = self.context_length - n
        if room < 1:
            n_image = sum(1 for t in request.input_ids if t == self.model.config.image_token_index)
            raise ContextTooLong(
                f"the prompt has {n} tokens ({n_image} of them image tokens, {n - n_image} text) but the model's "
                f"context length is {self.context_length}, which leaves no room for a new token; shorten the "
                f"text, use fewer or smaller images, or raise context_length if the model supports it")
        return room

    # Prefill -------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, requests: Sequence[Request], max_new_tokens: int | None = None) -> DecodeState:
        """Left-pad the batch, run one forward over the merged embeddings, keep last-position logits.

        `max_new_tokens` sizes the preallocated mask (and the static cache); by default the
        rest of the context.
        """
        if not requests:
            raise ValueError("prefill needs at least one request")
        rooms = [self.check_context(r) for r in requests]
        self.encode_pending(requests)
        lengths = [len(r.input_ids) for r in requests]
        prompt_len = max(lengths)
        capacity = self._capacity(prompt_len + (max_new_tokens if max_new_tokens is not None else max(rooms)))
        dev = self.device
        ids = torch.full((len(requests), prompt_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), capacity), dtype=torch.long)
        for b, (r, n) in enumerate(zip(requests, lengths)):
            ids[b, prompt_len - n:] = torch.tensor(r.input_ids, dtype=torch.long)
            mask[b, prompt_len - n:] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        features = [f for r in requests for f in r.image_features]  # placeholders are in row-major order
        embeds = self.model.embed(ids, features)
        positions = positions_from_mask(mask[:, :prompt_len])
        if self._lean_fits(capacity):
            cache = self.lean.new_cache(len(requests), capacity, dev, self.kv_cache_dtype or embeds.dtype)
            padded = min(lengths) < prompt_len
            logits = torch.cat([self.lean.forward(embeds[rows], positions[rows], mask[rows] if padded else None,
                                                  cache.row_view(rows), 0)
                                for rows in self._prefill_chunks(len(requests), prompt_len)])
            return DecodeState(cache=cache, attention_mask=mask, position_ids=positions[:, -1:] + 1,
                               length=prompt_len, logits=logits, rows=list(range(len(requests))), padded=padded)
        cache = self._new_cache(capacity)
        out = self.lm(inputs_embeds=embeds, attention_mask=self._mask_view(mask, prompt_len),
                      position_ids=positions, use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        # The cache object is filled in place; keeping our own reference works on every transformers 5.x.
        return DecodeState(cache=cache, attention_mask=mask, position_ids=positions[:, -1:] + 1,
                           length=prompt_len, logits=out.logits[:, -1], rows=list(range(len(requests))))

    def _prefill_chunks(self, batch: int, prompt_len: int) -> list[slice]:
        """Row ranges that each fit the device's prefill token budget (all rows at once without one)."""
        budget = PREFILL_TOKEN_BUDGET.get(self.device.type)
        step = batch if budget is None else max(1, budget // prompt_len)
        return [slice(i, min(i + step, batch)) for i in range(0, batch, step)]

    def encode_pending(self, requests: Sequence[Request]) -> None:
        """Encode the images that requests carry as pixels and keep the features: one tower pass for
        all of them, or one per group of requests within the device's prefill token budget."""
        pending = [r for r in requests if r.pixel_values]
        budget = PREFILL_TOKEN_BUDGET.get(self.device.type)
        tokens_per_crop = self.model.config.patches_per_side ** 2 + 1
        group: list[Request] = []
        for i, r in enumerate(pending):
            group.append(r)
            crops = sum(int(p.shape[0]) for q in group for p in q.pixel_values)
            following = pending[i + 1] if i + 1 < len(pending) else None
            if following is None or (budget is not None and (crops + sum(
                    int(p.shape[0]) for p in following.pixel_values)) * tokens_per_crop > budget):
                self._encode_group(group)
                group = []

    def _encode_group(self, requests: Sequence[Request]) -> None:
        features = self.model.encode_images([p for r in requests for p in r.pixel_values],
                                            [s for r in requests for s in r.image_sizes])
        start = 0
        for r in requests:
            n = len(r.pixel_values)
            r.image_features, r.pixel_values, r.image_sizes = features[start:start + n], [], []
            start += n

    def _lean_fits(self, capacity: int) -> bool:
        """Whether this batch runs on the lean forward (a sliding window may be too short for it)."""
        if self.lean is None:
            return False
        reason = unsupported_reason(self.lm, capacity)
        if reason is not None and self.forward_kind == "lean":
            raise ValueError(f"the lean forward cannot run this batch: {reason}; use forward='auto'")
        return reason is None

    def _capacity(self, needed: int) -> int:
        """Exact size, except for compiled decoding. The compiled lean step takes any capacity in
        one graph (`CompiledDecoder.step`): multiples of 128, so a long answer does not reserve up
        to twice its room. transformers' compiled step over its static cache compiles once per
        shape: powers of two, few shapes."""
        if not self.compiled:
            return needed
        if self.compiled_lean is not None:
            rounded = max(CAPACITY_STEP, -(-needed // CAPACITY_STEP) * CAPACITY_STEP)
        else:
            rounded = max(CAPACITY_STEP, 1 << (needed - 1).bit_length())
        return min(rounded, max(needed, self.context_length))

    def _new_cache(self, capacity: int) -> Cache:
        if self.cache_kind == "static":
            return StaticCache(config=self.lm.config, max_cache_len=capacity)
        return DynamicCache(config=self.lm.config)

    def _mask_view(self, mask: torch.Tensor, length: int) -> torch.Tensor:
        # A static cache attends over all its slots, so it takes the whole mask; causality hides the future.
        return mask if self.cache_kind == "static" else mask[:, :length]

    # Decode --------------------------------------------------------------------------------
    def _forward_one(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                     cache: Cache) -> torch.Tensor:
        """The swappable part: one token per row through the cache -> [B, V] logits."""
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=True, **{self._cache_arg: cache})
        return out.logits[:, -1]

    @torch.inference_mode()
    def decode_step(self, state: DecodeState, next_tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([B] ids), advance the state in place, return [B, V] logits."""
        state.length += 1
        if isinstance(state.cache, KVCache) and self.compiled_lean is not None:
            logits = self.compiled_lean.step(next_tokens.view(-1, 1), state.position_ids, state.attention_mask,
                                             state.cache, state.length - 1)
        elif isinstance(state.cache, KVCache):
            logits = self.lean.forward(self.lean.embed(next_tokens.view(-1, 1)), state.position_ids,
                                       state.attention_mask if state.padded else None, state.cache, state.length - 1)
        else:
            logits = self._decode_forward(next_tokens.view(-1, 1), self._mask_view(state.attention_mask, state.length),
                                          state.position_ids, state.cache)
        state.position_ids += 1
        state.logits = logits
        return logits

    @torch.inference_mode()  # the cache stays inference tensors: others fail the compiled step's guards
    def keep_rows(self, state: DecodeState, keep: list[int]) -> bool:
        """Drop finished rows from the batch; False when it keeps its shape (transformers' static cache)."""
        lean = isinstance(state.cache, KVCache)
        if (self.cache_kind == "static" and not lean) or len(keep) == len(state.rows):
            return False
        index = torch.tensor(keep, device=state.attention_mask.device)
        if lean:
            state.cache.select_rows(index)
        else:
            state.cache.batch_select_indices(index)
        state.attention_mask = state.attention_mask.index_select(0, index)
        state.position_ids = state.position_ids.index_select(0, index)
        state.logits = state.logits.index_select(0, index)
        state.rows = [state.rows[i] for i in keep]
        return True

    def can_join(self, state: DecodeState) -> bool:
        """Whether new rows can join this running batch (the lean forward's cache; see `join`)."""
        return isinstance(state.cache, KVCache)

    @torch.inference_mode()
    def join(self, running: DecodeState, newcomers: DecodeState, room: int) -> DecodeState:
        """One batch from a running one and freshly prefilled rows, for iteration-level scheduling.

        Both are right-aligned at a shared column (left padding), after dropping the leading
        columns that are padding in every row (so a long-lived batch does not grow), into a
        new cache with `room` free columns after the filled ones. Each row keeps its own
        positions and mask, so its next logits are those it would have alone. Rows are
        `running.rows + newcomers.rows`.
        """
        if not (self.can_join(running) and self.can_join(newcomers)):
            raise ValueError("only batches on the lean forward can be joined")
        parts = [(s, _leading_padding(s)) for s in (running, newcomers)]
        length = max(s.length - lead for s, lead in parts)
        capacity = self._capacity(length + room)
        batch = sum(len(s.rows) for s in (running, newcomers))
        ref = running.cache.keys[0]
        mask = torch.zeros((batch, capacity), dtype=running.attention_mask.dtype, device=ref.device)
        mask[:, length:] = 1
        keys = [torch.zeros((batch, *k.shape[1:2], capacity, k.shape[3]), dtype=k.dtype, device=k.device)
                for k in running.cache.keys]
        values = [torch.zeros_like(k) for k in keys]
        row = 0
        for s, lead in parts:
            width, n = s.length - lead, len(s.rows)
            mask[row:row + n, length - width:length] = s.attention_mask[:, lead:s.length]
            for new, old in zip(keys + values, s.cache.keys + s.cache.values):
                new[row:row + n, :, length - width:length] = old[:, :, lead:s.length]
            row += n
        return DecodeState(cache=KVCache(keys, values), attention_mask=mask,
                           position_ids=torch.cat([running.position_ids, newcomers.position_ids]), length=length,
                           logits=torch.cat([running.logits, newcomers.logits]),
                           rows=running.rows + newcomers.rows, padded=bool((mask[:, :length] == 0).any()))

    # Generation ----------------------------------------------------------------------------
    def generate(self, requests: Sequence[Request], params: SamplingParams | None = None,
                 on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
        """Complete every request; `on_text(request_index, delta)` sees text as it becomes final."""
        params = params or SamplingParams()
        if not requests:
            return []
        texts = [RowText(self.tokenizer, params.stop) for _ in requests]
        finish: list[str | None] = [None] * len(requests)
        for i, delta in self._run(requests, params, texts, finish):
            if on_text is not None:
                on_text(i, delta)
        return [Completion(t.token_ids, t.text, f or "length") for t, f in zip(texts, finish)]

    def stream(self, request: Request, params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of one request as tokens arrive; they concatenate to the completion's text."""
        params = params or SamplingParams()
        texts, finish = [RowText(self.tokenizer, params.stop)], [None]
        for _, delta in self._run([request], params, texts, finish):
            yield delta

    def _run(self, requests: Sequence[Request], params: SamplingParams, texts: list[RowText],
             finish: list[str | None]) -> Iterator[tuple[int, str]]:
        """The decode loop; yields (request index, text delta) and fills `texts` and `finish`."""
        budgets = [min(params.max_new_tokens, self.check_context(r)) for r in requests]
        state = self.prefill(requests, max(budgets))
        generator = make_generator(params.seed, state.logits.device)
        logits = state.logits
        while True:
            tokens = sample(logits, params, generator)
            keep: list[int] = []
            for b, (row, tok) in enumerate(zip(state.rows, tokens.tolist())):
                if finish[row] is not None:  # static cache: finished rows ride along, ignored
                    continue
                text = texts[row]
                if tok in self.eos_token_ids and not params.ignore_eos:
                    finish[row] = "eos"
                elif text.add(tok):
                    finish[row] = "stop"
                elif len(text.token_ids) >= budgets[row]:
                    finish[row] = "length"
                if finish[row] is not None:
                    text.flush()
                else:
                    keep.append(b)
                delta = text.delta(final=finish[row] is not None)
                if delta:
                    yield row, delta
            if not keep:
                return
            if len(keep) < len(state.rows) and self.keep_rows(state, keep):
                tokens = tokens[torch.tensor(keep, device=tokens.device)]
            logits = self.decode_step(state, tokens)


def _leading_padding(state: DecodeState) -> int:
    """How many leading cache columns are padding in every row of the batch."""
    real = state.attention_mask[:, :state.length].any(dim=0)
    return int(real.int().argmax()) if bool(real.any()) else state.length


def default_eos_ids(model: LlavaModel, tokenizer) -> set[int]:
    """EOS ids from the tokenizer and the language model's generation config (which may list several)."""
    ids: set[int] = set()
    gen_config = getattr(model.language_model, "generation_config", None)
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(gen_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return ids
