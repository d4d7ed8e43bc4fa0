"""CPU decoding: our Engine against llama.cpp (llama-cpp-python) on the same weights, per precision.

The model is `bench-200m`'s language model (a 134M Llama, 12 x 768, vocabulary 32064; `--model
bench-1b`: a 1.1B one shaped as TinyLlama, 22 x 2048 with 4 KV heads) with
random weights and the tiny BPE tokenizer (llama.cpp needs real merges), exported with our own
`llava convert --to gguf` code, so both sides hold the same weights. Precisions, side by side:

    fp32 (ours) / f32 (GGUF)   bf16 / bf16   int8-dynamic, int8-weight / q8_0   int4-weight / q4_0

(our quantized rows quantize an fp32 model; `--quantized-base bf16` or `both` adds rows on a bf16
one, whose tower, attention and norms then run in bf16: a shorter time to first token, a slightly
slower batch-1 step).

Our rows come compiled and eager, each without and with oneDNN-packed weights (`--pack`,
`Engine(pack_weights=True)`: a second copy of the weights oneDNN reads faster; a compiled quantized
model, or a bf16 one where the CPU has AMX, then decodes through Inductor's autotuned GEMM templates,
which prepack their own copies: `llava.generate.compiled.AUTOTUNED`), and with the KV cache in the
model's dtype and/or bf16 (`--kv-cache`; llama.cpp's default cache is f16 whatever
the weights, so "bf16 KV" rows read what its rows read).

For each, in interleaved rounds (the machine is shared; medians are taken):
- batch-1 decode tokens/s: greedy, 128 new tokens after a 64-token text prompt, EOS ignored;
- ours at batch 8 (total tokens/s) and its ratio to our batch 1;
- prefill: llama.cpp's time to evaluate a 512-token prompt; ours: time to first token for a
  512-token prompt that holds one image (image encoding included);
- CPU pressure per round (Linux PSI: how long runnable tasks waited for a CPU), so a noisy
  round shows.
Beside the read bandwidth it prints the CPU's multiply-add rates (fp32, bf16, int8 products): the
roof that batches of 8 meet once the weights no longer bound them.
Then greedy-token agreement over the first 32 tokens with our fp32 model (the bench weights,
and the bundled tiny model for ours), and each batch-1 row as a fraction of the bandwidth
roofline (weight bytes read per token x tokens/s / measured read bandwidth).

llama-cpp-python is an optional benchmark dependency (CI does not install it; building it
from source takes 10-30 minutes on 2 cores: CMAKE_ARGS=-DGGML_NATIVE=ON pip install
llama-cpp-python). Without it the llama.cpp rows are left out.

    python benchmarks/bench_llamacpp.py --quick     # ~4 minutes: fewer tokens, one round
    python benchmarks/bench_llamacpp.py             # ~10 minutes
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from bench_generate import (FirstStepClock, cpu_stall_us, decode_weight_bytes, machine, multiply_add_rates,
                            read_bandwidth_gbs)

from llava.checkpoint.build import image_processor_for
from llava.checkpoint.gguf_export import export_gguf
from llava.checkpoint.loader import LoadedCheckpoint
from llava.config import preset
from llava.generate import Engine, Request, SamplingParams
from llava.model.llava import LlavaModel
from llava.model.cpu_kernels import kernel_path as quantized_kernel_path
from llava.model.onednn import cpu_linear_path
from llava.model.quantize import quantize_language_model
from llava.tiny import tiny_model

PRECISIONS = {  # name: (our dtype, our quantize modes (None: none), GGUF quant)
    "fp32": (torch.float32, (None,), "f32"),
    "bf16": (torch.bfloat16, (None,), "bf16"),
    "8-bit": (torch.float32, ("int8-dynamic", "int8-weight"), "q8_0"),
    "4-bit": (torch.float32, ("int4-weight",), "q4_0"),
}
PROMPT_TOKENS, PREFILL_TOKENS, AGREEMENT_TOKENS = 64, 512, 32
KV_CACHES = {"model": [""], "bf16": [", bf16 KV"], "both": ["", ", bf16 KV"]}  # --kv-cache: labels of our rows
QUANTIZED_BASES = {"fp32": [("", None)], "bf16": [(", bf16 model", torch.bfloat16)],  # --quantized-base
                   "both": [("", None), (", bf16 model", torch.bfloat16)]}


def model_bases(mode: str | None, quantized_base: str) -> list[tuple[str, torch.dtype | None]]:
    """(label, dtype) of the models our rows of `mode` run on: a quantized mode's per `--quantized-base`,
    an unquantized row's in its precision's dtype (None)."""
    return QUANTIZED_BASES[quantized_base] if mode else [("", None)]


@dataclass
class Variant:
    precision: str
    impl: str  # "ours (compiled)", "ours (eager, packed)", ..., "llama.cpp"
    decode: Callable[[int], tuple[float, list[int]]]  # new tokens -> (tokens/s after the first, token ids)
    prefill: Callable[[], float]  # seconds
    batch8: Callable[[int], float] | None = None  # new tokens -> total tokens/s
    weight_bytes: int = 0
    rates: list[float] = field(default_factory=list)
    prefills: list[float] = field(default_factory=list)
    batch8_rates: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


# Ours ------------------------------------------------------------------------------------------
def our_variant(precision: str, impl: str, model: LlavaModel, tok, prompt: list[int]) -> Variant:
    engine = Engine(model, tok, eos_token_ids=[], compile="compiled" in impl, pack_weights="packed" in impl,
                    kv_cache_dtype=torch.bfloat16 if "bf16 KV" in impl else None)
    clock = FirstStepClock(engine)

    def decode(new: int) -> tuple[float, list[int]]:
        clock.reset()
        out = engine.generate([Request(prompt)], SamplingParams(max_new_tokens=new, temperature=0))[0]
        return (new - 1) / (time.perf_counter() - clock.first_step), out.token_ids

    def batch8(new: int) -> float:
        clock.reset()
        engine.generate([Request(prompt)] * 8, SamplingParams(max_new_tokens=new, temperature=0))
        return 8 * (new - 1) / (time.perf_counter() - clock.first_step)

    size = (model.config.image_size,) * 2
    n_image = model.image_token_count(size)
    image_prompt = [1] + [model.config.image_token_index] * n_image + prompt[1:] * 16
    image_prompt = image_prompt[:PREFILL_TOKENS]
    pixels = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))

    def prefill() -> float:
        clock.reset()
        t0 = time.perf_counter()
        engine.generate([Request(image_prompt, pixel_values=[pixels.to(model.dtype)], image_sizes=[size])],
                        SamplingParams(max_new_tokens=2, temperature=0))
        return clock.first_step - t0

    return Variant(precision, impl, decode, prefill, batch8, decode_weight_bytes(model))


# llama.cpp -------------------------------------------------------------------------------------
def llamacpp_variant(precision: str, path: str, prompt: list[int], threads: int) -> Variant:
    import llama_cpp

    llm = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=PREFILL_TOKENS,
                          verbose=False)
    long_prompt = (prompt * (PREFILL_TOKENS // len(prompt) + 1))[:PREFILL_TOKENS]

    def decode(new: int) -> tuple[float, list[int]]:
        llm.reset()
        ids: list[int] = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            ids.append(token)
            if len(ids) == 1:
                t1 = time.perf_counter()
            if len(ids) == new:
                break
        return (new - 1) / (time.perf_counter() - t1), ids

    def prefill() -> float:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(long_prompt)
        return time.perf_counter() - t0

    variant = Variant(precision, "llama.cpp", decode, prefill, weight_bytes=gguf_decode_bytes(path))
    variant.close = llm.close  # type: ignore[attr-defined]
    return variant


def gguf_decode_bytes(path: str) -> int:
    """Bytes of a GGUF language model's tensors read per decoded token (all but the token embedding)."""
    import gguf

    reader = gguf.GGUFReader(path)
    return sum(int(t.n_bytes) for t in reader.tensors if not t.name.startswith("token_embd"))


