"""Peak memory of loading a checkpoint: does `llava.load` stay near the size of the model it gives back?

A ~1B-parameter random LLaVA (CLIP ViT-B/16 tower, 16-layer 2048-wide Llama, vocab 32000) is
saved once as a llava-hf folder in fp16, as the published LLaVA-1.5 checkpoints are stored. Each
case then loads it in a fresh subprocess and reports:
- base: RSS after importing torch, transformers and llava (the fixed overhead every load pays);
- peak: the process's peak RSS (Linux VmHWM) over the load, and its rise over `base`;
- model: bytes the loaded model holds (parameters, buffers, quantized weights and their scales);
- ratio: rise / model, the figure the streaming loader keeps near 1 (target: <= 1.25).
From the measured ratios it then says what LLaVA-1.5 7B and 13B need in each mode.

Quantized cases run twice: through `llava.load(quantize=...)` ("api") and through
`load_checkpoint(quantize=...)` ("loader"), which quantizes each linear as its weights arrive;
"api" matches "loader" once `llava.load` passes `quantize` on to `load_checkpoint`. 4-bit is
bitsandbytes' NF4, which runs on the CPU too; "int8" is torch's dynamic int8 (CPU only).

    python benchmarks/bench_load_memory.py                  # ~1B parameters, 3-5 minutes
    python benchmarks/bench_load_memory.py --layers 4       # ~0.35B, quicker
    python benchmarks/bench_load_memory.py --dir /tmp/ckpt  # keep (and reuse) the checkpoint
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

GIB = 2**30
CASES = [  # (entry, dtype, quantize)
    ("api", "fp32", None), ("api", "bf16", None), ("api", "fp32", "int8"), ("loader", "fp32", "int8"),
    ("api", "bf16", "4bit"), ("loader", "bf16", "4bit"), ("loader", "bf16", "8bit"),
]


# Memory -------------------------------------------------------------------------------------------
def model_bytes(model) -> int:
    """Bytes the model holds: parameters and buffers (tied ones once), plus what quantized layers keep
    outside them (bitsandbytes' scales and NF4 statistics)."""
    import torch

    total = sum(t.numel() * t.element_size() for t in model.parameters())
    total += sum(t.numel() * t.element_size() for t in model.buffers())
    for m in model.modules():
        weight = getattr(m, "weight", None)
        scb = getattr(weight, "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
        state = getattr(weight, "quant_state", None)
        while state is not None:
            total += sum(t.numel() * t.element_size() for t in vars(state).values() if isinstance(t, torch.Tensor))
            state = getattr(state, "state2", None)
    return total


# The checkpoint -----------------------------------------------------------------------------------
def bench_config(layers: int):
    """bench-200m's tower and projector with a 2048-wide Llama: ~1.05B parameters at 16 layers."""
    from llava.config import preset

    config = preset("bench-200m")
    text = config.text_config.to_dict() | dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                                                num_attention_heads=16, num_key_value_heads=16, head_dim=128,
                                                vocab_size=32000)
    return config.replace(text_config=text, image_token_index=511)  # the tiny tokenizer's <image>


def make_checkpoint(folder: str, layers: int) -> None:
    """Random weights (cheap uniform fill, not transformers' init) saved in fp16 as a llava-hf folder."""
    import torch

    from llava.checkpoint import save_checkpoint
    from llava.checkpoint.build import image_processor_for
    from llava.model.llava import LlavaModel
    from llava.tiny import tiny_tokenizer

    config = bench_config(layers)
    with torch.device("meta"):
        model = LlavaModel(config)
    model = model.to_empty(device="cpu").to(torch.float16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # buffers are left as they are: none is saved
            p.uniform_(-0.02, 0.02, generator=gen)
    save_checkpoint(model, tiny_tokenizer(), image_processor_for(config), folder, layout="hf")


# One load, in a fresh process ---------------------------------------------------------------------
def child(folder: str, entry: str, dtype: str, quantize: str | None) -> dict:
    import torch  # noqa: F401  the fixed overhead: imports, before the peak is reset
    import transformers  # noqa: F401
    from transformers import CLIPVisionModel, LlamaForCausalLM  # noqa: F401

    from bench_generate import reset_peak_rss, status_kb  # after torch and transformers: no new overhead

    import llava
    from llava.api import QUANTIZE_MODES, LlavaPipeline
    from llava.checkpoint import load_checkpoint

    if quantize in ("8bit", "4bit"):
        import bitsandbytes  # noqa: F401
    base = status_kb("VmRSS") * 1024
    reset_peak_rss()
    start = time.perf_counter()
    if entry == "api":
        model = llava.load(folder, dtype=dtype, quantize=quantize).model
    else:
        ckpt = load_checkpoint(folder, dtype=dtype, quantize=QUANTIZE_MODES[quantize])
        model = LlavaPipeline(ckpt).model
    seconds = time.perf_counter() - start
    peak = status_kb("VmHWM") * 1024
    return {"entry": entry, "dtype": dtype, "quantize": quantize, "base": base, "peak": peak,
            "after": status_kb("VmRSS") * 1024, "model": model_bytes(model), "seconds": seconds}


def run_case(folder: str, entry: str, dtype: str, quantize: str | None) -> dict | None:
    cmd = [sys.executable, __file__, "--child", folder, entry, dtype, str(quantize)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    if proc.returncode != 0:
        print(f"  {entry} {dtype} {quantize}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Report -------------------------------------------------------------------------------------------
def loader_quantizes() -> bool:
    from llava.checkpoint import load_checkpoint

    return "quantize" in inspect.signature(load_checkpoint).parameters


def table(rows: list[dict]) -> None:
    print(f"{'case':<18} {'model GiB':>9} {'base GiB':>8} {'peak GiB':>8} {'rise GiB':>8} {'rise/model':>10} "
          f"{'after GiB':>9} {'load s':>6}")
    for r in rows:
        rise = r["peak"] - r["base"]
        name = f"{r['entry']} {r['dtype']}" + (f" {r['quantize']}" if r["quantize"] else "")
        print(f"{name:<18} {r['model'] / GIB:>9.2f} {r['base'] / GIB:>8.2f} {r['peak'] / GIB:>8.2f} {rise / GIB:>8.2f} "
              f"{rise / r['model']:>10.2f} {r['after'] / GIB:>9.2f} {r['seconds']:>6.1f}")


def preset_sizes(name: str) -> dict[str, int]:
    """Bytes of a preset's loaded model per mode, from a meta build (no memory): fp32, bf16, int8
    (language-model linears at 1 byte, the tower in bf16 where the CPU has bf16 instructions
    (`llava.model.quantize.vision_tower_dtype`), the rest fp32), 8bit (LLM.int8: the LM's linears but
    lm_head at 1 byte + a scale per row, the rest bf16) and 4bit (NF4, ~4.13 bits with double
    quantization, for the same linears; the rest bf16)."""
    import torch
    from torch import nn

    from llava.config import preset
    from llava.model.llava import LlavaModel
    from llava.model.quantize import vision_tower_dtype

    with torch.device("meta"):
        model = LlavaModel(preset(name))
    total = sum(p.numel() for p in model.parameters())
    tower = sum(p.numel() for p in model.vision_tower.parameters())
    linears = {n: m for n, m in model.language_model.named_modules() if isinstance(m, nn.Linear)}
    lm_head = linears.pop("lm_head").weight.numel()
    body = sum(m.weight.numel() for m in linears.values())
    rows = sum(m.out_features for m in linears.values())
    tower_bytes = vision_tower_dtype("int8", torch.float32, torch.device("cpu")).itemsize
    int8 = 4 * (total - body - lm_head - tower) + tower_bytes * tower + body + lm_head
    bnb8 = 2 * (total - body) + body + 4 * rows
    nf4 = 2 * (total - body) + body * 4.13 / 8
    return {"fp32": 4 * total, "bf16": 2 * total, "int8": int(int8), "8bit": int(bnb8), "4bit": int(nf4)}


def projection(rows: list[dict], budget_gib: float = 24.0) -> None:
    """What LLaVA-1.5 7B / 13B need to load: base + the mode's best measured rise/model ratio x their size."""
    ratio: dict[str, float] = {}
    for r in rows:
        mode = r["quantize"] or r["dtype"]
        ratio[mode] = min(ratio.get(mode, 9e9), (r["peak"] - r["base"]) / r["model"])
    base = min(r["base"] for r in rows)
    print(f"\nProjected load peak = {base / GIB:.2f} GiB base + ratio x model size, on a {budget_gib:.0f} GiB "
          "machine (generation then needs its KV cache and activations on top):")
    print(f"{'model':<16} {'mode':<5} {'ratio':>5} {'model GiB':>9} {'peak GiB':>8}  verdict")
    for name in ("llava-v1.5-7b", "llava-v1.5-13b"):
        for mode, size in preset_sizes(name).items():
            if mode in ratio:
                peak = base + ratio[mode] * size
                verdict = "fits" if peak < budget_gib * GIB else "does not fit"
                print(f"{name:<16} {mode:<5} {ratio[mode]:>5.2f} {size / GIB:>9.1f} {peak / GIB:>8.1f}  {verdict}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16, help="Llama layers (16: ~1B parameters)")
    ap.add_argument("--dir", default=None, help="checkpoint folder to write or reuse (default: a temp folder)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        folder, entry, dtype, quantize = args.child
        print(json.dumps(child(folder, entry, dtype, None if quantize == "None" else quantize)))
        return
    folder = args.dir or tempfile.mkdtemp(prefix="bench-load-")
    try:
        if not os.path.isfile(os.path.join(folder, "config.json")):
            start = time.perf_counter()
            make_checkpoint(folder, args.layers)
            print(f"wrote {folder} in {time.perf_counter() - start:.0f} s")
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        import llava

        print(f"checkpoint: {size / GIB:.2f} GiB on disk; llava from {os.path.dirname(llava.__file__)}; "
              f"torch {__import__('torch').__version__}, {platform.machine()}, {os.cpu_count()} CPUs")
        cases = [c for c in CASES if c[0] == "api" or loader_quantizes()]
        rows = [r for c in cases if (r := run_case(folder, *c)) is not None]
        table(rows)
        projection(rows)
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
