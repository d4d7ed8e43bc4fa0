"""`llava eval run --suite FILE --model PATH`: answer and score a list of benchmarks in one command.

A suite file (TOML, or JSON of the same shape) lists benchmarks; each names the original command
that answers it (`answerer`: loader | vqa | science | mmbench, i.e. `model_vqa_loader`, `model_vqa`,
`model_vqa_science`, `model_vqa_mmbench`) and the `llava eval score` scorer with that scorer's own
flags, so a suite runs exactly what the original's `scripts/v1_5/eval/*.sh` run, one model load for all:

    name = "tiny"
    [defaults]                          # temperature, top_p, max_new_tokens, batch_size, conv_mode
    temperature = 0
    max_new_tokens = 16

    [[benchmarks]]
    name = "pope"                       # the row in the results table (default scorer: the name)
    answerer = "loader"
    question_file = "pope/llava_pope_test.jsonl"    # relative to the suite file
    image_folder = "pope/images"
    answer_args = {}                    # more flags of the answerer, e.g. { single-pred-prompt = true }
    [benchmarks.score]                  # the scorer's flags, spelled as on its command line
    annotation-dir = "{suite}/pope/annotations"
    question-file = "{suite}/pope/llava_pope_test.jsonl"
    result-file = "{answers}"

Placeholders in score flags: {suite} (the suite file's folder), {answers} (this benchmark's answers
file, OUT/answers/NAME.jsonl), {answers_dir}, {experiment} (NAME), {out} (OUT/work/NAME, for
upload and converted files), {judge_url} and {judge_model} (judged benchmarks). Values are explicit
rather than guessed, so no string is ever mistaken for a path.

Rerunning skips what is done: answers resume question by question (`llava.eval.answering`; the
model is loaded only if some question is left), judges resume review by review, and scoring,
which takes no model and seconds, is simply done again. Everything in the suite is checked (keys,
files, both commands' flags) before the model loads. A benchmark whose scoring fails is reported
in the table and the others go on; the command then exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava.errors import InputError, LlavaError

ANSWERERS = {"loader": "llava.eval.model_vqa_loader", "vqa": "llava.eval.model_vqa",
             "science": "llava.eval.model_vqa_science", "mmbench": "llava.eval.model_vqa_mmbench"}
SETTINGS = ("temperature", "top_p", "max_new_tokens", "batch_size")  # in [defaults] or per benchmark
BENCHMARK_KEYS = {"name", "scorer", "answerer", "question_file", "image_folder", "answer_args", "score", *SETTINGS}


class _RaisingParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise InputError (argparse's documented hook) instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(message)


@dataclass
class Benchmark:
    name: str
    scorer: str
    answerer: str
    question_file: Path
    image_folder: Path | None
    settings: dict[str, Any]
    answer_args: dict[str, Any] = field(default_factory=dict)
    score_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class Suite:
    name: str
    path: Path
    conv_mode: str | None
    benchmarks: list[Benchmark]


# Reading the suite file -----------------------------------------------------------------------
def _load_mapping(path: Path) -> dict:
    import tomllib

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"suite file {path} not found") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise InputError(f"suite file {path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} ({err})") from None
    if not isinstance(data, dict):
        raise InputError(f"suite file {path}: expected a table at the top")
    return data


def _check_keys(table: Mapping, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _table(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"{where}: expected a table of flags, got {type(value).__name__}")
    return value


def read_suite(path: str | os.PathLike) -> Suite:
    """Parse and check a suite file; relative paths are taken from the file's folder."""
    path = Path(path).resolve()
    data = _load_mapping(path)
    _check_keys(data, {"name", "defaults", "benchmarks"}, f"suite file {path}")
    defaults = _table(data.get("defaults", {}), f"suite file {path}, [defaults]")
    _check_keys(defaults, {*SETTINGS, "conv_mode"}, f"suite file {path}, [defaults]")
    rows = data.get("benchmarks")
    if not isinstance(rows, list) or not rows:
        raise InputError(f"suite file {path}: needs at least one [[benchmarks]] entry")
    benchmarks: list[Benchmark] = []
    for number, row in enumerate(rows, 1):
        where = f"suite file {path}, benchmark {number}"
        row = _table(row, where)
        _check_keys(row, BENCHMARK_KEYS, where)
        name = row.get("name")
        if not isinstance(name, str) or not name or "/" in name:
            raise InputError(f"{where}: needs a \"name\" (a word, used as a file name)")
        where = f"suite file {path}, benchmark {name!r}"
        if any(b.name == name for b in benchmarks):
            raise InputError(f"{where}: the name is used twice")
        answerer = row.get("answerer", "loader")
        if answerer not in ANSWERERS:
            raise InputError(f"{where}: unknown answerer {answerer!r}; known: {', '.join(ANSWERERS)}")
        if not isinstance(row.get("question_file"), str):
            raise InputError(f"{where}: needs a \"question_file\"")
        question_file = path.parent / row["question_file"]
        if not question_file.is_file():
            raise InputError(f"{where}: question file {question_file} not found")
        image_folder = path.parent / row["image_folder"] if row.get("image_folder") else None
        if image_folder is not None and not image_folder.is_dir():
            raise InputError(f"{where}: image folder {image_folder} not found")
        benchmarks.append(Benchmark(
            name=name, scorer=row.get("scorer", name), answerer=answerer, question_file=question_file,
            image_folder=image_folder,
            settings={**{k: defaults[k] for k in SETTINGS if k in defaults}, **{k: row[k] for k in SETTINGS if k in row}},
            answer_args=_table(row.get("answer_args", {}), f"{where}, answer_args"),
            score_args=_table(row.get("score", {}), f"{where}, score")))
    return Suite(name=str(data.get("name") or path.stem), path=path, conv_mode=defaults.get("conv_mode") or None,
                 benchmarks=benchmarks)