def have_llamacpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


# The run ---------------------------------------------------------------------------------------
def build_bench_model(name: str = "bench-200m") -> tuple[LlavaModel, object, list[int]]:
    vocab = preset(name).text_config.vocab_size
    model, tok = tiny_model(name, vocab_size=vocab)
    g = torch.Generator().manual_seed(0)
    prompt = [tok.bos_token_id] + torch.randint(4, len(tok) - 1, (PROMPT_TOKENS - 1,), generator=g).tolist()
    return model, tok, prompt


def our_model(model: LlavaModel, precision: str, mode: str | None, dtype: torch.dtype | None = None) -> LlavaModel:
    """A copy of `model` in the precision's dtype (or `dtype`), quantized by `mode`."""
    ours = copy.deepcopy(model).to(dtype or PRECISIONS[precision][0])
    return quantize_language_model(ours, mode) if mode else ours


def ours_label(mode: str | None) -> str:
    return f"ours {mode}" if mode else "ours"


def agreement(a: list[int], b: list[int]) -> float:
    """Share of the first AGREEMENT_TOKENS greedy tokens (fewer where both answers end sooner) that
    match, counted up to the first difference: after it the two continue from different prefixes."""
    length = min(AGREEMENT_TOKENS, max(len(a), len(b)))
    n = 0
    for x, y in zip(a[:length], b[:length]):
        if x != y:
            break
        n += 1
    return n / length if length else 1.0


