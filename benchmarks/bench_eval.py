"""Benchmark answering: questions/s of `llava.eval.answering` at batch 16 against one question at a time.

The same model answers the same N questions (example images cycled, questions cycled from a
short list) through the real answering path, called in-process so that model load time is
excluded: read the question file, check every image exists, skip what the answers file holds,
prepare each prompt and image (the pipeline's processor resizes the images to the tower's size),
`pipe.engine.generate`, append and fsync the answer rows. Only `--batch-size` differs:
1 is the original's one-question-at-a-time loop, 16 is batched. The two run interleaved over
several rounds, into a fresh answers file each time; medians of questions/s are reported.
Greedy (temperature 0) throughout, and every run's answers must equal the first batch-1 run's,
question by question; a difference is printed as PROBLEM and the exit status is 1.

Rows: the bundled tiny model (`llava.load()`) answering naturally (EOS, at most 128 tokens) and
with a fixed length (`ignore_eos`, 64 tokens); bench-200m (random weights, CLIP ViT-B/16 224 px +
12-layer 768-wide Llama, synthetic byte-level tokenizer) with a fixed length (`ignore_eos`, since
a random model's EOS lands anywhere) at two answer lengths: 8 tokens like the short-answer
benchmarks (VQAv2, GQA, POPE, MME: "a single word or phrase") and 128 like the open-ended ones
(LLaVA-Bench, MM-Vet, whose answers run to hundreds of tokens).

    python benchmarks/bench_eval.py --quick      # ~1 minute: the tiny model's rows, 32 questions, 1 round
    python benchmarks/bench_eval.py              # full run, ~15 minutes on 2 cores: tiny 64 questions x 3
                                                 # rounds, bench-200m 16 questions x 2 rounds
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_generate import cpu_stall_us, machine, synthetic_tokenizer

from llava.eval.answering import AnswerJob, read_questions, run_answering
from llava.eval.resume import read_rows

QUESTIONS = ["What shape is in the image?", "What color is the object?", "Describe the image in detail.",
             "Where is the object?", "How many objects are there?"]
IMAGES = ["shape.png", "color.png", "shapes.png", "position.png", "circles.png", "choice.png",
          "two_circles.png", "word_cat.png"]


@dataclass
class Case:
    label: str
    model: str  # "tiny" (bundled) or "bench-200m"
    questions: int
    sampling: dict
    warm: int  # questions in the untimed warm-up run of each batch size (full answer length)
    rounds: int
    rates: dict[int, list[float]] = field(default_factory=dict)  # batch size -> questions/s per round
    tokens: dict[int, float] = field(default_factory=dict)  # batch size -> mean answer length (chars)


BENCH_200M_ANSWER_TOKENS = (8, 128)  # short-answer and open-ended benchmarks

def write_question_file(path: Path, n: int) -> None:
    """n questions in the original's question-file format; images relative to examples/."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"question_id": i, "image": IMAGES[i % len(IMAGES)],
                                "text": QUESTIONS[(i // len(IMAGES) + i) % len(QUESTIONS)]}) + "\n" for i in range(n))


def load_pipe(name: str):
    if name == "tiny":
        import llava

        return llava.load()  # the bundled checkpoint, as `python -m llava.eval.model_vqa` loads it
    from llava.api import LlavaPipeline
    from llava.checkpoint.build import image_processor_for
    from llava.checkpoint.loader import LoadedCheckpoint
    from llava.config import preset
    from llava.tiny import IMAGE_TOKEN, tiny_model

    vocab = preset(name).text_config.vocab_size
    tok = synthetic_tokenizer(vocab - 1)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})  # the last id: the image placeholder
    model, tok = tiny_model(name, tokenizer=tok, vocab_size=vocab)
    return LlavaPipeline(LoadedCheckpoint(model, tok, image_processor_for(model.config), layout="original",
                                          convention="original", name=name))


def answer_run(pipe, qfile: Path, out: Path, batch: int, sampling: dict) -> tuple[float, list[str]]:
    """One timed pass of the answering path into a fresh answers file: (seconds, answers in question order)."""
    out.unlink(missing_ok=True)
    job = AnswerJob(answers_file=out, batch_size=batch, sampling=sampling, model_id="bench")
    quiet = io.StringIO()  # the progress bar and the per-run summary line
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(quiet):
        items = read_questions(qfile, ROOT / "examples")
        count = run_answering(items, job, lambda: pipe)
    elapsed = time.perf_counter() - t0
    rows = read_rows(out)
    if count != len(items) or len(rows) != len(items):
        raise RuntimeError(f"batch {batch}: {count} answered, {len(rows)} rows, {len(items)} questions")
    by_id = {row["question_id"]: row["text"] for row in rows}
    return elapsed, [by_id[i] for i in range(len(items))]


