"""llava's native CPU kernels (llava.model.cpu_kernels): built at first use where the CPU can run them,
exact where they run, and PyTorch's kernels, said so, where they cannot be built or are turned off."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

from llava.generate.compiled import attend_one_row
from llava.model import cpu_kernels, onednn
from llava.model.int8_dynamic import Int8DynamicLinear
from llava.model.int4_weight import Int4WeightOnlyLinear
from llava.model.woq import FEW_ROWS, Int8WeightOnlyLinear, fuse_outputs

CAN_BUILD = (torch.cpu._is_avx512_bf16_supported() and torch.cpu._is_vnni_supported()
             and shutil.which(os.environ.get("CXX", "c++")) is not None)


def _needs_kernel() -> None:
    if CAN_BUILD:  # a CPU and compiler that can build it: a failed build is a failure here, not a skip
        assert cpu_kernels.available(), cpu_kernels.kernel_path()
    elif not cpu_kernels.available():
        pytest.skip(f"the kernels do not run here: {cpu_kernels.kernel_path()}")


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17])
@pytest.mark.parametrize("in_features", [4, 36, 100, 768])  # whole 32- and 64-column steps, and tails
@pytest.mark.parametrize("out_features", [1, 13, 130])  # whole tiles of weight rows and leftovers
def test_int8_kernels_are_the_exact_products(rows, in_features, out_features):
    """bf16 x int8 products are exact in fp32, and only the fp32 sums round; uint8 x int8 ones sum
    exactly in int32."""
    _needs_kernel()
    g = torch.Generator().manual_seed(rows * 1000 + in_features + out_features)
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    weight = torch.randint(-127, 128, (out_features, in_features), generator=g, dtype=torch.int8)
    scale = torch.rand(out_features, generator=g) + 0.1
    out = torch.ops.llava_cpu.int8_weight_mm(x, weight, scale)
    exact = (x.double() @ weight.double().t()) * scale.double()
    assert out.dtype == torch.float32 and out.shape == (rows, out_features)
    assert float((out.double() - exact).norm() / exact.norm()) < 1e-6
    # int8-dynamic's: activation codes (the extremes included) + 128 as bytes, an exact integer product
    codes = torch.randint(-127, 128, (rows, in_features), generator=g)
    codes[0, :] = torch.where(weight[0] >= 0, 127, -127)
    sums = weight.sum(1, dtype=torch.int32)
    product = torch.ops.llava_cpu.int8_codes_mm((codes + 128).to(torch.uint8), weight, sums)
    assert product.dtype == torch.int32 and torch.equal(product.long(), codes @ weight.long().t())


def _activation_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The int4 kernel's view of x [M, K] (q8_0's): per group of 32 columns, int8 codes, their scale
    max |x| / 127 and the group's exact sum."""
    groups = x.double().view(x.shape[0], -1, 32)
    scale = (groups.abs().amax(-1, keepdim=True).float() / 127).double()  # as the kernel, in fp32
    codes = torch.where(scale > 0, (groups.float() / scale.float().clamp(min=1e-30)).round(), 0).double()
    return codes, scale, groups.sum(-1)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 16])
@pytest.mark.parametrize("in_features, out_features", [(32, 64), (64, 192), (768, 128), (64, 80), (96, 48)])
def test_int4_weight_kernel_is_the_product_of_the_weights_it_packs(rows, in_features, out_features):
    """The int4 kernel reads llava's row-block layout (tiles of 4 blocks of 16 rows, and the 1-3 blocks
    left), and the activations as int8 codes per group of 32 (llama.cpp's q8_0): per group, scale *
    x_scale * sum(code * q) + (zero - 8 * scale) * sum(x), to fp32's rounding. The codes cost ~1% of
    the output against bf16 activations (the 4-bit weights ~8%)."""
    _needs_kernel()
    torch.manual_seed(rows * 1000 + in_features + out_features)
    layer = Int4WeightOnlyLinear.from_linear(nn.Linear(in_features, out_features, bias=False), row_blocks=True)
    assert layer.row_blocks and layer.native and layer.kernel_rows is None
    x = torch.randn(rows, in_features).bfloat16()
    x[0, 32:64] = 0  # an all-zero group (where there are two): codes 0, scale 0
    out = torch.ops.llava_cpu.int4_weight_mm(x, layer.packed)
    codes, x_scale, x_sums = _activation_codes(x)
    weight = layer.dequantized(torch.float32).double().view(out_features, -1, 32)  # [N, G, 32]
    scale, zero = layer.scales_and_zeros.double().unbind(-1)  # [G, N] each
    base = zero - 8 * scale  # the value of code 0
    weight_codes = ((weight - base.t()[..., None]) / scale.t()[..., None]).round()  # [N, G, 32]
    expected = (torch.einsum("mgk,ngk->mng", codes, weight_codes) * x_scale[:, None, :, 0] * scale.t()
                + x_sums[:, None, :] * base.t()).sum(-1)
    assert out.dtype == torch.float32 and out.shape == (rows, out_features)
    assert float((out.double() - expected).norm() / expected.norm()) < 1e-5
    exact = x.double() @ layer.dequantized(torch.float32).double().t()
    assert float((out.double() - exact).norm() / exact.norm()) < 0.03


