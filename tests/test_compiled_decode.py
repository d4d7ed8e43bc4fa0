"""The compiled one-row decode step (llava.generate.compiled) and the weight-only int8/int4 layers.

Both are checked against eager references on real (tiny) weights: the compiled step against
the eager lean forward, the weight-only layers against the fp32 linear they replace.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llava
from llava.errors import InputError
from llava.generate import Engine, Request, SamplingParams
from llava.generate.compiled import AMX, gemv
from llava.model import cpu_kernels
from llava.model.int8_dynamic import Int8DynamicLinear, PackedInt8DynamicLinear, exact_unsigned_product
from llava.model.quantize import quantize_language_model, quantized_layers
from llava.model.int4_weight import Int4WeightOnlyLinear
from llava.model.woq import Int8WeightOnlyLinear, fuse_outputs

# Relative error of one layer's output against fp32 (nn.Linear's uniform init). Measured 2026-12:
# int8 0.004-0.006 (eager kernel, bf16 activations; compiled form fp32), int4 (groups of 32) 0.06.
MAX_RELATIVE_ERROR = {Int8WeightOnlyLinear: 0.012, Int4WeightOnlyLinear: 0.09}


@pytest.fixture(scope="module")
def tiny(tiny_tok):
    from llava.tiny import tiny_model

    return tiny_model("tiny", tokenizer=tiny_tok)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.detach().float() - ref.detach().float()).norm() / ref.detach().float().norm())


@pytest.mark.parametrize("kind", [Int8WeightOnlyLinear, Int4WeightOnlyLinear])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_only_linears_stay_close_to_the_linear_they_replace(kind, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=True)
    with torch.no_grad():
        linear.bias.normal_()
    layer = kind.from_linear(linear)
    for rows in (1, 5, 40):  # the packed kernels' few rows and the dequantized GEMM's many
        x = torch.randn(2, rows, 256)
        out = layer(x.to(dtype))
        assert out.dtype == dtype and out.shape == (2, rows, 96)
        assert _relative_error(out, linear(x)) < MAX_RELATIVE_ERROR[kind]


def test_int4_prefill_reads_the_kernels_own_weights_back():
    """In ATen's int4pack layout many rows dequantize the codes read out of the kernel's packed bytes:
    the same weights the kernel multiplies by (its product with the identity), on every CPU whose
    layout is known."""
    torch.manual_seed(4)
    linear = nn.Linear(256, 128)
    layer = Int4WeightOnlyLinear.from_linear(linear, row_blocks=False)
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert layer.packed_block in (32, 64)
    if layer.packed_block is None:
        pytest.skip("this CPU's int4 packing is not one the prefill reads back: the kernel serves every row count")
    eye = torch.eye(256, dtype=torch.bfloat16)
    kernels_weight = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, layer.packed, 32, layer.scales_and_zeros).t()
    torch.testing.assert_close(layer.dequantized(torch.float32), kernels_weight.float(), rtol=0.01, atol=1e-3)
    x = torch.randn(40, 256)
    kernel_out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), layer.packed, 32, layer.scales_and_zeros)
    assert _relative_error(layer(x), kernel_out.float() + linear.bias) < 0.01


def test_int8_compiled_form_equals_its_eager_form():
    """Inside torch.compile one fp32 row reads the int8 weights as int32 words (where llava's kernel
    does not run: there it takes the kernel, as eagerly); the same numbers as eager."""
    torch.manual_seed(1)
    layer = Int8WeightOnlyLinear.from_linear(nn.Linear(128, 64))
    x = torch.randn(1, 128)
    exact = F.linear(x, layer.dequantized(torch.float32), layer.bias)
    if layer.native:
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x), rtol=1e-6, atol=1e-6)
        layer.native = False  # the word reduction, as on CPUs without the kernel
    compiled = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(compiled, exact, rtol=1e-5, atol=1e-5)
    assert _relative_error(layer(x), exact) < 0.01  # eager: bf16 activations


def test_weight_only_scales_survive_a_model_wide_cast():
    """A loader's or user's `.to(dtype)` casts floating buffers (a bias rounds, as any bias would);
    the scales are kept as integer bits, so the quantized weights mean what they meant."""
    layer = Int4WeightOnlyLinear.from_linear(nn.Linear(64, 32, bias=False))
    int8 = Int8WeightOnlyLinear.from_linear(nn.Linear(64, 32, bias=False))
    x = torch.randn(3, 64)
    before = (layer(x), int8(x), int8.scale.clone())
    layer.float(), int8.to(torch.bfloat16).float()
    assert torch.equal(layer(x), before[0]) and torch.equal(int8(x), before[1])
    assert int8.scale.dtype == torch.float32 and torch.equal(int8.scale, before[2])


def test_shapes_the_kernels_cannot_take_are_refused_or_left_alone(tiny):
    with pytest.raises(ValueError, match="divisible"):
        Int4WeightOnlyLinear.from_linear(nn.Linear(48, 32))
    with pytest.raises(ValueError, match="divisible"):
        Int8WeightOnlyLinear.from_linear(nn.Linear(30, 8))
    model, _ = tiny
    quant = quantize_language_model(copy.deepcopy(model), "int4-weight")
    for name, module in model.language_model.named_modules():
        if type(module) is nn.Linear:
            replaced = quant.language_model.get_submodule(name)
            assert isinstance(replaced, Int4WeightOnlyLinear) == Int4WeightOnlyLinear.fits(module), name
    assert quantized_layers(quant.language_model)


def test_weight_only_modes_need_the_cpu(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="CPU kernels.*meta"):
        quantize_language_model(copy.deepcopy(model).to("meta"), "int8-weight")


def test_int4_layouts_hold_the_same_weights():
    """llava's row-block layout and ATen's int4pack hold the same codes and (scale, zero) pairs, so
    either dequantizes to the same weights; the row blocks' pairs are read in place."""
    torch.manual_seed(7)
    linear = nn.Linear(96, 80)
    rows, aten = (Int4WeightOnlyLinear.from_linear(linear, row_blocks=layout) for layout in (True, False))
    assert rows.row_blocks and rows.packed.shape == (5, 3, 320) and rows.kernel_rows is None
    assert torch.equal(rows.scales_and_zeros, aten.scales_and_zeros)
    grouped = linear.weight.detach().view(80, 3, 32)
    low, high = grouped.amin(-1), grouped.amax(-1)  # codes 0 and 15 are each group's extremes
    codes = rows.codes().view(80, 3, 32)
    assert torch.equal(codes.amin(-1), torch.zeros_like(low, dtype=torch.uint8)) and (codes.amax(-1) == 15).all()
    torch.testing.assert_close(rows.dequantized(torch.float32), linear.weight.detach(), rtol=0, atol=float(
        ((high - low) / 15).max()) * 0.51 + 0.01)
    if aten.packed_block is not None:
        assert torch.equal(rows.codes(), aten.codes())
        assert torch.equal(rows.dequantized(torch.float32), aten.dequantized(torch.float32))