# Flags -------------------------------------------------------------------------------------------
def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    # argparse has no public list of a parser's options; `_actions` has been stable since Python 2.7.
    return {s for action in parser._actions for s in action.option_strings}


def flags_to_argv(flags: Mapping[str, Any], parser: argparse.ArgumentParser, where: str) -> list[str]:
    """{"result-file": "a.jsonl", "consistency": true, "answer_list": [a, b]} -> argv for `parser`.

    A key may be spelled with dashes or underscores; the parser's own spelling is used.
    """
    known = _option_strings(parser)
    argv: list[str] = []
    for key, value in flags.items():
        spellings = [f"--{key}", f"--{key.replace('_', '-')}", f"--{key.replace('-', '_')}"]
        flag = next((s for s in spellings if s in known), None)
        if flag is None:
            shown = ", ".join(sorted(s.lstrip("-") for s in known if s.startswith("--") and s != "--help"))
            raise InputError(f"{where}: unknown flag {key!r}; this command's flags: {shown}")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def _fill(value: Any, places: Mapping[str, str], where: str) -> Any:
    if isinstance(value, list):
        return [_fill(v, places, where) for v in value]
    if not isinstance(value, str):
        return value
    try:
        return value.format_map(places)
    except KeyError as err:
        raise InputError(f"{where}: unknown placeholder {{{err.args[0]}}}; known: "
                         f"{', '.join('{' + k + '}' for k in places)}") from None
    except (ValueError, IndexError):
        raise InputError(f"{where}: {value!r} has a stray brace (write {{{{ or }}}} for a literal one)") from None


@dataclass
class RunOptions:
    """What `llava eval run` adds to the suite: the model, where results go, the judge."""

    model: str | None
    out: Path
    batch_size: int | None = None
    device: str | None = None
    judge_url: str | None = None
    judge_model: str | None = None
    only: Sequence[str] = ()


