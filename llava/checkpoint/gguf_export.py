"""GGUF export for llama.cpp (llama-cli / llama-mtmd-cli, llama-cpp-python, Ollama): two files.

`<name>-<quant>.gguf` holds the language model as llama.cpp's `convert_hf_to_gguf.py` writes it
(LlamaModel: Llama and Mistral as `llama`, whose q/k rows are permuted for llama.cpp's
interleaved rotary layout; Qwen2Model: `qwen2`, unpermuted); `mmproj-<name>-<f16|f32>.gguf`
holds the vision tower and projector (see `gguf_mmproj`). The mmproj is f16 like llama.cpp's
converters' default (f32 when the language model is f32): 2-D weights and the patch convolution
in f16, vectors in f32.

Quantization (gguf-py's `gguf.quants`): 1-D tensors (norms, biases) stay f32 as in llama.cpp;
q8_0/q4_0 weights whose rows are not a multiple of 32 fall back to f16 (convert_hf_to_gguf's
rule); with q4_0 the output matrix is q8_0, since llama-quantize also keeps it at higher
precision (its Q6_K, which gguf-py cannot write).

Files are written in two passes (tensor infos, then data one tensor at a time), so a converted
copy of the whole model is never held in memory.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Callable

try:
    import gguf
except ImportError as err:  # the optional `gguf` extra
    from llava.errors import MissingDependency

    raise MissingDependency("writing GGUF files needs the gguf package: pip install 'llava[gguf]'") from err
import numpy as np
import torch

from llava.checkpoint.gguf_mmproj import add_mmproj_metadata, check_vision, mmproj_tensors
from llava.checkpoint.gguf_vocab import add_vocab
from llava.checkpoint.paths import check_output
from llava.config import LlavaConfig
from llava.errors import CheckpointError, InputError, OutputPathError
from llava.processing.templates import get_template, template_for_model

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from llava.checkpoint.loader import LoadedCheckpoint

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType
QUANTS: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (Q.F32, FT.ALL_F32), "f16": (Q.F16, FT.MOSTLY_F16), "bf16": (Q.BF16, FT.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, FT.MOSTLY_Q8_0), "q4_0": (Q.Q4_0, FT.MOSTLY_Q4_0),
}
# transformers model_type -> llama.cpp architecture (LLaVA-1.6 Mistral converts as llama, as in llama.cpp)
LM_ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
_SUFFIXES = (".weight", ".bias")
_QK = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")
TensorPlan = list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor], gguf.GGMLQuantizationType]]


def check_quant(quant: str) -> str:
    if quant not in QUANTS:
        raise InputError(f"unknown GGUF quantization {quant!r}; valid: {', '.join(QUANTS)}")
    return quant


def check_exportable(config: LlavaConfig) -> None:
    """Everything that would make the files unusable for llama.cpp, before anything is written."""
    text = config.text_config
    if text.model_type not in LM_ARCHS:
        raise InputError(f"GGUF export supports llama, mistral and qwen2 language models (llama.cpp's llama and "
                         f"qwen2 architectures); this model's language model is {text.model_type!r}")
    rope = getattr(text, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise InputError(f"GGUF export supports default and linear rotary scaling; this model uses "
                         f"{rope.get('rope_type')!r}")
    check_vision(config)


def check_gguf_output(src_folder: str, dst: str | os.PathLike, overwrite: bool) -> str:
    """`check_output`, except that `overwrite` may also replace an earlier GGUF export (a folder of
    .gguf files only, which has no config.json to mark it as a checkpoint folder)."""
    dst_abs = os.path.abspath(os.path.expanduser(os.fspath(dst)))
    entries = os.listdir(dst_abs) if os.path.isdir(dst_abs) and not os.path.islink(dst_abs) else []
    if not (overwrite and entries and all(e.endswith(".gguf") and os.path.isfile(os.path.join(dst_abs, e))
                                          for e in entries)):
        return check_output(src_folder, dst, overwrite)
    src_real, dst_real = os.path.realpath(src_folder), os.path.realpath(dst_abs)
    if os.path.commonpath([src_real, dst_real]) == src_real:
        raise OutputPathError(f"{dst} is inside the source folder {src_folder}; write the GGUF files to another "
                              "folder")
    return dst_abs


def gguf_file_names(name: str, quant: str) -> tuple[str, str]:
    """(language model, mmproj) file names, as llama.cpp's converters and the hub repos name them."""
    stem = os.path.basename(os.path.normpath(name)) or "model"
    return f"{stem}-{quant}.gguf", f"mmproj-{stem}-{'f32' if quant == 'f32' else 'f16'}.gguf"


def export_gguf(ckpt: LoadedCheckpoint, dst: str | os.PathLike, quant: str = "f16") -> list[str]:
    """Write the language-model and mmproj GGUF files for `ckpt` into `dst`; returns their paths."""
    check_quant(quant)
    check_exportable(ckpt.model.config)
    os.makedirs(dst, exist_ok=True)
    lm_path, mm_path = (os.path.join(str(dst), n) for n in gguf_file_names(ckpt.name, quant))
    state = ckpt.model.state_dict()
    write_language_model(ckpt, state, lm_path, quant)
    write_mmproj(ckpt, state, mm_path, "f32" if quant == "f32" else "f16")
    return [lm_path, mm_path]


