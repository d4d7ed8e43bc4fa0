"""Weight quantization of the language model only (the projector and vision tower are not quantized).

Decoding reads every language-model weight once per token, so on a CPU its speed is set by
weight bytes; int8 weights are the cheapest win. The vision tower runs once per image and
the projector is tiny and precision-sensitive, which is why the original LLaVA also skips
`mm_projector` when quantizing. The tower is a 16-bit one in the quantized setups of the field
(the original's `--load-4bit` loads it in fp16; llama.cpp's mmproj files, ours included, are f16),
so llava's CPU modes put an fp32 tower in bf16 where the CPU computes bf16 natively
(`vision_tower_dtype`): bench-200m's time to first token (image + 512-token prefill) with int4
on the Zen 5 EPYC 0.266 -> 0.231 s; its features move ~0.9%, against the 4-bit weights' ~8%.

Modes:
- "int8-dynamic": int8 weights (per output row) times activations quantized to int8 on the fly
  (per row), through oneDNN's integer matmul (`llava.model.int8_dynamic`), on every linear of
  the language model (lm_head included: it is the largest single matrix). CPU only. The
  fastest CPU decoding, with `Engine(compile=True)`.
- "int8-weight" / "int4-weight": weight-only int8 (per output row) and 4-bit (groups of 32)
  through PyTorch's packed CPU kernels or llava's (`llava.model.woq`, `llava.model.int4_weight`),
  lm_head included; activations stay in the model's dtype (fp32 or bf16), so int8-weight is the
  more accurate 8-bit mode. Layers whose shape the kernels cannot take stay unquantized.
- "bnb-8bit": bitsandbytes LLM.int8() (`Linear8bitLt`, outlier threshold 6.0).
- "bnb-4bit": bitsandbytes NF4 with double quantization (`Linear4bit`), QLoRA's format.
  Both bnb modes keep lm_head unquantized, as transformers' bitsandbytes integration does.

The checkpoint loader quantizes while it reads (`LinearQuantizer`: each linear as soon as its
weights are in), then calls `quantize_language_model` for what is left (lm_head, after any
vocabulary resize); the layers are the ones a load-then-quantize makes, identical outputs.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from llava.errors import InputError, MissingDependency
from llava.model.int4_weight import Int4WeightOnlyLinear
from llava.model.int8_dynamic import Int8DynamicLinear
from llava.model.llava import LlavaModel
from llava.model.onednn import native_bf16
from llava.model.woq import Int8WeightOnlyLinear

# The weight-only modes' layers (activations in the model's dtype).
WEIGHT_ONLY: dict[str, type[nn.Module]] = {"int8-weight": Int8WeightOnlyLinear,
                                            "int4-weight": Int4WeightOnlyLinear}
# Modes whose layers are ours, on PyTorch's CPU kernels or llava's.
CPU_KERNELS: dict[str, type[nn.Module]] = {"int8-dynamic": Int8DynamicLinear, **WEIGHT_ONLY}

MODES = ("int8-dynamic", "int8-weight", "int4-weight", "bnb-8bit", "bnb-4bit")
# llava.load's and the CLI's names
ALIASES = {"int8": "int8-dynamic", "int8-weight": "int8-weight", "int4": "int4-weight", "8bit": "bnb-8bit",
           "4bit": "bnb-4bit"}
SKIP_BNB = ("lm_head",)


def quantize_language_model(model: LlavaModel, mode: str, compute_dtype: torch.dtype | None = None) -> LlavaModel:
    """Quantize `model.language_model`'s linear layers in place and return the model.

    `compute_dtype` (bnb-4bit only) is the dtype matmuls run in; default: the model's dtype.
    Layers already quantized (by a quantizing load) are left as they are.
    """
    if mode not in MODES:
        raise InputError(f"unknown quantization mode {mode!r}; valid: {', '.join(MODES)}")
    if mode in CPU_KERNELS:
        _cpu_kernels(model, mode)
        model.vision_tower.to(vision_tower_dtype(mode, model.vision_tower.dtype, model.device))
    else:
        _bitsandbytes(model, bits=8 if mode == "bnb-8bit" else 4, compute_dtype=compute_dtype or model.dtype)
    return model


def vision_tower_dtype(mode: str, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The vision tower's dtype in a model of `dtype` that `mode` quantizes: bf16 for an fp32 one in
    llava's CPU modes where the CPU computes bf16 natively (module docstring), else `dtype`."""
    if (ALIASES.get(mode, mode) in CPU_KERNELS and dtype == torch.float32 and torch.device(device).type == "cpu"
            and native_bf16()):
        return torch.bfloat16
    return dtype