def tiny_agreement(precisions: list[str], kv_caches: list[str], quantized_base: str) -> dict[str, float]:
    """Our quantized rows (and bf16 KV caches) against fp32 on the bundled (trained) model, over a few
    example questions."""
    import llava

    questions = [("examples/shapes.png", "Describe the image in detail."),
                 ("examples/color.png", "What color is the circle?"),
                 ("examples/circles.png", "How many circles are there?")]
    root = os.path.join(os.path.dirname(__file__), "..")
    results: dict[str, float] = {}
    reference = None
    rows = [(p, mode, kv, base) for p in ["fp32"] + [p for p in precisions if p != "fp32"] for mode in PRECISIONS[p][1]
            for kv in kv_caches for base in model_bases(mode, quantized_base)]
    for precision, mode, kv, (base, base_dtype) in rows:
        dtype = base_dtype or PRECISIONS[precision][0]
        pipe = llava.load(dtype="bf16" if dtype == torch.bfloat16 else "fp32", quantize=mode,
                          kv_cache_dtype="bf16" if kv else None)
        prepared = [pipe.prepare(q, [os.path.join(root, img)]) for img, q in questions]
        answers = [c.token_ids for c in pipe.complete(prepared, max_new_tokens=AGREEMENT_TOKENS, temperature=0)]
        if reference is None:
            reference = answers
        shares = [agreement(r, a) for r, a in zip(reference, answers)]
        results[f"{precision} {ours_label(mode)}{kv}{base}"] = statistics.mean(shares)
    return results