def answering_args(bench: Benchmark, suite: Suite, opts: RunOptions) -> argparse.Namespace:
    """The benchmark's answering command line (its answerer's own flags), parsed."""
    settings = {**bench.settings, **({"batch_size": opts.batch_size} if opts.batch_size else {})}
    argv = ["--question-file", str(bench.question_file), "--answers-file", str(answers_file(bench, opts))]
    argv += ["--image-folder", str(bench.image_folder)] if bench.image_folder else []
    argv += ["--model-path", opts.model] if opts.model else []
    argv += ["--conv-mode", suite.conv_mode] if suite.conv_mode else []
    argv += ["--device", opts.device] if opts.device else []
    parser = answerer(bench).parser(_RaisingParser)
    argv += flags_to_argv({**settings, **bench.answer_args}, parser,
                          f"suite {suite.name!r}, benchmark {bench.name!r}, answering")
    return parser.parse_args(argv)


def answerer(bench: Benchmark) -> Any:
    return importlib.import_module(ANSWERERS[bench.answerer]).ANSWERER


def answers_file(bench: Benchmark, opts: RunOptions) -> Path:
    return opts.out / "answers" / f"{bench.name}.jsonl"


def scoring_args(bench: Benchmark, suite: Suite, opts: RunOptions, scorer: Any) -> argparse.Namespace:
    """The benchmark's scorer flags, placeholders filled, parsed by the scorer's own parser."""
    places = {"suite": str(suite.path.parent), "answers": str(answers_file(bench, opts)),
              "answers_dir": str(opts.out / "answers"), "experiment": bench.name,
              "out": str(opts.out / "work" / bench.name), "judge_url": opts.judge_url or "",
              "judge_model": opts.judge_model or ""}
    where = f"suite {suite.name!r}, benchmark {bench.name!r}, score"
    filled = {k: _fill(v, places, f"{where}.{k}") for k, v in bench.score_args.items()}
    parser = _RaisingParser(prog=f"llava eval score {bench.scorer}")
    scorer.add_arguments(parser)
    argv = flags_to_argv(filled, parser, where)
    try:
        return parser.parse_args(argv)
    except InputError as err:
        raise InputError(f"benchmark {bench.name!r}, score flags: {err}") from None


# Running -----------------------------------------------------------------------------------------
Plan = tuple[Benchmark, Any, argparse.Namespace, argparse.Namespace]  # benchmark, scorer, answering, scoring


def check(suite: Suite, opts: RunOptions) -> list[Plan]:
    """Every selected benchmark's answerer flags and scorer flags, parsed before any model loads."""
    from llava.eval.answering import job_from_args
    from llava.eval.scoring import scorer as scorer_module

    unknown = sorted(set(opts.only) - {b.name for b in suite.benchmarks})
    if unknown:
        raise InputError(f"--only {', '.join(unknown)}: not in suite {suite.name!r} "
                         f"(has {', '.join(b.name for b in suite.benchmarks)})")
    plans = []
    for bench in suite.benchmarks:
        if opts.only and bench.name not in opts.only:
            continue
        try:
            scorer = scorer_module(bench.scorer)
        except InputError as err:
            raise InputError(f"suite {suite.name!r}, benchmark {bench.name!r}: {err}") from None
        answering = answering_args(bench, suite, opts)
        try:  # sampling values are checked too (this imports torch, so it is not counted as answering time)
            job_from_args(answering, answerer(bench).key_fields)
        except InputError as err:
            raise InputError(f"suite {suite.name!r}, benchmark {bench.name!r}: {err}") from None
        plans.append((bench, scorer, answering, scoring_args(bench, suite, opts, scorer)))
    return plans


