"""Generation speed: our Engine vs transformers' LlavaForConditionalGeneration.generate, same weights.

For each preset (random weights) and dtype it measures, side by side in one process:
- TTFT: image encoding + prefill + first token, batch 1 (one image + ~32 text tokens);
- decode tokens/s at batch 1 and total at batch 8: B*(N-1) / (T(N new tokens) - T(1 new token));
- peak memory: the rise of the process's peak RSS (Linux VmHWM, reset through /proc/self/clear_refs)
  over the RSS just before a batch-8 generate call, i.e. activations + KV cache + temporaries;
- for bench-200m, batch-1 decode as a fraction of the memory-bandwidth limit:
  weight bytes read per token x tokens/s / measured read bandwidth.
Greedy throughout, with EOS suppressed on both sides (min_new_tokens=max_new_tokens for
transformers, no EOS ids for ours) so every run makes exactly N tokens. Each figure is the
median of several repeats: the machines are shared.

    python benchmarks/bench_generate.py --quick      # ~2 minutes
    python benchmarks/bench_generate.py              # full run (adds the torch.compile row)
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from llava.checkpoint.hf import save_hf
from llava.config import preset
from llava.generate import Engine, Request, SamplingParams
from llava.model.llava import LlavaModel
from llava.model.onednn import cpu_linear_path
from llava.model.quantize import quantize_language_model
from llava.tiny import tiny_model

TEXT_TOKENS = 32
Timing = tuple[float, float]  # (TTFT s, seconds for the remaining N-1 tokens)


@dataclass
class Row:
    preset: str
    impl: str
    dtype: str
    ttft_ms: float
    tps_b1: float
    tps_b8: float
    peak_mb: float
    bw_frac: float | None = None


# Memory ----------------------------------------------------------------------------------
def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Make the peak RSS (VmHWM) the current RSS, after handing freed heap back so the baseline is
    honest: a peak read later is then the next work's own (Linux >= 4.0; OSError elsewhere)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def timed_peak_rss_rise(fn: Callable[[], Timing]) -> tuple[Timing, float]:
    """(fn's result, MB by which the peak RSS during fn() exceeds the RSS before; NaN where unsupported)."""
    try:
        reset_peak_rss()
        before = status_kb("VmRSS")
    except OSError:
        before = None
    result = fn()
    return result, float("nan") if before is None else (status_kb("VmHWM") - before) / 1024


def cpu_stall_us() -> int | None:
    """Cumulative microseconds in which some runnable task waited for a CPU (Linux PSI), or None."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().split("total=")[1])
    except (OSError, IndexError, ValueError):
        return None


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    """The median wall time of `repeats` calls of `call`, after one untimed call that warms it up."""
    call()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def read_bandwidth_gbs(gib: float = 1.0, repeats: int = 7) -> float:
    """Read-only memory bandwidth: a large fp32 tensor's `.sum()`, median of several passes."""
    x = torch.ones(int(gib * 2**30) // 4)
    return x.numel() * 4 / median_seconds(x.sum, repeats) / 1e9


def multiply_add_rates(size: int = 1024, repeats: int = 5) -> dict[str, float]:
    """G multiply-adds/s of one size x size product per dtype, median of several: the arithmetic roof
    that a batch's linears meet once reading the weights is no longer what bounds them (fp32 and
    bf16 `mm`, int8 `_int_mm`; a dtype this build cannot multiply is left out)."""
    products = {"fp32": (torch.float32, torch.mm), "bf16": (torch.bfloat16, torch.mm),
                "int8": (torch.int8, getattr(torch, "_int_mm", None))}
    rates = {}
    for name, (dtype, product) in products.items():
        a, b = (torch.ones(size, size).to(dtype) for _ in range(2))
        try:
            seconds = median_seconds(lambda: product(a, b), repeats)
        except (RuntimeError, TypeError):
            continue
        rates[name] = size**3 / seconds / 1e9
    return rates


def decode_weight_bytes(model: LlavaModel) -> int:
    """Bytes of language-model weights read per decode step (all but the embedding table, read one row)."""
    lm = model.language_model
    emb = lm.get_input_embeddings().weight
    return sum(t.numel() * t.element_size() for t in lm.state_dict().values()
               if isinstance(t, torch.Tensor) and t.data_ptr() != emb.data_ptr())


# Models and prompts --------------------------------------------------------------------------
def synthetic_tokenizer(vocab_size: int):
    """A byte-level tokenizer of exactly `vocab_size` ids (1- and 2-byte tokens) for random-weight models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    names = ["<unk>", "<s>", "</s>"] + alphabet + [a + b for a in alphabet for b in alphabet]
    tok = Tokenizer(models.BPE(vocab={n: i for i, n in enumerate(names[:vocab_size])}, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build(name: str, seed: int = 0):
    if name == "tiny":
        return tiny_model("tiny", seed=seed)
    config = preset(name)
    torch.manual_seed(seed)
    return LlavaModel(config).eval(), synthetic_tokenizer(config.text_config.vocab_size)


def hf_twin(model: LlavaModel, folder: str):
    from transformers import LlavaForConditionalGeneration

    save_hf(model.state_dict(), model.config, folder)
    return LlavaForConditionalGeneration.from_pretrained(folder).eval()


def prompt(model: LlavaModel, seed: int = 0) -> tuple[list[int], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = model.config.image_size
    n_img = model.image_token_count((s, s))
    text = torch.randint(10, min(model.config.text_config.vocab_size, 30000), (TEXT_TOKENS,), generator=g).tolist()
    ids = [1] + [model.config.image_token_index] * n_img + text
    return ids, torch.randn(1, 3, s, s, generator=g)


# Timed runs ------------------------------------------------------------------------------------
# Each run reports (TTFT, seconds for the remaining N-1 tokens), read off clocks inside the same
# run, so the noisy prefill never enters the decode figure by subtraction.
class FirstStepClock:
    """Notes when an Engine's first decode step of a generate call starts: token 1 is out by then, so
    time to first token and decode time split there. Instrumentation only: wraps `engine.decode_step`."""

    def __init__(self, engine: Engine) -> None:
        self._times: list[float] = []
        step = engine.decode_step

        def clocked_step(state, tokens):
            if not self._times:
                self._times.append(time.perf_counter())
            return step(state, tokens)
        engine.decode_step = clocked_step  # type: ignore[method-assign]

    def reset(self) -> None:
        """Call before each generate."""
        self._times.clear()

    @property
    def first_step(self) -> float:
        return self._times[0]


def ours_runner(engine: Engine, ids: list[int], pixels: torch.Tensor) -> Callable[[int, int], Timing]:
    model = engine.model
    size = (model.config.image_size,) * 2
    clock = FirstStepClock(engine)

    def run(batch: int, new: int) -> Timing:
        clock.reset()
        t0 = time.perf_counter()
        with torch.inference_mode():
            feats = model.encode_images([pixels.to(model.dtype)] * batch, [size] * batch)
        engine.generate([Request(ids, [f]) for f in feats], SamplingParams(max_new_tokens=new))
        end = time.perf_counter()
        return clock.first_step - t0, end - clock.first_step
    return run


class TokenClock:
    """A transformers streamer that only notes when the first new token arrives and when generation ends."""

    def __init__(self) -> None:
        self.puts = 0
        self.first = self.end_time = 0.0

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:  # the first put is the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        self.end_time = time.perf_counter()


def hf_runner(hf, ids: list[int], pixels: torch.Tensor) -> Callable[[int, int], Timing]:
    def run(batch: int, new: int) -> Timing:
        clock = TokenClock()
        t0 = time.perf_counter()
        x = torch.tensor([ids] * batch)
        with torch.inference_mode():
            hf.generate(input_ids=x, attention_mask=torch.ones_like(x), pixel_values=pixels.repeat(batch, 1, 1, 1)
                        .to(hf.dtype), do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                        streamer=clock)
        return clock.first - t0, time.perf_counter() - clock.first
    return run


@dataclass
class Variant:
    impl: str
    dtype: torch.dtype
    run: Callable[[int, int], Timing]
    model: LlavaModel  # whose language-model weights a decode step reads
    times: dict[int, list[Timing]] = field(default_factory=dict)  # batch size -> timings
    peak_mb: float = float("nan")


def time_round_robin(variants: list[Variant], new: int, repeats: int) -> None:
    """Time batch 1 and batch 8, alternating variants within each repeat.

    The machine is shared and its speed drifts over minutes, so ours and transformers'
    runs are interleaved rather than timed in separate blocks; medians are taken later.
    """
    for v in variants:  # warm-up: lazy initialisation and thread pools; compilation needs batch 8 too
        v.run(1, 3)
        if v.impl.endswith("compile"):
            v.run(8, 3)
    for r in range(repeats):
        for v in variants:
            for batch in (1, 8):
                if r == repeats - 1 and batch == 8:
                    timing, v.peak_mb = timed_peak_rss_rise(lambda: v.run(batch, new))
                else:
                    timing = v.run(batch, new)
                v.times.setdefault(batch, []).append(timing)
        print(f"    repeat {r + 1}/{repeats} done", flush=True)


def bench_preset(name: str, new: int, repeats: int, bandwidth: float | None, compile_row: bool,
                 dtypes: list[torch.dtype]) -> list[Row]:
    model, tok = build(name)
    ids, pixels = prompt(model)
    with tempfile.TemporaryDirectory() as folder:
        hf = hf_twin(model, folder)
    variants: list[Variant] = []
    for dtype in dtypes:
        ours_m = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
        hf_m = hf if dtype == torch.float32 else copy.deepcopy(hf).to(dtype)
        variants.append(Variant("ours", dtype, ours_runner(Engine(ours_m, tok, eos_token_ids=[]), ids, pixels), ours_m))
        variants.append(Variant("transformers", dtype, hf_runner(hf_m, ids, pixels), ours_m))
    q = quantize_language_model(copy.deepcopy(model), "int8-dynamic")
    variants.append(Variant("ours int8-dynamic", torch.float32,
                            ours_runner(Engine(q, tok, eos_token_ids=[]), ids, pixels), q))
    if compile_row:
        engine = Engine(model, tok, eos_token_ids=[], compile=True)
        variants.append(Variant("ours compile", torch.float32, ours_runner(engine, ids, pixels), model))
    time_round_robin(variants, new, repeats)

    rows = []
    for v in variants:
        ttft = statistics.median(t for t, _ in v.times[1])
        b1 = (new - 1) / statistics.median(d for _, d in v.times[1])
        b8 = 8 * (new - 1) / statistics.median(d for _, d in v.times[8])
        frac = decode_weight_bytes(v.model) * b1 / (bandwidth * 1e9) if bandwidth else None
        rows.append(Row(name, v.impl, str(v.dtype).removeprefix("torch."), ttft * 1e3, b1, b8, v.peak_mb, frac))
        print(f"  {name:10s} {v.impl:18s} {rows[-1].dtype:8s} ttft {ttft * 1e3:7.1f} ms  b1 {b1:7.1f} tok/s  "
              f"b8 {b8:7.1f} tok/s  peak +{v.peak_mb:6.0f} MB", flush=True)
    return rows


def table(rows: list[Row]) -> str:
    head = ("| preset | impl | dtype | TTFT ms | decode tok/s b1 | total tok/s b8 | b8/b1 | peak RSS rise MB (b8) "
            "| b1 bandwidth frac |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        frac = f"{r.bw_frac:.0%}" if r.bw_frac is not None else "-"
        lines.append(f"| {r.preset} | {r.impl} | {r.dtype} | {r.ttft_ms:.1f} | {r.tps_b1:.1f} | {r.tps_b8:.1f} | "
                     f"{r.tps_b8 / r.tps_b1:.1f}x | {r.peak_mb:.0f} | {frac} |")
    lines += ["", "Ratios to transformers at the same dtype (TTFT: lower is better; tokens/s: higher is better)", "",
              "| preset | impl | dtype | TTFT | decode b1 | total b8 | peak RSS rise |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        hf = next((h for h in rows if h.impl == "transformers" and (h.preset, h.dtype) == (r.preset, r.dtype)), None)
        if r.impl == "transformers" or hf is None:
            continue
        lines.append(f"| {r.preset} | {r.impl} | {r.dtype} | {r.ttft_ms / hf.ttft_ms:.2f}x | {r.tps_b1 / hf.tps_b1:.2f}x"
                     f" | {r.tps_b8 / hf.tps_b8:.2f}x | {r.peak_mb / hf.peak_mb:.2f}x |")
    return "\n".join(lines)


def machine() -> str:
    name = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{name}, {os.cpu_count()} logical CPUs ({torch.backends.cpu.get_cpu_capability()}), "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repeats (~2 minutes)")
    ap.add_argument("--presets", nargs="+", default=["tiny", "bench-200m"])
    ap.add_argument("--new-tokens", type=int, help="new tokens per timed run (default 128 tiny / 64 200m; quick 32/16)")
    ap.add_argument("--repeats", type=int, help="timed repeats per figure, median taken (default 3; quick 2)")
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"],
                    help="dtypes to compare (default both; --quick: bfloat16 for tiny only, as bf16 prefill of "
                         "bench-200m takes many seconds on CPUs without native bf16)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="add the torch.compile row (default: on for full runs, off for --quick)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    repeats = args.repeats or (2 if args.quick else 3)
    compile_row = (not args.quick) if args.compile is None else args.compile
    print(f"{time.strftime('%Y-%m-%d')}  {machine()}")
    stall0, wall0 = cpu_stall_us(), time.perf_counter()
    bandwidth = read_bandwidth_gbs()
    print(f"read bandwidth (1 GiB fp32 .sum(), median of 7): {bandwidth:.1f} GB/s", flush=True)
    print("eager decode-step linears: " + ", ".join(
        f"{name} {cpu_linear_path(dtype)}" for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))))
    rows: list[Row] = []
    for name in args.presets:
        new = args.new_tokens or {True: 32, False: 128}[args.quick] // (1 if name == "tiny" else 2)
        print(f"{name}: {new} new tokens, median of {repeats}", flush=True)
        names = args.dtypes or (["float32"] if args.quick and name != "tiny" else ["float32", "bfloat16"])
        dtypes = [getattr(torch, d) for d in names]
        rows += bench_preset(name, new, repeats, bandwidth if name != "tiny" else None, compile_row, dtypes)
    print()
    print(table(rows))
    stall1 = cpu_stall_us()
    if stall0 is not None and stall1 is not None:  # how contended the (shared) machine was meanwhile
        wall = time.perf_counter() - wall0
        print(f"\nCPU pressure during the run: runnable tasks waited for a CPU {(stall1 - stall0) / 1e6 / wall:.0%} "
              f"of the {wall / 60:.1f} min wall time (0% = machine to ourselves)")


if __name__ == "__main__":
    main()
