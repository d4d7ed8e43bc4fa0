"""Command-line flags shared by every entry point: `llava run/chat`, `python -m llava.serve.cli`, and
any server front end (e.g. a `llava serve` command in `llava.serve`).

It lives here, not in `llava.cli`, so `llava.serve` and `llava.eval` can share the flags without
importing the top-level command (which imports them: that would be a cycle). It imports neither
torch nor transformers at module level, so argument errors (`--help`, a missing image) stay fast;
the model loads only in `load_from_args`.
"""

from __future__ import annotations

import argparse
from typing import Any

QUANTIZE_FLAGS = (("load_8bit", "8bit"), ("load_4bit", "4bit"), ("int8", "int8"), ("int8_weight", "int8-weight"),
                  ("int4", "int4"))


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Which checkpoint, where, and how: --model/--model-path, --model-base, --device, quantization, ..."""
    p.add_argument("--model", "--model-path", dest="model", default=None,
                   help="checkpoint folder or hub name (default: the bundled tiny model)")
    p.add_argument("--model-base", default=None, help="base LM for LoRA or projector-only checkpoints")
    p.add_argument("--vision-tower", default=None, help="local folder of the vision tower, overriding the checkpoint's")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="default: fp32 on CPU, bf16/fp16 on GPU")
    p.add_argument("--template", "--conv-mode", dest="template", default=None,
                   help="conversation template (default: from the model)")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--load-8bit", action="store_true", help="8-bit weights through bitsandbytes")
    q.add_argument("--load-4bit", action="store_true", help="4-bit nf4 weights through bitsandbytes")
    q.add_argument("--int8", action="store_true",
                   help="int8 language model, activations quantized to int8 on the fly (CPU; the fastest 8-bit)")
    q.add_argument("--int8-weight", action="store_true", help="weight-only int8 language model (CPU)")
    q.add_argument("--int4", action="store_true", help="weight-only 4-bit language model, groups of 32 (CPU)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (20-60 s once; faster CPU decoding)")
    p.add_argument("--pack-weights", action="store_true",
                   help="CPU: oneDNN-packed copies of the language model's weights (faster prefills and batches; "
                        "twice its weight memory)")
    p.add_argument("--kv-cache-dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="the KV cache's dtype (default: the model's); bf16 under fp32 weights halves what each "
                        "new token's attention reads, as llama.cpp's f16 cache")


def add_sampling_args(p: argparse.ArgumentParser, temperature: float = 0.2, max_new_tokens: int = 512) -> None:
    """--temperature, --top-p, --top-k, --max-new-tokens, --seed (underscore spellings accepted too)."""
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=1.0)
    p.add_argument("--top-k", dest="top_k", type=int, default=0)
    p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=max_new_tokens)
    p.add_argument("--seed", type=int, default=None)


def sampling_from(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags as keyword arguments, checked now so bad values fail before the model loads."""
    from llava.api import sampling_params

    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                "max_new_tokens": args.max_new_tokens, "seed": args.seed}
    sampling_params(**sampling)
    return sampling


def images_from(args: argparse.Namespace) -> list:
    """Every --image decoded now (a missing or corrupt one fails before the model loads, or torch is imported)."""
    from llava.processing.image_io import load_image

    return [load_image(image) for image in args.image or []]


def quantize_from(args: Any) -> str | None:
    """`llava.load`'s quantize mode from --load-8bit / --load-4bit / --int8 / --int8-weight / --int4
    (absent flags count as off)."""
    return next((mode for flag, mode in QUANTIZE_FLAGS if getattr(args, flag, False)), None)


def load_from_args(args: argparse.Namespace):
    """The pipeline `add_model_args`' flags describe (`llava.api.load`)."""
    from llava.api import load

    return load(args.model, model_base=args.model_base, device=args.device, dtype=args.dtype,
                vision_tower=args.vision_tower, template=args.template, quantize=quantize_from(args),
                compile=getattr(args, "compile", False), pack_weights=getattr(args, "pack_weights", False),
                kv_cache_dtype=getattr(args, "kv_cache_dtype", None))
