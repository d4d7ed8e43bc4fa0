"""Load test of `llava serve`: concurrent streaming clients against one server process, on loopback.

For each concurrency level (default 1, 4, 16) it sends a bounded number of streaming chat
requests with an example image, each with a fixed answer length (`ignore_eos`), and reports
requests/s, p50/p95 latency and time to first token, plus the ratios to concurrency 1 (the
one-request-at-a-time server a user would otherwise run, such as the original model worker).
Checks as it goes: every request ends with a complete answer or a clean error; at temperature
0 each answer equals the same request's answer when it ran alone (so nothing is lost,
duplicated or mixed with another's); the server's RSS after the run is within a small margin
of before. The levels run interleaved over several rounds and the medians are reported.

    python benchmarks/bench_serve.py                 # ~2-3 min on 2 cores
    python benchmarks/bench_serve.py --quick         # ~1 min
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from serve_helpers import free_port, start, stop, wait_until_up

QUESTIONS = ["What shape is in the image?", "What color is the object?", "Describe the image in detail.",
             "Where is the object?", "How many objects are there?"]
IMAGES = ["shape.png", "color.png", "shapes.png", "position.png", "circles.png", "choice.png"]


@dataclass
class Result:
    ok: bool
    text: str
    ttft: float
    latency: float
    error: str = ""


def bodies(n: int, max_tokens: int) -> list[dict]:
    """n distinct requests (image x question), greedy, each answering exactly max_tokens tokens."""
    out = []
    for i in range(n):
        image = base64.b64encode((ROOT / "examples" / IMAGES[i % len(IMAGES)]).read_bytes()).decode()
        content = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                   {"type": "text", "text": QUESTIONS[(i // len(IMAGES)) % len(QUESTIONS)]}]
        out.append({"model": "tiny-llava", "messages": [{"role": "user", "content": content}], "stream": True,
                    "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True})
    return out


async def one(client: httpx.AsyncClient, url: str, body: dict) -> Result:
    start_t = time.perf_counter()
    ttft, parts = None, []
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return Result(False, "", 0, time.perf_counter() - start_t, f"HTTP {r.status_code}: {await r.aread()}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return Result(False, "", 0, time.perf_counter() - start_t, event["error"]["message"])
                delta = event["choices"][0]["delta"].get("content") if event["choices"] else None
                if delta:
                    ttft = ttft or time.perf_counter() - start_t
                    parts.append(delta)
    except httpx.HTTPError as err:
        return Result(False, "", 0, time.perf_counter() - start_t, repr(err))
    return Result(True, "".join(parts), ttft or 0.0, time.perf_counter() - start_t)


async def run_level(url: str, work: list[tuple[int, dict]], concurrency: int,
                    ramp: float = 0.0) -> tuple[list[tuple[int, Result]], float]:
    """All of `work` through `concurrency` client tasks, started evenly over `ramp` seconds (0: all
    at once); returns (request index, result) and the wall time."""
    queue: asyncio.Queue = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)
    results: list[tuple[int, Result]] = []

    async def client_task(client, delay: float):
        await asyncio.sleep(delay)
        while not queue.empty():
            index, body = queue.get_nowait()
            results.append((index, await one(client, url, body)))

    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_task(client, ramp * i / concurrency) for i in range(concurrency)))
        return results, time.perf_counter() - t0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", default="1,4,16")
    p.add_argument("--requests", type=int, default=48, help="requests per level per round (concurrency 1: a quarter)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--ramp", type=float, default=0.2,
                   help="clients start evenly spread over this many seconds (0: one burst)")
    p.add_argument("--quick", action="store_true", help="16 requests, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.rounds = 16, 1
    levels = [int(x) for x in args.levels.split(",")]
    port = free_port()
    proc = start(["-m", "llava.serve.app", "--no-ui", "--port", str(port), "--max-batch", str(args.max_batch),
                  "--max-waiting", "256"], env={"OMP_NUM_THREADS": str(os.cpu_count() or 2)})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base + "/health", proc)
        url = base + "/v1/chat/completions"
        work = list(enumerate(bodies(args.requests, args.max_tokens)))
        solo = asyncio.run(run_level(url, work, 1))[0]  # the reference answers, and a warm-up
        reference = {i: r.text for i, r in solo}
        assert all(r.ok for _, r in solo), [r.error for _, r in solo if not r.ok]
        asyncio.run(run_level(url, work, max(levels), args.ramp))  # warm-up at full load: batch buffers exist
        rss_before = rss_mb(proc.pid)
        stats: dict[int, dict[str, list[float]]] = {c: {"rps": [], "p50": [], "p95": [], "ttft50": [], "ttft95": []}
                                                    for c in levels}
        problems, rss_rounds = [], []
        for _ in range(args.rounds):
            for c in levels:  # interleaved: each round runs every level once
                subset = work if c > 1 else work[: max(4, len(work) // 4)]
                results, wall = asyncio.run(run_level(url, subset, c, args.ramp))
                bad = [(i, r.error) for i, r in results if not r.ok]
                mixed = [i for i, r in results if r.ok and r.text != reference[i]]
                if bad or mixed or len(results) != len(subset):
                    problems.append(f"c={c}: {len(bad)} errors {bad[:2]}, {len(mixed)} answers differ from solo, "
                                    f"{len(subset) - len(results)} missing")
                ok = [r for _, r in results if r.ok]
                s = stats[c]
                s["rps"].append(len(ok) / wall)
                s["p50"].append(pct([r.latency for r in ok], 0.5))
                s["p95"].append(pct([r.latency for r in ok], 0.95))
                s["ttft50"].append(pct([r.ttft for r in ok], 0.5))
                s["ttft95"].append(pct([r.ttft for r in ok], 0.95))
            rss_rounds.append(rss_mb(proc.pid))
        rss_after = rss_mb(proc.pid)
        server_stats = httpx.get(base + "/status").json()
    finally:
        stop(proc)
    med = {c: {k: statistics.median(v) for k, v in s.items()} for c, s in stats.items()}
    print(f"llava serve, tiny model, {args.max_tokens} tokens per answer, streaming, max-batch {args.max_batch}, "
          f"clients starting over {args.ramp:g} s, {args.rounds} interleaved round(s), medians; cpu: {cpu_flags()}")
    print(f"{'clients':>8} {'req/s':>7} {'x c=1':>6} {'p50 s':>7} {'p95 s':>7} {'TTFT p50':>9} {'TTFT p95':>9} "
          f"{'x c=1':>6}")
    base_rps, base_ttft = med[levels[0]]["rps"], med[levels[0]]["ttft95"]
    for c in levels:
        m = med[c]
        print(f"{c:>8} {m['rps']:>7.2f} {m['rps'] / base_rps:>6.2f} {m['p50']:>7.3f} {m['p95']:>7.3f} "
              f"{m['ttft50']:>9.3f} {m['ttft95']:>9.3f} {m['ttft95'] / base_ttft:>6.2f}")
    print(f"server RSS: {rss_before:.0f} MB before the timed rounds, {rss_after:.0f} MB after "
          f"({rss_after - rss_before:+.0f} MB; after each round: {', '.join(f'{r:.0f}' for r in rss_rounds)}); peak batch {server_stats['peak_batch']}, "
          f"joins {server_stats['joins']}, {server_stats['finished']} finished, {server_stats['failed']} failed")
    for line in problems:
        print("PROBLEM:", line)
    return 1 if problems else 0


def cpu_flags() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other"


if __name__ == "__main__":
    sys.exit(main())
