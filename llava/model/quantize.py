"""Weight quantization of the language model only (the projector and vision tower stay as they are).

Decoding reads every language-model weight once per token, so on a CPU its speed is set by
weight bytes; int8 weights are the cheapest win. The vision tower runs once per image and
the projector is tiny and precision-sensitive, which is why the original LLaVA also skips
`mm_projector` when quantizing.

Modes:
- "int8-dynamic": `torch.ao.quantization.quantize_dynamic` on every nn.Linear of the language
  model (lm_head included: it is the largest single matrix). CPU only; int8 weights,
  activations quantized on the fly.
- "bnb-8bit": bitsandbytes LLM.int8() (`Linear8bitLt`, outlier threshold 6.0).
- "bnb-4bit": bitsandbytes NF4 with double quantization (`Linear4bit`), QLoRA's format.
  Both bnb modes keep lm_head unquantized, as transformers' bitsandbytes integration does.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from llava.errors import InputError, MissingDependency
from llava.model.llava import LlavaModel

MODES = ("int8-dynamic", "bnb-8bit", "bnb-4bit")
SKIP_BNB = ("lm_head",)


def quantize_language_model(model: LlavaModel, mode: str, compute_dtype: torch.dtype | None = None) -> LlavaModel:
    """Quantize `model.language_model`'s linear layers in place and return the model.

    `compute_dtype` (bnb-4bit only) is the dtype matmuls run in; default: the model's dtype.
    """
    if mode not in MODES:
        raise InputError(f"unknown quantization mode {mode!r}; valid: {', '.join(MODES)}")
    if mode == "int8-dynamic":
        _int8_dynamic(model)
    else:
        _bitsandbytes(model, bits=8 if mode == "bnb-8bit" else 4, compute_dtype=compute_dtype or model.dtype)
    return model


def _int8_dynamic(model: LlavaModel) -> None:
    device = model.device
    if device.type != "cpu":
        raise ValueError(f"int8-dynamic quantization runs on CPU only, but the model is on {device}; "
                         "move it with model.to('cpu') first, or use mode 'bnb-8bit' / 'bnb-4bit' on a GPU")
    if model.dtype != torch.float32:
        raise ValueError(f"int8-dynamic quantization expects fp32 weights, got {model.dtype}; "
                         "call model.float() first")
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # the API is deprecated in favour of torchao, which is slower here
        warnings.simplefilter("ignore")
        quantize_dynamic(model.language_model, {nn.Linear}, dtype=torch.qint8, inplace=True)


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
    targets = [(name, module) for name, module in model.language_model.named_modules()
               if isinstance(module, nn.Linear) and name.split(".")[-1] not in SKIP_BNB]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.language_model.get_submodule(parent_name) if parent_name else model.language_model
        setattr(parent, child, _bnb_linear(bnb, linear, bits, compute_dtype).to(device))  # .to() quantizes


def _bnb_linear(bnb, linear: nn.Linear, bits: int, compute_dtype: torch.dtype) -> nn.Module:
    """An unquantized bnb layer holding `linear`'s weights on CPU; moving it to a device quantizes it."""
    has_bias = linear.bias is not None
    weight = linear.weight.data.detach().cpu()
    if bits == 8:
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                  has_fp16_weights=False, threshold=6.0)
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                compress_statistics=True, quant_type="nf4")
        new.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                       module=new)
    if has_bias:
        new.bias = nn.Parameter(linear.bias.data.detach().cpu(), requires_grad=False)
    return new