def test_int4_prefills_dequantize_in_one_pass_to_the_same_weights():
    """Many rows multiply the weights dequantized by the kernels ([in, out], computed in fp32 and
    rounded once to bf16), the weights `dequantized` reads back from the packed bytes."""
    _needs_kernel()
    torch.manual_seed(3)
    layer = Int4WeightOnlyLinear.from_linear(nn.Linear(96, 80), row_blocks=True)  # 5 blocks of 16 rows
    transposed = torch.ops.llava_cpu.int4_dequantize_t(layer.packed)
    assert transposed.dtype == torch.bfloat16 and transposed.shape == (96, 80)
    exact = layer.dequantized(torch.float32)
    assert ((transposed.t().float() - exact).abs() <= exact.abs() * 2**-8 + 1e-30).all()
    x = torch.randn(2, 20, 96)  # 40 rows: more than FEW_ROWS
    expected = nn.functional.linear(x.bfloat16().float(), transposed.t().float(), layer.bias)
    layer.kernel_rows = FEW_ROWS  # as on a CPU with AMX
    torch.testing.assert_close(layer(x), expected, rtol=0.01, atol=0.01)


def test_int4_prefills_take_the_kernel_row_by_row_without_amx():
    """Layers take llava's layout where its kernel runs. Without AMX a prefill's rows go through the
    VNNI kernel as a decode step's do, each row the same as alone (its activation codes are per row),
    so a prompt's keys do not depend on its length; with AMX they dequantize for its bf16 GEMM."""
    _needs_kernel()
    torch.manual_seed(4)
    layer = Int4WeightOnlyLinear.from_linear(nn.Linear(128, 64))
    assert layer.row_blocks and layer.kernel_rows == (FEW_ROWS if onednn.amx() else None)
    layer.kernel_rows = None
    x = torch.randn(3, 30, 128)
    out = layer(x)
    assert torch.equal(out, torch.cat([layer(row) for row in x.reshape(-1, 1, 128)]).reshape(3, 30, 64))
    exact = nn.functional.linear(x, layer.dequantized(torch.float32), layer.bias)
    assert float((out - exact).norm() / exact.norm()) < 0.03


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_weight_prefills_scale_the_product_of_the_codes(dtype):
    """Past the kernel's rows a prefill multiplies the codes (exact in bf16) and scales the product: the
    exact product of the stored weights but for bf16's rounding of the activations and result."""
    torch.manual_seed(6)
    layer = Int8WeightOnlyLinear.from_linear(nn.Linear(96, 80)).to(dtype)
    x = torch.randn(3, 100, 96, dtype=dtype)  # 300 rows: past NATIVE_INT8_ROWS
    out = layer(x)
    assert out.dtype == dtype and out.shape == (3, 100, 80)
    exact = nn.functional.linear(x.float(), layer.dequantized(torch.float32), layer.bias.float())
    assert float((out.float() - exact).norm() / exact.norm()) < 0.01


