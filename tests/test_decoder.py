"""The lean Llama-family forward (llava.generate.decoder) against transformers' forward on identical weights."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

from llava.generate import Engine, Request, SamplingParams
from llava.generate import decoder as decoder_module
from llava.generate.decoder import LlamaFamilyDecoder, unsupported_reason
from llava.generate.detokenize import RowText
from llava.model import onednn as onednn_module
from llava.model.llava import LlavaModel
from llava.model.onednn import PackedLinear, cpu_linear_path, onednn_dtypes, packable_dtypes
from llava.model.quantize import quantize_language_model
from llava.tiny import tiny_model

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=128)
LMS = {
    "llama-mha": (LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama-gqa": (LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0)),
    "mistral-gqa": (MistralConfig, dict(num_attention_heads=8, num_key_value_heads=2)),
    "qwen2-bias": (Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=1)),  # q/k/v biases
}


def _lm(name: str, dtype: torch.dtype = torch.float32):
    cls, extra = LMS[name]
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cls(**SMALL, **extra)).eval().to(dtype)
    with torch.no_grad():  # non-zero biases, so a dropped bias shows
        for name_, p in lm.named_parameters():
            if name_.endswith("bias"):
                p.normal_(0, 0.5)
    return lm


def _left_padded(batch: int = 3, length: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :4] = 0
    mask[1, :1] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-bias"])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_eager_decode_steps_attend_alike_through_llavas_kernel(name, cache_dtype, monkeypatch):
    """Once llava's CPU kernels are loaded in the process (a quantized layer or a compiled step asked for
    them), an eager one-row step attends through the kernel, reading the cache in its own dtype: the
    logits SDPA gives, left-padded rows and grouped heads included."""
    from llava.model import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip(f"the kernels do not run here: {cpu_kernels.kernel_path()}")
    lm = _lm(name)
    ids, mask, pos = _left_padded()
    key_mask = torch.cat([mask, torch.ones(3, 3, dtype=torch.long)], dim=1)
    logits = {}
    for loaded in (True, False):
        monkeypatch.setattr(cpu_kernels, "loaded", lambda: loaded)
        decoder = LlamaFamilyDecoder(lm)
        cache = decoder.new_cache(3, 12, ids.device, cache_dtype)
        with torch.no_grad():
            decoder.forward(decoder.embed(ids[:, :6]), pos[:, :6], key_mask, cache, 0)
            logits[loaded] = [decoder.forward(decoder.embed(ids[:, t:t + 1]), pos[:, t:t + 1], key_mask, cache, t)
                              for t in range(6, 9)]
    for native, sdpa in zip(logits[True], logits[False]):
        torch.testing.assert_close(native, sdpa, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(LMS))
def test_prefill_and_decode_logits_match_transformers(name):
    lm = _lm(name)
    assert unsupported_reason(lm, capacity=64) is None
    ids, mask, pos = _left_padded()
    with torch.no_grad():
        reference = lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        decoder = LlamaFamilyDecoder(lm)
        cache = decoder.new_cache(3, 12, ids.device, torch.float32)
        key_mask = torch.cat([mask, torch.ones(3, 3, dtype=torch.long)], dim=1)
        steps = [decoder.forward(decoder.embed(ids[:, :6]), pos[:, :6], key_mask, cache, 0)]
        for t in range(6, 9):  # one token at a time through the cache
            steps.append(decoder.forward(decoder.embed(ids[:, t:t + 1]), pos[:, t:t + 1], key_mask, cache, t))
    for t, logits in zip(range(5, 9), steps):
        assert (logits - reference[:, t]).abs().max().item() <= 1e-5, t


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "without-onednn"])
def test_few_row_linears_match_transformers_with_and_without_onednn(monkeypatch, onednn):
    """Decode steps (few rows) take oneDNN's linear where it runs, else W @ x.T or F.linear:
    each path gives transformers' logits, and `cpu_linear_path` names the one taken."""
    if onednn and torch.float32 not in onednn_dtypes():
        pytest.skip("this torch has no oneDNN")
    if not onednn:
        monkeypatch.setattr(decoder_module, "onednn_dtypes", lambda: frozenset())
        monkeypatch.setattr(onednn_module, "onednn_dtypes", lambda: frozenset())
    assert cpu_linear_path(torch.float32).startswith("oneDNN") == onednn
    lm = _lm("qwen2-bias")
    with torch.no_grad():  # lm_head over 64 wide rows is large enough for the W @ x.T route too
        lm.lm_head = torch.nn.Linear(64, 1 << 13, bias=False)
        lm.config.vocab_size = 1 << 13
    ids, mask, pos = _left_padded(batch=4)
    with torch.no_grad():
        reference = lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        decoder = LlamaFamilyDecoder(lm)
        cache = decoder.new_cache(4, 9, ids.device, torch.float32)
        decoder.forward(decoder.embed(ids[:, :8]), pos[:, :8], mask, cache, 0)
        last = decoder.forward(decoder.embed(ids[:, 8:]), pos[:, 8:], mask, cache, 8)
    assert (last - reference).abs().max().item() <= 1e-5


