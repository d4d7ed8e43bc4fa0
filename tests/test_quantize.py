"""Language-model quantization: each mode generates, stays close to fp32, and leaves vision parts
unquantized (llava's CPU modes run an fp32 tower in bf16 where the CPU has bf16 instructions)."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llava.generate import Engine, Request, SamplingParams
from llava.model import quantize
from llava.model.onednn import native_bf16
from llava.model.quantize import CPU_KERNELS, quantize_language_model, vision_tower_dtype
from llava.model.quantize import WEIGHT_ONLY

# Worst-position cosine similarity of last-layer logits to fp32 on the tiny model. Measured
# 2026-11: bnb-8bit 0.99995, bnb-4bit 0.9906 (NF4 is coarser by design); 2026-12: int8-dynamic
# 0.99984 (torch.ao's per-tensor int8 before it: 0.9994).
MIN_COSINE = {"int8-dynamic": 0.99, "bnb-8bit": 0.99, "bnb-4bit": 0.97}


@pytest.fixture(scope="module")
def tiny(tiny_tok):
    from llava.tiny import tiny_model

    model, tok = tiny_model("tiny", tokenizer=tiny_tok)
    ids = [1] + [model.config.image_token_index] * model.image_token_count((28, 28)) + list(range(10, 50))
    with torch.inference_mode():
        feats = model.encode_images([torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))],
                                    [(28, 28)])
    return model, tok, Request(ids, feats)


def _logits(model, req: Request) -> torch.Tensor:
    with torch.inference_mode():
        embeds = model.embed(torch.tensor([req.input_ids]), req.image_features)
        return model.language_model(inputs_embeds=embeds).logits[0].float()


@pytest.mark.parametrize("mode", list(MIN_COSINE))
def test_quantized_model_generates_and_stays_close(tiny, mode):
    if mode.startswith("bnb"):
        pytest.importorskip("bitsandbytes")
    model, tok, req = tiny
    quant = quantize_language_model(copy.deepcopy(model), mode)
    cosine = F.cosine_similarity(_logits(quant, req), _logits(model, req), dim=-1)
    assert cosine.min() > MIN_COSINE[mode]
    done = Engine(quant, tok, eos_token_ids=[]).generate([req], SamplingParams(max_new_tokens=6))
    assert len(done[0].token_ids) == 6

    # Vision tower and projector are untouched; inside the LM every linear layer but (for bnb) lm_head changed.
    for part in (quant.vision_tower, quant.projector):
        assert all(type(m) is nn.Linear for m in part.modules() if isinstance(m, nn.Linear))
    names = [n for n, m in model.language_model.named_modules() if isinstance(m, nn.Linear)]
    plain = [n for n in names if type(quant.language_model.get_submodule(n)) is nn.Linear]
    assert len(names) > 1 and plain == ([] if mode == "int8-dynamic" else ["lm_head"])


def test_int8_dynamic_speaks_plainly_about_devices_and_modes(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="CPU only"):
        quantize_language_model(copy.deepcopy(model).to("meta"), "int8-dynamic")
    with pytest.raises(ValueError, match="valid: int8-dynamic"):
        quantize_language_model(model, "int3")


@pytest.mark.parametrize("in_features,out_features,bias", [(37, 11, True), (64, 48, False)])
def test_int8_dynamic_linear_is_the_integer_product_of_its_codes(in_features, out_features, bias):
    """Every row count takes one path: codes per row, an exact integer product, both scales."""
    from llava.model.int8_dynamic import Int8DynamicLinear

    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    layer = Int8DynamicLinear.from_linear(linear)
    for rows in (1, 5, 40):
        x = torch.randn(2, rows, in_features, generator=g)
        flat = x.reshape(-1, in_features)
        row_scale = flat.abs().amax(1, keepdim=True) / 127
        codes = (flat / row_scale).round()
        assert codes.abs().max() <= 127
        expected = (codes.long() @ layer.weight.long().t()).float() * row_scale * layer.scale
        expected = expected.reshape(2, rows, out_features) + (linear.bias.detach() if bias else 0)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
        assert F.cosine_similarity(layer(x).flatten(), linear(x).detach().flatten(), dim=0) > 0.999
        half = layer(x.bfloat16())
        assert half.dtype == torch.bfloat16
        torch.testing.assert_close(half.float(), expected, rtol=0.02, atol=0.02)
    compiled = torch.compile(layer)
    one = torch.randn(1, 1, in_features, generator=g)
    torch.testing.assert_close(compiled(one), layer(one), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_features,out_features,bias", [(37, 11, True), (64, 48, False)])
def test_int8_dynamic_packed_form_gives_the_layers_products(in_features, out_features, bias):
    """Batches may read a oneDNN-reordered copy (`WeightPacker`): the same integer products (one
    row keeps `_int_mm`), made once per weight; on a CPU whose oneDNN would saturate, no copy."""
    from llava.model.int8_dynamic import Int8DynamicLinear, PackedInt8DynamicLinear, exact_unsigned_product
    from llava.model.onednn import WeightPacker

    g = torch.Generator().manual_seed(1)
    layer = Int8DynamicLinear.from_linear(nn.Linear(in_features, out_features, bias=bias))
    packer = WeightPacker()
    if layer.native:  # llava's kernel takes the batches here, and the layer makes no copy
        assert packer.part(layer) is None
        layer.native = False  # the copy's path, as on CPUs without the kernel
    packed = packer.part(layer)
    if not exact_unsigned_product():
        assert packed is None
        return
    assert isinstance(packed, PackedInt8DynamicLinear) and packer.part(layer).packed is packed.packed
    assert packer.nbytes == layer.weight.numel()
    for rows in (1, 2, 8, 40):
        x = torch.randn(3, rows, in_features, generator=g) * 4
        torch.testing.assert_close(packed(x), layer(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(packed(x.bfloat16()), layer(x.bfloat16()), rtol=8e-3, atol=1e-3)  # 1 bf16 ulp
    # the largest codes in every position: exact where 16-bit pair sums would overflow
    extreme = torch.where(layer.weight[:1].float() >= 0, 1.0, -1.0).repeat(4, 1)
    torch.testing.assert_close(packed(extreme), layer(extreme), rtol=1e-6, atol=1e-6)
    compiled = torch.compile(lambda x: packed(x))
    x = torch.randn(5, in_features, generator=g)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


def test_int8_dynamic_is_not_packed_where_onednn_would_saturate(monkeypatch):
    import llava.model.int8_dynamic as int8_dynamic
    from llava.model.onednn import WeightPacker

    monkeypatch.setattr(int8_dynamic, "exact_unsigned_product", lambda: False)
    layer = int8_dynamic.Int8DynamicLinear.from_linear(nn.Linear(32, 16))
    packer = WeightPacker()
    assert packer.part(layer) is None and packer.nbytes == 0


def test_layers_that_do_not_pack_themselves_are_left_alone():
    """Only plain linears and layers with `packed_weight()` get copies; the weight-only layers (an
    int4 one has no `weight` at all) stay as they are."""
    from llava.model.onednn import WeightPacker
    from llava.model.int4_weight import Int4WeightOnlyLinear
    from llava.model.woq import Int8WeightOnlyLinear

    packer = WeightPacker()
    for kind in (Int4WeightOnlyLinear, Int8WeightOnlyLinear):
        assert packer.part(kind.from_linear(nn.Linear(64, 64))) is None
    assert packer.nbytes == 0


def test_int8_dynamic_quantizes_a_bf16_model_too(tiny):
    model, tok, req = tiny
    half = copy.deepcopy(model).to(torch.bfloat16)
    quant = quantize_language_model(copy.deepcopy(half), "int8-dynamic")
    half_req = Request(req.input_ids, [f.to(torch.bfloat16) for f in req.image_features])
    cosine = F.cosine_similarity(_logits(quant, half_req), _logits(half, half_req), dim=-1)
    assert cosine.min() > MIN_COSINE["int8-dynamic"]
    done = Engine(quant, tok, eos_token_ids=[]).generate([half_req], SamplingParams(max_new_tokens=4))
    assert len(done[0].token_ids) == 4


def test_missing_bitsandbytes_is_a_clear_import_error(tiny, monkeypatch):
    model, _, _ = tiny
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        quantize_language_model(copy.deepcopy(model), "bnb-4bit")


@pytest.mark.parametrize("mode", list(CPU_KERNELS))
def test_cpu_modes_run_an_fp32_tower_in_bf16_where_the_cpu_has_bf16(tiny, mode):
    """As the field's quantized setups keep a 16-bit tower (the original's fp16 under --load-4bit, llama.cpp's
    f16 mmproj): bf16 where native, else as loaded. The projector stays fp32; the features move ~1%."""
    model, tok, req = tiny
    quant = quantize_language_model(copy.deepcopy(model), mode)
    assert quant.vision_tower.dtype == (torch.bfloat16 if native_bf16() else torch.float32)
    assert {p.dtype for p in quant.projector.parameters()} == {torch.float32}
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        feats = quant.encode_images([pixels], [(28, 28)])[0]
    reference = req.image_features[0]
    assert feats.dtype == torch.float32 and float((feats - reference).norm() / reference.norm()) < 0.03
    image_request = Request(req.input_ids, pixel_values=[pixels], image_sizes=[(28, 28)])
    done = Engine(quant, tok, eos_token_ids=[]).generate([image_request], SamplingParams(max_new_tokens=4))
    assert len(done[0].token_ids) == 4


def test_only_an_fp32_cpu_tower_under_llavas_modes_changes_dtype(monkeypatch):
    monkeypatch.setattr(quantize, "native_bf16", lambda: True)
    for mode in ("int8", "int8-dynamic", "int8-weight", "int4", "int4-weight"):
        assert vision_tower_dtype(mode, torch.float32, torch.device("cpu")) == torch.bfloat16
    assert vision_tower_dtype("int4", torch.float16, torch.device("cpu")) == torch.float16
    assert vision_tower_dtype("int4", torch.float32, torch.device("meta")) == torch.float32
    for mode in ("4bit", "bnb-8bit"):
        assert vision_tower_dtype(mode, torch.float32, torch.device("cpu")) == torch.float32
    monkeypatch.setattr(quantize, "native_bf16", lambda: False)  # bf16 emulated: slower than fp32
    assert vision_tower_dtype("int4", torch.float32, torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("mode, stored, biased", [
    ("int4", torch.float32, False), ("int8", torch.float32, False), ("int8", torch.float16, True),
    ("int4", torch.bfloat16, True), ("int8-weight", torch.float16, False)])
def test_a_quantizing_load_makes_the_model_a_load_then_quantize_makes(tiny, tmp_path, monkeypatch, mode, stored,
                                                                       biased):
    """Each linear quantized as it arrives (its weight from a 16-bit file read in the file's precision,
    a bias in the model's) and the tower read straight into its dtype: the same layers, dtypes, tower
    and logits as quantizing the loaded fp32 model, linears the mode keeps included (int4 here keeps
    the MLP's down projections); `biased`: attention with biases, as Qwen2's."""
    from llava.checkpoint import load_checkpoint, save_checkpoint
    from llava.checkpoint.build import image_processor_for
    from llava.model.llava import LlavaModel

    model, tok, req = tiny
    if biased:
        text = model.config.text_config.to_dict() | {"attention_bias": True}
        torch.manual_seed(2)
        model = LlavaModel(model.config.replace(text_config=text)).eval()
        assert model.language_model.model.layers[0].self_attn.q_proj.bias is not None
    wide = model.config.text_config.intermediate_size
    int4 = WEIGHT_ONLY["int4-weight"]
    monkeypatch.setattr(int4, "fits", staticmethod(lambda linear, fits=int4.fits: fits(linear)
                                                   and linear.in_features != wide))
    save_checkpoint(copy.deepcopy(model).to(stored), copy.deepcopy(tok), image_processor_for(model.config), tmp_path,
                    layout="hf")
    streamed = load_checkpoint(tmp_path, dtype="fp32", quantize=mode).model
    after = quantize_language_model(load_checkpoint(tmp_path, dtype="fp32").model, quantize.ALIASES[mode])
    assert streamed.vision_tower.dtype == after.vision_tower.dtype
    assert streamed.state_dict().keys() == after.state_dict().keys()
    for key, value in after.state_dict().items():
        assert streamed.state_dict()[key].dtype == value.dtype, key
        assert torch.equal(streamed.state_dict()[key], value), key
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        feats = [m.encode_images([pixels], [(28, 28)]) for m in (streamed, after)]
    ids = req.input_ids
    torch.testing.assert_close(_logits(streamed, Request(ids, feats[0])), _logits(after, Request(ids, feats[1])),
                               rtol=0, atol=0)