@pytest.mark.parametrize("kind", [Int8WeightOnlyLinear, Int4WeightOnlyLinear, Int8DynamicLinear])
def test_quantized_layers_take_the_kernels_eagerly_and_compiled(kind):
    """Few rows take the kernels: int8-dynamic's gives `_int_mm`'s results exactly, int8-weight's ATen's
    kernel's but for its bf16 rounding of the scales, int4's within its activation codes; fused layers
    give their parts' outputs exactly; torch.compile keeps the ops whole."""
    _needs_kernel()
    torch.manual_seed(0)
    linears = [nn.Linear(256, n) for n in (128, 64, 64)]
    parts = [kind.from_linear(linear) for linear in linears]
    layer = parts[0]
    assert layer.native
    x = torch.randn(8, 256)
    out = layer(x)
    if kind is Int8DynamicLinear:
        assert torch.equal(out, layer.kernel_product(x))
    elif kind is Int8WeightOnlyLinear:
        exact = nn.functional.linear(x.bfloat16().float(), layer.dequantized(torch.float32), layer.bias)
        torch.testing.assert_close(out, layer.kernel_product(x), rtol=0.02, atol=0.02)
        torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-5)
    else:  # int4 takes the activations as int8 codes (test_int4_weight_kernel_is_the_product_of_the_weights_it_packs)
        exact = nn.functional.linear(x.bfloat16().float(), layer.dequantized(torch.float32), layer.bias)
        aten = kind.from_linear(linears[0], row_blocks=False)  # the same codes, in ATen's layout
        for reference in (exact, aten.kernel_product(x)):
            assert float((out - reference).norm() / reference.norm()) < 0.03
    fused = fuse_outputs(parts)
    assert fused.native and torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    compiled = torch.compile(layer.few_rows_product, fullgraph=True)
    torch.testing.assert_close(compiled(x[:3]), layer(x[:3]), rtol=1e-6, atol=1e-6)

@pytest.mark.parametrize("dim, group", [(16, 1), (64, 1), (64, 7), (80, 4), (128, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("span", [1, 16, 33])
def test_decode_attention_is_the_steps_attention(dim, group, dtype, span):
    """llava's decode attention computes `attend_one_row` (the compiled step's written-out form) to
    fp32's rounding: any head size it takes, query heads sharing a KV head, an fp32 or bf16 cache
    read up to the mask's length, left padding and a hole masked out, tails of 16 columns."""
    _needs_kernel()
    torch.manual_seed(dim + group + span)
    batch, kv_heads, capacity = 3, 2, 40
    keys, values = (torch.randn(batch, kv_heads, capacity, dim).to(dtype) for _ in range(2))
    q = torch.randn(batch, kv_heads, group, dim)
    filled = torch.ones(batch, span)
    if span > 1:
        filled[1, :span // 2] = 0  # left padding
        filled[2, span - 2] = 0  # a hole
    mask = torch.zeros(batch, span).masked_fill(filled == 0, float("-inf"))
    out = torch.ops.llava_cpu.decode_attention(q, keys, values, mask, dim ** -0.5)
    expected = attend_one_row(q, keys[:, :, :span], values[:, :, :span], mask[:, None, None], dim ** -0.5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


FALLBACK = """
import logging, torch
logging.basicConfig(level=logging.WARNING)
from llava.model import cpu_kernels, onednn
from llava.model.int8_dynamic import Int8DynamicLinear
from llava.model.int4_weight import Int4WeightOnlyLinear
from llava.model.woq import Int8WeightOnlyLinear
torch.manual_seed(0)
x = torch.randn(4, 64)
from llava.model.int8_dynamic import Int8DynamicLinear
for kind in (Int8WeightOnlyLinear, Int4WeightOnlyLinear, Int8DynamicLinear):
    layer = kind.from_linear(torch.nn.Linear(64, 64))
    assert not layer.native and torch.equal(layer(x), layer.kernel_product(x))
assert not cpu_kernels.available()  # asked again: not built again, not warned again
print("PATH", cpu_kernels.kernel_path())
"""


@pytest.mark.parametrize("how", ["no compiler", "turned off"])
def test_without_the_kernel_int8_layers_keep_atens_and_say_why(tmp_path, how):
    """A CPU or machine that cannot build the kernels (here: a compiler that always fails), or
    LLAVA_CPU_KERNELS=0: quantized layers run ATen's kernels, and the path says why, once."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}  # a build of its own, not the shared cache's
    if how == "no compiler":
        if not torch.cpu._is_avx512_bf16_supported():
            pytest.skip("no build is tried on a CPU without AVX512-BF16")
        env["CXX"] = "/bin/false"
    else:
        env["LLAVA_CPU_KERNELS"] = "0"
    done = subprocess.run([sys.executable, "-c", FALLBACK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    path = done.stdout.split("PATH ", 1)[1]
    assert path.startswith("ATen")
    if how == "no compiler":
        assert "could not be built" in path and done.stderr.count("could not be built") == 1, done.stderr[-3000:]
        assert "Traceback" not in done.stderr
    else:
        assert "LLAVA_CPU_KERNELS=0" in path and "could not be built" not in done.stderr