def _decode_logits(decoder: LlamaFamilyDecoder, ids, mask, pos, dtype=torch.float32) -> list[torch.Tensor]:
    """A 6-token prefill, then the rest one token at a time through the cache."""
    batch, length = ids.shape
    cache = decoder.new_cache(batch, length, ids.device, dtype)
    steps = [decoder.forward(decoder.embed(ids[:, :6]), pos[:, :6], mask, cache, 0)]
    for t in range(6, length):
        steps.append(decoder.forward(decoder.embed(ids[:, t:t + 1]), pos[:, t:t + 1], mask, cache, t))
    return steps


def _needs_packing(dtype: torch.dtype) -> None:
    if dtype not in packable_dtypes():
        pytest.skip(f"oneDNN cannot pack {dtype} weights on this CPU")


@pytest.mark.parametrize("name", sorted(LMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_give_the_unpacked_logits(name, dtype):
    """Every plain linear on oneDNN-packed weights (prefill and decode steps, biases, GQA): the
    logits of the unpacked lean forward, to the dtype's precision."""
    _needs_packing(dtype)
    lm = _lm(name, dtype)
    ids, mask, pos = _left_padded()
    with torch.no_grad():
        plain = _decode_logits(LlamaFamilyDecoder(lm), ids, mask, pos, dtype)
        packed_decoder = LlamaFamilyDecoder(lm, pack_weights=True)
        packed = _decode_logits(packed_decoder, ids, mask, pos, dtype)
    assert all(isinstance(layer.o, PackedLinear) and isinstance(layer.down, PackedLinear)
               and len(layer.qkv.parts) == 3 and len(layer.gate_up.parts) == 2
               for layer in packed_decoder.layers)
    assert isinstance(packed_decoder.head, PackedLinear)
    for a, b in zip(packed, plain):
        scale = b.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= (1e-5 if dtype == torch.float32 else 0.02) * scale


def test_packed_copies_follow_the_model():
    """Copies are made once and reused across prefills; a weight changed in place, a cast model and
    a swapped-in module are seen at the next prefill; copies of weights gone are dropped."""
    _needs_packing(torch.float32)
    lm = _lm("llama-gqa")
    ids, mask, pos = _left_padded()
    decoder = LlamaFamilyDecoder(lm, pack_weights=True)
    with torch.no_grad():
        first = decoder.layers[0].qkv.packed
        _decode_logits(decoder, ids, mask, pos)
        assert decoder.layers[0].qkv.packed is first
        weights = sum(p.numel() * 4 for n, p in lm.named_parameters() if n.endswith("proj.weight")) + \
            lm.lm_head.weight.numel() * 4
        assert decoder.packer.nbytes == weights
        before = _decode_logits(decoder, ids, mask, pos)[-1]
        lm.lm_head.weight.mul_(-1)
        assert torch.allclose(_decode_logits(decoder, ids, mask, pos)[-1], -before, atol=1e-5)
        assert decoder.layers[0].qkv.packed is first  # unchanged weights keep their copies
        lm.model.layers[1].mlp.up_proj = torch.nn.Linear(64, 96)
        reference = _decode_logits(LlamaFamilyDecoder(lm), ids, mask, pos)
        assert torch.allclose(_decode_logits(decoder, ids, mask, pos)[-1], reference[-1], atol=1e-5)
        # a copy a layer for qkv, o, gate_up and down, and the head's; the old up_proj's fused copy is gone,
        # and the new one has a bias where gate_proj has none, so layer 1 packs those two apart
        assert decoder.packer.nbytes == weights and len(decoder.packer._copies) == 4 * 2 + 1 + 1
        assert decoder.layers[1].gate_up is None and isinstance(decoder.layers[1].up, PackedLinear)
    if torch.bfloat16 in packable_dtypes():
        lm.to(torch.bfloat16)
        with torch.no_grad():
            steps = _decode_logits(decoder, ids, mask, pos, torch.bfloat16)
        assert decoder.layers[0].qkv.packed.dtype == torch.bfloat16 and steps[-1].dtype == torch.bfloat16


def test_packed_linear_keeps_gradients():
    """With gradients wanted a packed linear computes on the module's own weight (a packed copy has none)."""
    _needs_packing(torch.float32)
    from llava.model.onednn import WeightPacker
    linear = torch.nn.Linear(8, 4)
    part = WeightPacker().part(linear)
    x = torch.randn(2, 8, requires_grad=True)
    part(x).sum().backward()
    assert linear.weight.grad is not None and x.grad is not None
    with torch.no_grad():
        assert torch.allclose(part(x), linear(x), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_packed_linears_give_their_parts_side_by_side(dtype):
    """q/k/v-like linears (biases, unequal widths) packed as one product: each part's output, side by
    side, at one row and many; with gradients wanted, computed on the parts' own weights."""
    _needs_packing(dtype)
    from llava.model.onednn import WeightPacker
    torch.manual_seed(0)
    parts = [torch.nn.Linear(32, n).to(dtype) for n in (32, 16, 16)]
    packer = WeightPacker()
    fused = packer.fused(parts)
    assert fused is not None and fused.out_features == 64
    again = packer.fused(parts)  # the next prefill's plan: the stacked copies are kept, biases too
    assert again.packed is fused.packed and again.bias is fused.bias
    with torch.no_grad():
        parts[1].bias.add_(1)
    remade = packer.fused(parts)
    assert remade.bias is not fused.bias and torch.equal(remade.bias[32:48], parts[1].bias.detach())
    fused = remade
    for rows in (1, 5):
        x = torch.randn(rows, 32, dtype=dtype)
        with torch.no_grad():
            expected = torch.cat([p(x) for p in parts], dim=-1)
            assert (fused(x).float() - expected.float()).abs().max() <= (1e-5 if dtype == torch.float32 else 0.03)
    x = torch.randn(3, 32, dtype=dtype, requires_grad=True)
    fused(x).sum().backward()
    assert all(p.weight.grad is not None for p in parts) and x.grad is not None
    assert WeightPacker().fused([torch.nn.Linear(32, 8), torch.nn.Linear(32, 8, bias=False)]) is None
    assert WeightPacker().fused([torch.nn.Linear(32, 8), torch.nn.Linear(16, 8)]) is None


@pytest.mark.parametrize("mode", ["int8-dynamic", "int8-weight", "int4-weight"])
def test_quantized_q_k_v_and_gate_up_run_as_one_layer_each(mode):
    """The eager plan fuses quantized q/k/v and gate/up (views of their own buffers, no copy): its
    prefill (many rows: the dequantizing path) and decode steps give the logits of transformers'
    forward, which runs the same quantized parts one by one; the parts keep working."""
    from llava.model.int8_dynamic import Int8DynamicLinear
    from llava.model.quantize import WEIGHT_ONLY

    kind = Int8DynamicLinear if mode == "int8-dynamic" else WEIGHT_ONLY[mode]
    torch.manual_seed(0)
    config = LlamaConfig(**{**SMALL, "intermediate_size": 128}, num_attention_heads=4, num_key_value_heads=4)
    lm = AutoModelForCausalLM.from_config(config).eval()
    for layer in lm.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                setattr(parent, name, kind.from_linear(getattr(parent, name)))
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 97, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    pos = torch.arange(24).expand(2, -1)
    with torch.no_grad():  # transformers' forward step by step, so its decode steps take the few-row kernels too
        out = lm(input_ids=ids[:, :20], use_cache=True)
        reference = [out.logits[:, -1]]
        for t in range(20, 24):
            out = lm(input_ids=ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            reference.append(out.logits[:, -1])
        decoder = LlamaFamilyDecoder(lm)
        fused = (decoder.layers[0].qkv, decoder.layers[0].gate_up)
        assert all(type(f) is kind for f in fused) and [f.out_features for f in fused] == [192, 256]
        cache = decoder.new_cache(2, 24, ids.device, torch.float32)
        steps = [decoder.forward(decoder.embed(ids[:, :20]), pos[:, :20], mask, cache, 0)]  # > FEW_ROWS rows
        for t in range(20, 24):
            steps.append(decoder.forward(decoder.embed(ids[:, t:t + 1]), pos[:, t:t + 1], mask, cache, t))
    for t, logits, expected in zip(range(19, 24), steps, reference):
        error = (logits - expected).norm() / expected.norm()
        assert error < 0.01, (t, float(error))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gqa", [False, True])
def test_prompt_attention_in_query_chunks_is_one_sdpa(dtype, gqa):
    """Chunks of queries, each attending to the keys up to its last query (a ragged last chunk, a prompt
    after cached columns, padding masks): SDPA's result over the whole prompt."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from llava.generate.decoder import QUERY_CHUNK, prompt_attention

    g = torch.Generator().manual_seed(5)
    length, cached, heads, kv_heads = 2 * QUERY_CHUNK + 37, 11, 4, 2 if gqa else 4
    q = torch.randn(2, heads, length, 32, generator=g).to(dtype)
    keys, values = (torch.randn(2, kv_heads, cached + length, 32, generator=g).to(dtype) for _ in range(2))
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.02, atol=0.02)
    whole = sdpa(q, keys[:, :, :length], values[:, :, :length], is_causal=True, enable_gqa=gqa)
    chunked = prompt_attention(q, keys[:, :, :length], values[:, :, :length], None, 32 ** -0.5, gqa)
    torch.testing.assert_close(chunked, whole, **tolerance)
    visible = torch.ones(2, cached + length, dtype=torch.bool)
    visible[0, :5] = False  # a left-padded row
    query_at = torch.arange(cached, cached + length)[:, None]
    allowed = visible[:, None, None, :] & (torch.arange(cached + length)[None, :] <= query_at)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))
    whole = sdpa(q, keys, values, attn_mask=mask, enable_gqa=gqa)
    torch.testing.assert_close(prompt_attention(q, keys, values, mask, 32 ** -0.5, gqa), whole, **tolerance)


def test_long_left_padded_prompts_match_transformers():
    """A prompt longer than a query chunk, prefilled in two parts (the second after cached columns), padded
    and unpadded: transformers' logits at each part's last position."""
    lm = _lm("llama-gqa")
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(1, 97, (2, 300), generator=g)
    for mask in (torch.ones(2, 300, dtype=torch.long), torch.cat([torch.zeros(2, 30), torch.ones(2, 270)], 1).long()):
        mask[1] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            reference = lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            decoder = LlamaFamilyDecoder(lm)
            cache = decoder.new_cache(2, 300, ids.device, torch.float32)
            key_mask = None if bool(mask.all()) else mask
            first = decoder.forward(decoder.embed(ids[:, :160]), pos[:, :160], key_mask, cache, 0)
            second = decoder.forward(decoder.embed(ids[:, 160:]), pos[:, 160:], mask, cache, 160)
        torch.testing.assert_close(first, reference[:, 159], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(second, reference[:, 299], rtol=1e-4, atol=1e-4)


def test_unpadded_batch_needs_no_mask():
    lm = _lm("llama-gqa")
    ids = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(7).expand(2, 7)
    with torch.no_grad():
        reference = lm(input_ids=ids).logits
        decoder = LlamaFamilyDecoder(lm)
        cache = decoder.new_cache(2, 8, ids.device, torch.float32)
        first = decoder.forward(decoder.embed(ids[:, :6]), pos[:, :6], None, cache, 0)
        second = decoder.forward(decoder.embed(ids[:, 6:]), pos[:, 6:], None, cache, 6)
    assert (first - reference[:, 5]).abs().max().item() <= 1e-5
    assert (second - reference[:, 6]).abs().max().item() <= 1e-5


def test_bf16_follows_transformers():
    """bf16 keeps the model's own RMSNorm (its fp32 upcast); logits agree to bf16 precision."""
    lm = _lm("qwen2-bias", torch.bfloat16)
    ids, mask, pos = _left_padded()
    with torch.no_grad():
        reference = lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
        decoder = LlamaFamilyDecoder(lm)
        ours = decoder.forward(decoder.embed(ids), pos, mask, decoder.new_cache(3, 9, ids.device, torch.bfloat16), 0)
    assert (ours.float() - reference).abs().max().item() <= 0.05 * reference.abs().max().item()


def test_what_the_lean_forward_declines():
    assert "sliding window of 8" in unsupported_reason(_mistral_window(8), capacity=20)
    assert unsupported_reason(_mistral_window(8), capacity=8) is None  # a window the batch never exceeds is moot
    qwen = AutoModelForCausalLM.from_config(Qwen2Config(**SMALL, num_attention_heads=4, sliding_window=4,
                                                        use_sliding_window=False))
    assert unsupported_reason(qwen, capacity=100) is None
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2))
    assert "not one of llama, mistral, qwen2" in unsupported_reason(gpt2)
    with pytest.raises(ValueError, match="cannot run this model"):
        LlamaFamilyDecoder(gpt2)


def _mistral_window(window: int):
    return AutoModelForCausalLM.from_config(MistralConfig(**SMALL, num_attention_heads=4, sliding_window=window))


# Through the engine ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_tok):
    return tiny_model("tiny", tokenizer=tiny_tok)


def _requests(model: LlavaModel) -> list[Request]:
    g = torch.Generator().manual_seed(5)
    n = model.image_token_count((28, 28))
    with torch.inference_mode():
        feats = model.encode_images([torch.randn(1, 3, 28, 28, generator=g)], [(28, 28)])
    long = [1] + [model.config.image_token_index] * n + torch.randint(10, 500, (11,), generator=g).tolist()
    return [Request(long, feats), Request([1] + torch.randint(10, 500, (3,), generator=g).tolist())]


def _tokens(engine: Engine, requests, **params) -> list[list[int]]:
    done = engine.generate(requests, SamplingParams(max_new_tokens=10, **params))
    return [c.token_ids for c in done]


def test_engine_forwards_agree(tiny):
    model, tok = tiny
    lean, hf = Engine(model, tok, eos_token_ids=[]), Engine(model, tok, eos_token_ids=[], forward="transformers")
    assert lean.lean is not None and hf.lean is None
    reqs = _requests(model)
    assert _tokens(lean, reqs) == _tokens(hf, reqs)
    if torch.float32 in packable_dtypes():
        assert _tokens(Engine(model, tok, eos_token_ids=[], pack_weights=True), reqs) == _tokens(hf, reqs)
    assert _tokens(lean, reqs, temperature=0.8, top_p=0.9, seed=3) == _tokens(hf, reqs, temperature=0.8, top_p=0.9,
                                                                               seed=3)


def test_engine_falls_back_where_the_window_is_short(tiny):
    model, tok = tiny
    text = model.config.text_config.to_dict() | dict(model_type="mistral", sliding_window=8)
    for key in ("architectures", "transformers_version"):
        text.pop(key, None)
    mistral = LlavaModel(model.config.replace(text_config=text)).eval()
    reqs = _requests(mistral)
    auto = Engine(mistral, tok, eos_token_ids=[])
    assert _tokens(auto, reqs) == _tokens(Engine(mistral, tok, eos_token_ids=[], forward="transformers"), reqs)
    with pytest.raises(ValueError, match="sliding window of 8 tokens"):
        Engine(mistral, tok, eos_token_ids=[], forward="lean").generate(reqs)
    with pytest.raises(ValueError, match="valid: auto, lean, transformers"):
        Engine(model, tok, forward="fast")


def test_engine_sees_the_model_as_it_is_at_each_call(tiny):
    """Weights changed in place, and linears swapped for quantized ones, after the engine was built."""
    model, tok = tiny
    model = copy.deepcopy(model)
    engine = Engine(model, tok, eos_token_ids=[])
    reqs = _requests(model)
    before = _tokens(engine, reqs)
    with torch.no_grad():
        model.language_model.lm_head.weight.mul_(-1)
    flipped = _tokens(engine, reqs)
    assert flipped != before
    assert flipped == _tokens(Engine(model, tok, eos_token_ids=[], forward="transformers"), reqs)
    quantize_language_model(model, "int8-dynamic")
    quantized = _tokens(engine, reqs)
    assert not isinstance(engine.lean.layers[0].q, tuple)  # the quantized module runs, not the old weight
    assert quantized == _tokens(Engine(model, tok, eos_token_ids=[], forward="transformers"), reqs)


def test_fast_detokenizer_matches_tokenizer_decode(tiny):
    _, tok = tiny
    ids = tok("A red circle, two squares. Answer: 3!")["input_ids"] + [tok.eos_token_id, 300, 301]
    row = RowText(tok)
    for i in ids:
        row.add(i)
    row.flush()
    assert row.text == tok.decode(ids, skip_special_tokens=True)