def check_mode(mode: str, device: torch.device) -> str:
    """The mode's full name, once it is known to work for a model on `device` (before
    a loader reads any weight): our int8/int4 modes need the CPU, bnb modes need bitsandbytes."""
    mode = ALIASES.get(mode, mode)
    if mode not in MODES:
        raise InputError(f"unknown quantization mode {mode!r}; valid: {', '.join(MODES)}")
    if mode in CPU_KERNELS:
        _check_cpu_mode(mode, torch.device(device))
    else:
        _import_bnb()
    return mode


class LinearQuantizer:
    """For a loader: `(model, name, linear) ->` the quantized layer that replaces one just-filled
    language-model linear (None: keep it), so the full-precision model never exists at once.

    `keep_output` keeps the output layer (lm_head) for `quantize_language_model` to quantize once
    the model is complete, for a loader that resizes the vocabulary first. `dtype` is the model's
    dtype (bnb-4bit's compute dtype, as `quantize_language_model` takes it).
    """

    def __init__(self, mode: str, device: torch.device, dtype: torch.dtype, keep_output: bool = False) -> None:
        self.mode = check_mode(mode, device)
        self.device, self.dtype, self.keep_output = device, dtype, keep_output
        self._bnb = _import_bnb() if self.mode.startswith("bnb") else None

    def __call__(self, model: LlavaModel, name: str, linear: nn.Linear) -> nn.Module | None:
        if not name.startswith("language_model."):
            return None
        if self.keep_output and linear is model.language_model.get_output_embeddings():
            return None
        if self.mode in CPU_KERNELS:
            kind = CPU_KERNELS[self.mode]
            return kind.from_linear(linear) if kind.fits(linear) else None
        if name.split(".")[-1] in SKIP_BNB:
            return None
        return _bnb_linear(self._bnb, linear, 8 if self.mode == "bnb-8bit" else 4, self.dtype).to(self.device)

    def reads_stored(self, name: str) -> bool:
        """Whether linear `name`'s weight may be read in its file's precision where that is narrower
        than the model's. Our CPU modes widen each row to fp32 before quantizing, so their layer is
        the same either way, and an fp16 lm_head read for an fp32 int8 model is then a load's largest
        temporary at half the size; bitsandbytes quantizes what it is given, so it reads the model's."""
        return self.mode in CPU_KERNELS and name.startswith("language_model.")


def quantized_layers(module: nn.Module) -> list[nn.Module]:
    """The layers of `module` that quantizing made (ours on CPU kernels, bitsandbytes)."""
    kinds: tuple[type, ...] = tuple(CPU_KERNELS.values())
    if "bitsandbytes" in sys.modules:
        bnb = sys.modules["bitsandbytes"]
        kinds += (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    return [m for m in module.modules() if isinstance(m, kinds)]


def _check_cpu_mode(mode: str, device: torch.device) -> None:
    if device.type != "cpu":
        raise ValueError(f"{mode} quantization runs on CPU only (PyTorch's CPU kernels), but the model is on "
                         f"{device}; move it with model.to('cpu') first, or use bnb-8bit / bnb-4bit on a GPU")


def _cpu_kernels(model: LlavaModel, mode: str) -> None:
    _check_cpu_mode(mode, model.device)
    lm = model.language_model
    kind = CPU_KERNELS[mode]
    for name, linear in [(n, m) for n, m in lm.named_modules() if type(m) is nn.Linear and kind.fits(m)]:
        parent_name, _, child = name.rpartition(".")
        setattr(lm.get_submodule(parent_name) if parent_name else lm, child, kind.from_linear(linear))


def _import_bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise MissingDependency("bnb-8bit / bnb-4bit quantization needs the bitsandbytes package: "
                          "pip install bitsandbytes  (or pip install 'llava[quant]')") from err
    return bnb


def _bitsandbytes(model: LlavaModel, bits: int, compute_dtype: torch.dtype) -> None:
    bnb = _import_bnb()
    device = model.device
    done = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    targets = [(name, module) for name, module in model.language_model.named_modules()
               if isinstance(module, nn.Linear) and not isinstance(module, done) and name.split(".")[-1] not in SKIP_BNB]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.language_model.get_submodule(parent_name) if parent_name else model.language_model
        setattr(parent, child, _bnb_linear(bnb, linear, bits, compute_dtype).to(device))  # .to() quantizes


def _bnb_linear(bnb, linear: nn.Linear, bits: int, compute_dtype: torch.dtype) -> nn.Module:
    """An unquantized bnb layer holding `linear`'s weights on CPU; moving it to a device quantizes it."""
    has_bias = linear.bias is not None
    weight = linear.weight.data.detach().cpu()
    # device="meta": the layer's own placeholder weight, replaced just below, costs no memory and no
    # random init (an fp32 matrix per layer, whose freed pages the heap would keep during a load).
    if bits == 8:
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                  has_fp16_weights=False, threshold=6.0, device="meta")
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                compress_statistics=True, quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                       module=new)
    if has_bias:
        new.bias = nn.Parameter(linear.bias.data.detach().cpu(), requires_grad=False)
    return new