def bench_case(case: Case, pipe, batches: list[int], folder: Path, problems: list[str]) -> None:
    qfile, wfile = folder / "questions.jsonl", folder / "warm-up.jsonl"
    write_question_file(qfile, case.questions)
    write_question_file(wfile, case.warm)
    out = folder / "answers.jsonl"
    # Warm-up at the full answer length: the first decode step at each new sequence length and
    # batch shape is several times slower than later ones (CPU kernels picked per shape), which
    # for the tiny model would otherwise weigh on whichever run comes first.
    for b in batches:
        answer_run(pipe, wfile, out, b, case.sampling)
    reference: list[str] | None = None
    for r in range(case.rounds):
        for b in batches:  # interleaved: each round runs every batch size once
            seconds, answers = answer_run(pipe, qfile, out, b, case.sampling)
            case.rates.setdefault(b, []).append(case.questions / seconds)
            case.tokens[b] = statistics.mean(len(a) for a in answers)
            if reference is None:
                reference = answers
            differ = [i for i, (a, ref) in enumerate(zip(answers, reference)) if a != ref]
            if differ:
                i = differ[0]
                problems.append(f"{case.label}, batch {b}, round {r + 1}: {len(differ)} of {case.questions} answers "
                                f"differ from the first batch-{batches[0]} run (e.g. question {i}: {answers[i]!r:.60} "
                                f"vs {reference[i]!r:.60})")
            print(f"    {case.label:28s} round {r + 1}/{case.rounds} batch {b:2d}: {seconds:6.2f} s, "
                  f"{case.questions / seconds:6.2f} q/s", flush=True)


def cpu_flags() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny model only, 32 questions, 1 round (~1 minute); add --models bench-200m for that row")
    p.add_argument("--models", nargs="+", choices=["tiny", "bench-200m"],
                   help="default both (--quick: tiny)")
    p.add_argument("--batch-size", type=int, default=16, help="the batched run's --batch-size")
    p.add_argument("--rounds", type=int, help="interleaved rounds, medians taken (default 3 tiny / 2 bench-200m; "
                                              "quick 1)")
    p.add_argument("--questions", type=int, help="questions per run (default 64 tiny / 16 bench-200m; quick 32/16)")
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    models = args.models or (["tiny"] if args.quick else ["tiny", "bench-200m"])
    n_tiny = args.questions or (32 if args.quick else 64)
    n_200m = args.questions or 16
    r_tiny = args.rounds or (1 if args.quick else 3)
    r_200m = args.rounds or (1 if args.quick else 2)
    batches = [1, args.batch_size]
    print(f"{time.strftime('%Y-%m-%d')}  {machine()}; cpu: {cpu_flags()}")
    stall0, wall0 = cpu_stall_us(), time.perf_counter()
    cases: list[Case] = []
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            pipe = load_pipe(name)
            if name == "tiny":
                model_cases = [Case("tiny, EOS, max 128", name, n_tiny, {"temperature": 0, "max_new_tokens": 128},
                                    n_tiny, r_tiny),
                               Case("tiny, ignore_eos, 64", name, n_tiny,
                                    {"temperature": 0, "max_new_tokens": 64, "ignore_eos": True}, n_tiny, r_tiny)]
            else:  # compute-bound: a short warm-up is enough, and a full one costs a minute
                model_cases = [Case(f"{name}, ignore_eos, {tokens}", name, n_200m,
                                    {"temperature": 0, "max_new_tokens": tokens, "ignore_eos": True}, 2, r_200m)
                               for tokens in BENCH_200M_ANSWER_TOKENS]
            for case in model_cases:
                print(f"{case.label}: {case.questions} questions, batch {batches}, {case.rounds} round(s)", flush=True)
                bench_case(case, pipe, batches, Path(tmp), problems)
                cases.append(case)
            del pipe
    b = batches[-1]
    print(f"\nanswering, in-process, temperature 0, interleaved rounds, medians; cpu: {cpu_flags()}")
    print(f"| model, answer length | questions x rounds | q/s batch 1 | q/s batch {b} | × batch 1 | mean answer chars |")
    print("|---|--:|--:|--:|--:|--:|")
    for c in cases:
        one, many = statistics.median(c.rates[1]), statistics.median(c.rates[b])
        print(f"| {c.label} | {c.questions} x {c.rounds} | {one:.2f} | {many:.2f} | {many / one:.2f} | {c.tokens[1]:.0f} |")
    stall1 = cpu_stall_us()
    if stall0 is not None and stall1 is not None:
        wall = time.perf_counter() - wall0
        print(f"\nCPU pressure during the run: runnable tasks waited for a CPU {(stall1 - stall0) / 1e6 / wall:.0%} "
              f"of the {wall / 60:.1f} min wall time (0% = machine to ourselves)")
    for line in problems:
        print("PROBLEM:", line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