def run_suite(suite: Suite, opts: RunOptions) -> tuple[dict, dict[str, str]]:
    """Answer (resuming) and score every benchmark: (the results in OUT/results.json, the files written)."""
    from llava.eval.answering import loader_from_args
    from llava.eval.resume import read_rows
    from llava.eval.suite_report import write_reports

    plans = check(suite, opts)
    pipeline: list[Any] = []  # loaded once, on the first benchmark that has something left to answer
    load_seconds = [0.0]

    def shared_load(args: argparse.Namespace) -> Callable[[], Any]:
        def load() -> Any:
            if not pipeline:
                started = time.perf_counter()
                pipeline.append(loader_from_args(args)())
                load_seconds[0] = time.perf_counter() - started
            return pipeline[0]
        return load

    results: dict[str, dict] = {}
    for bench, scorer, answering, scoring in plans:
        (opts.out / "work" / bench.name).mkdir(parents=True, exist_ok=True)
        print(f"== {bench.name}: answering {bench.question_file.name}", file=sys.stderr)
        started, loading_before = time.perf_counter(), load_seconds[0]
        answered = answerer(bench).answer(answering, load=shared_load(answering))
        seconds = time.perf_counter() - started - (load_seconds[0] - loading_before) if answered else 0.0
        results[bench.name] = _score(bench, scorer, scoring, opts) | {
            "scorer": bench.scorer, "answers_file": str(answers_file(bench, opts)),
            "answers": len(read_rows(answers_file(bench, opts))), "answered_now": answered,
            "answer_seconds": round(seconds, 2)}
    summary = {"suite": suite.name, "suite_file": str(suite.path), "model": opts.model or "bundled tiny model",
               "model_load_seconds": round(load_seconds[0], 2), "benchmarks": results}
    return summary, write_reports(summary, opts.out)


def _score(bench: Benchmark, scorer: Any, args: argparse.Namespace, opts: RunOptions) -> dict:
    if getattr(scorer, "NEEDS_JUDGE", False) and not opts.judge_url:
        return {"status": "skipped", "reason": "a judged benchmark: give --judge-url and --judge-model"}
    try:
        metrics = scorer.score_from_args(args)
    except (LlavaError, OSError) as err:
        print(f"== {bench.name}: scoring failed: {err}", file=sys.stderr)
        return {"status": "error", "reason": str(err).splitlines()[0]}
    metric, value, maximum = scorer.headline(metrics)
    return {"status": "scored", "metric": metric, "value": value, "maximum": maximum, "metrics": metrics}


# Command line ------------------------------------------------------------------------------------
def add_run_command(eval_subparsers: argparse._SubParsersAction) -> None:
    """`llava eval run --suite FILE [--model PATH] ...` on the subparsers of `llava eval`."""
    p = eval_subparsers.add_parser("run", help="answer and score the benchmarks of a suite file",
                                   description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", required=True, help="suite file (TOML or JSON); see `llava.eval.suite`")
    p.add_argument("--model", default=None, help="checkpoint (default: the bundled tiny model)")
    p.add_argument("--out", default=None, help="output folder (default runs/eval/SUITE-MODEL)")
    p.add_argument("--batch-size", type=int, default=None, help="questions per engine call (overrides the suite)")
    p.add_argument("--device", default=None)
    p.add_argument("--only", nargs="+", default=(), metavar="NAME", help="run only these benchmarks of the suite")
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL for judged benchmarks")
    p.add_argument("--judge-model", default=None, help="the judge's model name")
    p.add_argument("--json", action="store_true", help="print the results JSON instead of the table")
    p.set_defaults(func=_run_command)


def _run_command(args: argparse.Namespace) -> int:
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {args.batch_size}")
    suite = read_suite(args.suite)
    model_name = Path(args.model).name if args.model else "tiny"
    out = Path(args.out) if args.out else Path("runs") / "eval" / f"{suite.name}-{model_name}"
    opts = RunOptions(model=args.model, out=out, batch_size=args.batch_size, device=args.device,
                      judge_url=args.judge_url, judge_model=args.judge_model, only=args.only)
    summary, written = run_suite(suite, opts)
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        from llava.eval.suite_report import markdown_table

        print(markdown_table(summary))
        print("wrote " + ", ".join(v for k, v in written.items() if k != "chart_note"))
    if "chart_note" in written:
        print(f"note: {written['chart_note']}", file=sys.stderr)
    return 1 if any(r["status"] == "error" for r in summary["benchmarks"].values()) else 0