def _int4_in(row_blocks: bool):
    return lambda linear: Int4WeightOnlyLinear.from_linear(linear, row_blocks=row_blocks)


@pytest.mark.parametrize("kind", [Int8DynamicLinear, Int8WeightOnlyLinear, Int4WeightOnlyLinear, "int4pack"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_quantized_layers_compute_their_parts_side_by_side(kind, bias):
    """q/k/v (or gate/up) as one layer: its output is the parts' outputs concatenated, and the
    parts, now views of its buffers, compute what they computed before, to the bit (int4 in either
    layout, though row blocks are ATen-free only where llava's kernel runs)."""
    torch.manual_seed(5)
    make = kind.from_linear if kind != "int4pack" else _int4_in(row_blocks=False)
    if kind is Int4WeightOnlyLinear:
        if not Int4WeightOnlyLinear.row_blocks_here():
            pytest.skip("llava's int4 kernel does not run here")
        make = _int4_in(row_blocks=True)
    kind = Int4WeightOnlyLinear if kind == "int4pack" else kind
    parts = [make(nn.Linear(128, out, bias=bias)) for out in (128, 64, 64)]
    inputs = [torch.randn(rows, 128) for rows in (1, 3, 40)]
    before = [[p(x) for p in parts] for x in inputs]
    fused = fuse_outputs(parts)
    if kind is Int4WeightOnlyLinear and not parts[0].row_blocks and parts[0].packed_block is None:
        assert fused is None  # a packing this CPU's layout reader does not know: left unfused
        return
    assert fused.out_features == 256
    for x, outputs in zip(inputs, before):
        if len(x) <= 16:  # the few-row kernels: each output row on its own, to the bit
            assert torch.equal(fused(x), torch.cat(outputs, -1))
        else:  # a dequantized GEMM, which may block a wider matrix differently
            torch.testing.assert_close(fused(x), torch.cat(outputs, -1), rtol=1e-2, atol=1e-2)
        assert all(torch.equal(p(x), out) for p, out in zip(parts, outputs))
    stored = fused.packed if kind is Int4WeightOnlyLinear else fused.weight
    assert all((p.packed if kind is Int4WeightOnlyLinear else p.weight).untyped_storage().data_ptr()
               == stored.untyped_storage().data_ptr() for p in parts)  # one copy of the weights
    again = fuse_outputs(parts)  # a second engine on the same model: the same storage, not a second copy
    assert (again.packed if kind is Int4WeightOnlyLinear else again.weight).data_ptr() == stored.data_ptr()
    assert torch.equal(again(inputs[0]), fused(inputs[0]))


def test_layers_that_differ_are_not_fused():
    torch.manual_seed(6)
    assert fuse_outputs([Int8DynamicLinear.from_linear(nn.Linear(64, 32)),
                         Int8DynamicLinear.from_linear(nn.Linear(64, 32, bias=False))]) is None
    assert fuse_outputs([Int8DynamicLinear.from_linear(nn.Linear(64, 32)),
                         Int8WeightOnlyLinear.from_linear(nn.Linear(64, 32))]) is None
    assert fuse_outputs([Int8WeightOnlyLinear.from_linear(nn.Linear(64, 32)),
                         Int8WeightOnlyLinear.from_linear(nn.Linear(32, 32))]) is None
    assert fuse_outputs([(torch.zeros(4, 4), None)] * 2) is None  # plain weights: the graph's own loops


def test_gemv_is_a_linear():
    torch.manual_seed(2)
    weight, bias, x = torch.randn(24, 40), torch.randn(24), torch.randn(3, 1, 40)
    torch.testing.assert_close(gemv(weight, bias, x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def _requests(model, seed: int) -> list[Request]:
    g = torch.Generator().manual_seed(seed)
    size = (model.config.image_size,) * 2
    with torch.inference_mode():
        feats = model.encode_images([torch.randn(1, 3, *size, generator=g)], [size])
    image = [model.config.image_token_index] * model.image_token_count(size)
    return [Request([1] + image + torch.randint(10, 200, (9,), generator=g).tolist(), feats),
            Request([1] + torch.randint(10, 200, (5,), generator=g).tolist())]


@pytest.mark.slow
@pytest.mark.parametrize("mode", [None, "int8-dynamic", "int8-weight", "int4-weight"])
def test_compiled_one_row_decode_matches_the_eager_lean_forward(tiny, mode):
    """Near-identical logits one row at a time, also after a capacity change (a second
    compilation); the same greedy tokens in full precision, where the two differ only in
    summation order, and in a batch. Eager int8-weight multiplies bf16 activations while its
    compiled one-row form keeps fp32 ones, so quantized runs compare logits, not whole answers."""
    model, tok = tiny
    if mode:
        model = quantize_language_model(copy.deepcopy(model), mode)
    eager = Engine(model, tok, eos_token_ids=[])
    compiled = Engine(model, tok, eos_token_ids=[], compile=True)
    assert compiled.compiled_lean is not None
    tolerance = dict(rtol=1e-4, atol=5e-2 if mode else 1e-4)
    for seed, new in ((3, 4), (4, 150)):  # 150 new tokens: past the first 128-column cache bucket
        for req in _requests(model, seed):
            state_e, state_c = eager.prefill([req], new), compiled.prefill([req], new)
            for _ in range(min(new, 20)):
                token = state_e.logits.argmax(-1)
                logits_e, logits_c = eager.decode_step(state_e, token), compiled.decode_step(state_c, token)
                torch.testing.assert_close(logits_c, logits_e, **tolerance)
    if mode is None:
        params = SamplingParams(max_new_tokens=150, temperature=0)
        for req in _requests(model, 5):
            assert compiled.generate([req], params)[0].token_ids == eager.generate([req], params)[0].token_ids
    batch = _requests(model, 6)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    assert [c.token_ids for c in compiled.generate(batch, params)] == \
        [c.token_ids for c in eager.generate(batch, params)]


@pytest.mark.slow
@pytest.mark.parametrize("mode,pack", [(None, False), (None, True), ("int8-dynamic", False), ("int8-dynamic", True),
                                       ("int8-weight", False), ("int8-weight", True), ("int4-weight", False),
                                       ("int4-weight", True)])
def test_compiled_batch_step_matches_the_eager_batch(tiny, mode, pack):
    """Batches take the compiled step too (oneDNN linears, packed ones through the `llava::onednn_linear`
    op; quantized layers beside packing through Inductor's autotuned GEMM templates: weight-only ones
    everywhere, int8-dynamic ones and one row where the CPU has AMX): a left-padded batch step by step,
    then with a row gone (another batch size, the same graph), against the eager lean forward's logits."""
    model, tok = tiny
    if mode:
        model = quantize_language_model(copy.deepcopy(model), mode)
    eager = Engine(model, tok, eos_token_ids=[], pack_weights=pack)
    compiled = Engine(model, tok, eos_token_ids=[], compile=True, pack_weights=pack)
    decoder = compiled.compiled_lean
    autotuned = pack and (mode in ("int8-weight", "int4-weight") or (mode == "int8-dynamic" and AMX))
    assert (decoder._autotuned is not None) == autotuned
    copies = exact_unsigned_product() and not cpu_kernels.available()  # else llava's kernel reads the plain weight
    if mode == "int8-dynamic" and pack and not autotuned and copies:  # the reordered copies
        assert isinstance(decoder.layers[0].qkv, PackedInt8DynamicLinear)
    leaving = (4, 7)
    if autotuned and AMX:  # every row count takes the frozen graph, the last one too (int8-weight as its kernel)
        decoder._compiled, leaving = None, (4, 7, 8)
    batch = _requests(model, 8) + _requests(model, 9)
    state_e, state_c = eager.prefill(batch, 12), compiled.prefill(batch, 12)
    for step in range(10):
        if step in leaving:  # rows leave, as finished ones do
            keep = list(range(len(state_e.rows) - 1))
            eager.keep_rows(state_e, keep), compiled.keep_rows(state_c, keep)
        token = state_e.logits.argmax(-1)
        logits_e, logits_c = eager.decode_step(state_e, token), compiled.decode_step(state_c, token)
        assert logits_c.shape == (len(state_e.rows), model.config.text_config.vocab_size)
        torch.testing.assert_close(logits_c.float(), logits_e.float(), rtol=1e-4, atol=5e-2 if mode else 1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8-weight", "int4-weight"])
def test_compiled_quantized_step_on_a_bf16_model(tiny, mode):
    """Weight-only layers under a bf16 model: the compiled one-row step takes the packed kernels
    (Inductor's word loop is for fp32 rows) and gives the eager step's logits, step after step."""
    model, tok = tiny
    model = quantize_language_model(copy.deepcopy(model).to(torch.bfloat16), mode)
    eager = Engine(model, tok, eos_token_ids=[])
    compiled = Engine(model, tok, eos_token_ids=[], compile=True)
    assert compiled.compiled_lean is not None
    for req in _requests(model, 10):
        state_e, state_c = eager.prefill([req], 8), compiled.prefill([req], 8)
        for _ in range(6):
            token = state_e.logits.argmax(-1)
            logits_e, logits_c = eager.decode_step(state_e, token), compiled.decode_step(state_c, token)
            torch.testing.assert_close(logits_c.float(), logits_e.float(), rtol=2e-2, atol=5e-2)


@pytest.mark.slow
def test_a_bf16_kv_cache_under_fp32_weights(tiny):
    """kv_cache_dtype=bf16 keeps keys and values rounded to bf16 (llama.cpp's f16 cache): eager and
    compiled steps read the same rounded cache (near-identical logits, one row and a batch whose row
    leaves), and both stay within bf16 rounding of the fp32 cache's logits."""
    model, tok = tiny
    reference = Engine(model, tok, eos_token_ids=[])
    eager = Engine(model, tok, eos_token_ids=[], kv_cache_dtype=torch.bfloat16)
    compiled = Engine(model, tok, eos_token_ids=[], compile=True, kv_cache_dtype=torch.bfloat16)
    for batch in ([_requests(model, 11)[0]], _requests(model, 12)):
        states = [engine.prefill(batch, 12) for engine in (reference, eager, compiled)]
        assert states[1].cache.keys[0].dtype == states[2].cache.keys[0].dtype == torch.bfloat16
        for step in range(8):
            if step == 4 and len(batch) > 1:
                for engine, state in zip((reference, eager, compiled), states):
                    engine.keep_rows(state, [0])
            token = states[0].logits.argmax(-1)
            ref, e, c = (engine.decode_step(state, token)
                         for engine, state in zip((reference, eager, compiled), states))
            torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(e, ref, rtol=0.02, atol=0.05)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        Engine(model, tok, forward="transformers", kv_cache_dtype=torch.bfloat16)


@pytest.mark.slow
def test_the_step_attends_alike_with_and_without_llavas_attention_kernel(tiny):
    """Where llava's decode-attention kernel runs, the step calls it; elsewhere (another CPU, a cache
    dtype it does not take) Inductor's loops over `attend_one_row`: the same logits, a batch whose row
    leaves and one row."""
    model, tok = tiny
    engines = [Engine(model, tok, eos_token_ids=[], compile=True, kv_cache_dtype=torch.bfloat16) for _ in range(2)]
    from llava.model import cpu_kernels

    assert engines[0].compiled_lean.native_attention == cpu_kernels.available()  # head size 16: one it takes
    engines[1].compiled_lean.native_attention = False
    batch = _requests(model, 13)
    states = [engine.prefill(batch, 10) for engine in engines]
    for step in range(6):
        if step == 3:
            for engine, state in zip(engines, states):
                engine.keep_rows(state, [1])
        token = states[0].logits.argmax(-1)
        native, written_out = (engine.decode_step(state, token) for engine, state in zip(engines, states))
        torch.testing.assert_close(native, written_out, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_one_graph_serves_every_answer_length(tiny):
    """Each step attends over the filled cache columns only, a length that grows by one a step,
    in a cache whose capacity depends on the answer's room (multiples of 128 columns): one graph
    serves a whole answer, and answers of other lengths and capacities (no new graph)."""
    from torch._dynamo.utils import counters

    model, tok = tiny
    engine = Engine(model, tok, eos_token_ids=[], compile=True)
    req = _requests(model, 7)[0]
    counters.clear()
    for new in (12, 30, 150):  # the last needs a 256-column cache
        state = engine.prefill([req], new)
        assert state.cache.keys[0].shape[2] == (256 if new == 150 else 128)
        engine.generate([req], SamplingParams(max_new_tokens=new, temperature=0))
        assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
def test_two_graphs_serve_every_batch_size(tiny):
    """One graph for one row, one for every batch (its batch dimension symbolic from the first), whatever
    batches come and however their rows leave: batches of 8, 3 and 5, rows leaving down to one, tokens
    sampled outside inference mode as the engine's loop samples them. Each further graph would hold its own copy of
    the weights where they are frozen in (`AUTOTUNED`)."""
    from torch._dynamo.utils import counters

    model, tok = tiny
    engine = Engine(model, tok, eos_token_ids=[], compile=True)
    reqs = _requests(model, 8)
    counters.clear()
    for size in (8, 1, 3, 5):
        state = engine.prefill(reqs[:size], 8)
        for step in range(6):
            if len(state.rows) > 1 and step % 2:
                engine.keep_rows(state, list(range(len(state.rows) - 2 if len(state.rows) > 2 else 1)))
            engine.decode_step(state, state.logits.argmax(-1))
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.slow
def test_each_engine_compiles_within_a_budget_of_its_own(tiny):
    """torch.compile counts graphs per code object: engines must not share one budget for their
    step, or those past it decode eagerly, silently. With the limit at 2, two engines each
    compile a one-row and a batch graph (4 in all) and none is refused."""
    from torch._dynamo.utils import counters

    model, tok = tiny
    reqs = _requests(model, 10)
    params = SamplingParams(max_new_tokens=3, temperature=0)
    eager = [c.token_ids for c in Engine(model, tok, eos_token_ids=[]).generate(reqs, params)]
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=2):
        for _ in range(2):
            engine = Engine(model, tok, eos_token_ids=[], compile=True)
            engine.generate(reqs[:1], params)
            assert [c.token_ids for c in engine.generate(reqs, params)] == eager
    assert counters["stats"]["unique_graphs"] >= 4  # a refused compilation runs eagerly: fewer graphs


@pytest.mark.parametrize("mode", ["int8-dynamic", "int8-weight", "int4-weight"])
def test_every_quantized_mode_takes_packed_weights(tiny, mode):
    """pack_weights beside compile=True is asked for every mode (the CLI's `--pack-weights`): the
    layers that pack themselves are packed, the others stay themselves, and the engine is built."""
    model, tok = tiny
    model = quantize_language_model(copy.deepcopy(model), mode)
    compiled = Engine(model, tok, eos_token_ids=[], compile=True, pack_weights=True)
    plan = compiled.compiled_lean.layers[0]
    # with AMX: Inductor's templates; with llava's kernels: the plain weight
    packs = mode == "int8-dynamic" and exact_unsigned_product() and not AMX and not cpu_kernels.available()
    assert isinstance(plan.qkv, PackedInt8DynamicLinear) == packs
    assert isinstance(plan.down, PackedInt8DynamicLinear) == packs


@pytest.mark.slow
def test_compiled_bf16_step_beside_packed_weights(tiny):
    """A bf16 model with pack_weights. Where the CPU has AMX the step compiles through Inductor's bf16
    GEMM templates, which prepack the frozen weights themselves, so the engine keeps no copies of its
    own. Elsewhere the one-row step keeps its reductions over the plain weights and batches read the
    packed copies. Either way: the eager packed steps' logits, one row and a batch whose rows leave."""
    from llava.model.onednn import PackedLinear, packable_dtypes

    if torch.bfloat16 not in packable_dtypes():
        pytest.skip("oneDNN cannot pack bf16 weights on this CPU")
    model, tok = tiny
    model = copy.deepcopy(model).to(torch.bfloat16)
    eager = Engine(model, tok, eos_token_ids=[], pack_weights=True)
    compiled = Engine(model, tok, eos_token_ids=[], compile=True, pack_weights=True)
    decoder = compiled.compiled_lean
    assert (decoder._autotuned is not None) == AMX
    assert isinstance(decoder.layers[0].gate_up, PackedLinear) != AMX
    assert (compiled.lean.packer.nbytes == 0) == AMX
    for batch in (_requests(model, 7)[:1], _requests(model, 7) + _requests(model, 8)):
        state_e, state_c = eager.prefill(batch, 8), compiled.prefill(batch, 8)
        for step in range(8):
            if step == 4 and len(batch) > 1:
                eager.keep_rows(state_e, [0, 2]), compiled.keep_rows(state_c, [0, 2])
            token = state_e.logits.argmax(-1)
            logits_e, logits_c = eager.decode_step(state_e, token), compiled.decode_step(state_c, token)
            torch.testing.assert_close(logits_c.float(), logits_e.float(), rtol=0.02, atol=0.05)


@pytest.mark.slow
def test_load_quantizes_weight_only_and_compiles():
    """llava.load(quantize="int4", compile=True) on the bundled model answers like fp32 on a plain question
    (the int8 layers' compiled form is checked above, so only 4-bit compiles here: compiling costs)."""
    reference = llava.load().generate("What color is the circle?", images=["examples/color.png"], temperature=0,
                                      max_new_tokens=8)
    pipe = llava.load(quantize="int4", compile=True)
    assert quantized_layers(pipe.model.language_model)
    assert pipe.engine.compiled_lean is not None
    answer = pipe.generate("What color is the circle?", images=["examples/color.png"], temperature=0,
                           max_new_tokens=8)
    assert answer == reference


def test_command_line_flags_choose_the_mode_and_compilation(capsys):
    from llava.cli import build_parser
    from llava.cli_args import quantize_from

    parser = build_parser()
    args = parser.parse_args(["run", "--query", "q", "--int4", "--compile"])
    assert (quantize_from(args), args.compile) == ("int4", True)
    args = parser.parse_args(["run", "--query", "q", "--int8-weight"])
    assert (quantize_from(args), args.compile, args.pack_weights) == ("int8-weight", False, False)
    assert parser.parse_args(["run", "--query", "q", "--pack-weights"]).pack_weights
    assert parser.parse_args(["run", "--query", "q", "--kv-cache-dtype", "bf16"]).kv_cache_dtype == "bf16"
    with pytest.raises(SystemExit):  # one quantization at a time
        parser.parse_args(["run", "--query", "q", "--int4", "--int8"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_load_packs_weights_on_request():
    """llava.load(pack_weights=True): the engine reads packed copies and answers as without them."""
    from llava.model.onednn import packable_dtypes

    question = dict(images=["examples/color.png"], temperature=0, max_new_tokens=8)
    plain = llava.load()
    assert plain.engine.lean.packer is None
    packed = llava.load(pack_weights=True)
    answer = packed.generate("What color is the circle?", **question)
    if torch.float32 in packable_dtypes():
        assert packed.engine.lean.packer.nbytes > 0
    assert answer == plain.generate("What color is the circle?", **question)


def test_load_keeps_the_kv_cache_in_the_dtype_asked_for():
    """llava.load(kv_cache_dtype="bf16") (`--kv-cache-dtype bf16`): the engine's cache is bf16 under the
    fp32 model and the bundled model still answers the README's question; a dtype it does not know
    is one clear error before anything loads."""
    pipe = llava.load(kv_cache_dtype="bf16")
    assert pipe.engine.kv_cache_dtype == torch.bfloat16 and pipe.model.dtype == torch.float32
    answer = pipe.generate("How many circles are there?", images=["examples/circles.png"], temperature=0,
                           max_new_tokens=4)
    assert answer.strip() == llava.load().generate("How many circles are there?", images=["examples/circles.png"],
                                                   temperature=0, max_new_tokens=4).strip()
    with pytest.raises(InputError, match="kv_cache_dtype: unknown dtype 'int3'"):
        llava.load(kv_cache_dtype="int3")