def run(args: argparse.Namespace) -> tuple[list[Variant], list[int]]:
    """The timed variants, and our fp32 greedy tokens (the agreement reference)."""
    model, tok, prompt = build_bench_model(args.model)
    reference = Engine(model, tok, eos_token_ids=[]).generate(
        [Request(prompt)], SamplingParams(max_new_tokens=AGREEMENT_TOKENS, temperature=0))[0].token_ids
    variants: list[Variant] = []
    folder = tempfile.mkdtemp(prefix="bench-llamacpp-")
    ckpt = LoadedCheckpoint(model, tok, image_processor_for(model.config), layout="original", convention="original",
                            name=args.model)
    use_llamacpp = have_llamacpp() and not args.no_llamacpp
    if not use_llamacpp:
        print("llama-cpp-python is not installed: llama.cpp rows left out", flush=True)
    for precision in args.precisions:
        for mode in PRECISIONS[precision][1]:
            for base, dtype in model_bases(mode, args.quantized_base):
                ours, label = our_model(model, precision, mode, dtype), ours_label(mode)
                for packing in {"off": [""], "on": [", packed"], "both": ["", ", packed"]}[args.pack]:
                    for kv, impl in itertools.product(KV_CACHES[args.kv_cache],
                                                      ["compiled"] + (["eager"] if args.eager else [])):
                        variants.append(our_variant(precision, f"{label} ({impl}{packing}{kv}{base})", ours, tok,
                                                    prompt))
        if use_llamacpp:
            lm_path, _ = export_gguf(ckpt, folder, PRECISIONS[precision][2])
            variants.append(llamacpp_variant(precision, lm_path, prompt, torch.get_num_threads()))
    print("warm-up (compiles each compiled row: 20-60 s each)", flush=True)
    for v in variants:
        t0 = time.perf_counter()
        v.decode(4)
        v.prefill()
        if v.batch8:
            v.batch8(3)
        print(f"  {v.precision:6s} {v.impl:24s} {time.perf_counter() - t0:6.1f} s", flush=True)
    for r in range(args.rounds):
        stall0, wall0 = cpu_stall_us(), time.perf_counter()
        for v in variants:
            rate, ids = v.decode(args.new_tokens)
            v.rates.append(rate)
            v.tokens = v.tokens or ids
            v.prefills.append(v.prefill())
            if v.batch8:
                v.batch8_rates.append(v.batch8(args.new_tokens // 2))
        stall1 = cpu_stall_us()
        pressure = "" if stall0 is None or stall1 is None else \
            f", runnable tasks waited for a CPU {(stall1 - stall0) / 1e6 / (time.perf_counter() - wall0):.0%} of it"
        print(f"round {r + 1}/{args.rounds}: {time.perf_counter() - wall0:.0f} s{pressure}", flush=True)
    for v in variants:
        if hasattr(v, "close"):
            v.close()  # llama-cpp-python frees its model at interpreter exit otherwise, noisily
    return variants, reference


def table(variants: list[Variant], reference: list[int], bandwidth: float) -> str:
    lines = ["| precision | impl | decode b1 tok/s | vs llama.cpp | b8 total tok/s | b8/b1 | prefill 512 s "
             "| roofline | agreement (32 tok) |", "|" + "---|" * 9]
    for v in variants:
        rate = statistics.median(v.rates)
        llama = next((w for w in variants if w.precision == v.precision and w.impl == "llama.cpp"), None)
        vs = f"{rate / statistics.median(llama.rates):.2f}x" if llama else "-"
        b8 = statistics.median(v.batch8_rates) if v.batch8_rates else None
        lines.append(f"| {v.precision} | {v.impl} | {rate:.1f} | {vs} | {f'{b8:.1f}' if b8 else '-'} | "
                     f"{f'{b8 / rate:.1f}x' if b8 else '-'} | {statistics.median(v.prefills):.2f} | "
                     f"{v.weight_bytes * rate / (bandwidth * 1e9):.0%} | {agreement(reference, v.tokens):.0%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="32 new tokens, one round")
    ap.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    ap.add_argument("--rounds", type=int, help="interleaved rounds, medians taken (default 3; quick 1)")
    ap.add_argument("--new-tokens", type=int, help="new tokens per decode run (default 128; quick 32)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for both sides")
    ap.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                    help="also time our eager decode step (what compile=True buys)")
    ap.add_argument("--pack", choices=("off", "on", "both"), default="both",
                    help="our rows without and/or with oneDNN-packed weights (Engine(pack_weights=True))")
    ap.add_argument("--kv-cache", choices=list(KV_CACHES), default="model",
                    help="our KV cache in the model's dtype and/or in bf16 (Engine(kv_cache_dtype=torch.bfloat16); "
                         "llama.cpp keeps f16 by default)")
    ap.add_argument("--quantized-base", choices=list(QUANTIZED_BASES), default="fp32",
                    help="the model our 8- and 4-bit rows quantize: fp32 and/or bf16 (its other layers' dtype)")
    ap.add_argument("--no-llamacpp", action="store_true", help="leave the llama.cpp rows out")
    ap.add_argument("--model", choices=("bench-200m", "bench-1b"), default="bench-200m",
                    help="the language model: 134M (12 x 768), or 1.1B shaped as TinyLlama (22 x 2048, 4 KV heads)")
    args = ap.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.new_tokens = args.new_tokens or (32 if args.quick else 128)
    torch.set_num_threads(args.threads)
    print(f"{time.strftime('%Y-%m-%d')}  {machine()}")
    bandwidth = read_bandwidth_gbs()
    print(f"read bandwidth (1 GiB fp32 .sum(), median of 7): {bandwidth:.1f} GB/s", flush=True)
    rates = ", ".join(f"{name} {rate:.0f}" for name, rate in multiply_add_rates().items())
    print(f"multiply-adds (1024 x 1024 products, G/s): {rates}", flush=True)
    for packed in (False, True):
        print(f"eager decode-step linears{', packed' if packed else ''}: " + ", ".join(
            f"{name} {cpu_linear_path(dtype, packed)}" for name, dtype in (("fp32", torch.float32),
                                                                           ("bf16", torch.bfloat16))))
    print(f"quantized layers, few rows: {quantized_kernel_path()}", flush=True)
    variants, reference = run(args)
    print()
    print(table(variants, reference, bandwidth))
    print("\nGreedy agreement with fp32 on the bundled tiny model (first 32 tokens, 3 questions):")
    for precision, share in tiny_agreement(args.precisions, KV_CACHES[args.kv_cache], args.quantized_base).items():
        print(f"  {precision}: {share:.0%}")


if __name__ == "__main__":
    main()