def write_language_model(ckpt: LoadedCheckpoint, state: dict[str, torch.Tensor], path: str, quant: str) -> None:
    config = ckpt.model.config
    text = config.text_config
    arch = LM_ARCHS[text.model_type]
    n_vocab = ckpt.model.input_embeddings().weight.shape[0]
    template = get_template(config.template or template_for_model(ckpt.name)).chat_template()
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch])
    _add_lm_metadata(writer, text, ckpt.name, int(QUANTS[quant][1]), n_vocab)
    add_vocab(writer, ckpt.tokenizer, n_vocab, template)
    write_file(writer, path, lm_tensors(state, text, arch, QUANTS[quant][0]))


def write_mmproj(ckpt: LoadedCheckpoint, state: dict[str, torch.Tensor], path: str, quant: str) -> None:
    qtype, file_type = QUANTS[quant]
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    add_mmproj_metadata(writer, ckpt.model.config, ckpt.name, int(file_type), ckpt.image_processor.mean,
                        ckpt.image_processor.std)
    plan = [(name, tuple(t.shape), _getter(t), _mmproj_type(t, qtype))
            for name, t in mmproj_tensors(state, ckpt.model.config)]
    write_file(writer, path, plan)


def _add_lm_metadata(writer: gguf.GGUFWriter, text: PretrainedConfig, name: str, file_type: int, n_vocab: int) -> None:
    """The hyper-parameters convert_hf_to_gguf.py's TextModel / LlamaModel write."""
    rope = getattr(text, "rope_parameters", None) or {}
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(text.max_position_embeddings)
    writer.add_embedding_length(text.hidden_size)
    writer.add_block_count(text.num_hidden_layers)
    writer.add_feed_forward_length(text.intermediate_size)
    writer.add_head_count(text.num_attention_heads)
    writer.add_head_count_kv(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(text.rms_norm_eps)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def permute_qk(weight: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: rows of each head from HF's rotate-half order
    (pairs i, i + d/2) to llama.cpp's interleaved rotary pairs (2i, 2i + 1)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def lm_tensors(state: dict[str, torch.Tensor], text: PretrainedConfig, arch: gguf.MODEL_ARCH,
               qtype: gguf.GGMLQuantizationType) -> TensorPlan:
    """The language model's tensors under gguf-py's TensorNameMap names, with their storage types."""
    names = gguf.TensorNameMap(arch, text.num_hidden_layers)
    tied = bool(getattr(text, "tie_word_embeddings", False))
    n_head = text.num_attention_heads
    n_kv = getattr(text, "num_key_value_heads", None) or n_head
    plan: TensorPlan = []
    for key, value in state.items():
        if not key.startswith("language_model.") or (tied and key == "language_model.lm_head.weight"):
            continue  # a tied output matrix: llama.cpp reuses token_embd
        hf_key = key[len("language_model."):]
        name = names.get_name(hf_key, try_suffixes=_SUFFIXES)
        if name is None:
            raise CheckpointError(f"no llama.cpp (GGUF) name for the language-model weight {hf_key!r}")
        getter = _getter(value)
        if arch == gguf.MODEL_ARCH.LLAMA and hf_key.endswith(_QK):  # biases too, as convert_hf_to_gguf
            heads = (n_head, n_head) if "q_proj" in hf_key else (n_head, n_kv)
            getter = _getter(value, lambda t, h=heads: permute_qk(t, *h))
        plan.append((name, tuple(value.shape), getter, _lm_type(name, value.shape, qtype)))
    return plan


def _getter(tensor: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor] | None = None
            ) -> Callable[[], torch.Tensor]:
    """The tensor as float32 on the CPU, transformed only when it is written (pass two)."""
    def get() -> torch.Tensor:
        out = tensor.detach().to("cpu", torch.float32)
        return transform(out) if transform is not None else out
    return get


def _lm_type(name: str, shape: tuple[int, ...] | torch.Size, qtype: gguf.GGMLQuantizationType
             ) -> gguf.GGMLQuantizationType:
    if len(shape) <= 1 or qtype == Q.F32:
        return Q.F32
    if qtype == Q.Q4_0 and name == gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight":
        qtype = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else Q.F16


def _mmproj_type(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """The legacy converter's rule: vectors f32, matrices and the patch convolution in the file's type."""
    return Q.F32 if tensor.dim() <= 1 else qtype


def write_file(writer: gguf.GGUFWriter, path: str, plan: TensorPlan) -> None:
    """Header, metadata and tensor infos first, then each tensor's data converted as it is written."""
    for name, shape, _, qtype in plan:
        if qtype in (Q.F32, Q.F16):
            dtype = np.dtype(np.float32 if qtype == Q.F32 else np.float16)
            writer.add_tensor_info(name, shape, dtype, math.prod(shape) * dtype.itemsize)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=qtype)
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, _, get, qtype in plan:
            writer.write_tensor_data(gguf.quants.quantize(get().numpy(), qtype))
    finally:
        writer.close()
