"""`llava eval score BENCH ...`: one front end over every benchmark scorer in `llava.eval.scoring`.

Each scorer module keeps the original script's flags (`add_arguments`), returns its metrics
as a dict (`score_from_args`) and prints them as the original does (`format_metrics`);
`--json` prints the dict instead. Scoring needs no model, so nothing here imports torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from llava.console import exit_with, run_command
from llava.eval.scoring import SCORERS, scorer
from llava.eval.scoring.command import run_scorer
from llava.eval.suite import add_run_command


def score(name: str, argv: Sequence[str], as_json: bool = False) -> int:
    module = scorer(name)
    return run_scorer(module, argv, f"llava eval score {name}", module.__doc__.split("\n\n")[0], as_json)


def add_eval_command(subparsers: argparse._SubParsersAction) -> None:
    """`llava eval score BENCH [the benchmark's own flags] [--json]` on the top-level parser."""
    p = subparsers.add_parser("eval", help="score benchmark answers (no model needed), or run a suite",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="eval_command", required=True)
    s = sub.add_parser("score", help="score an answers file as the benchmark's own script does",
                       description=f"benchmarks: {', '.join(sorted(SCORERS))}; `llava eval score BENCH -h` "
                                   "shows a benchmark's flags")
    s.add_argument("benchmark", help=", ".join(sorted(SCORERS)))
    s.add_argument("--json", action="store_true", help="print the metrics as JSON")
    s.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    s.set_defaults(func=_score_command)
    add_run_command(sub)


def _score_command(args: argparse.Namespace) -> int:
    """--json may also come after the benchmark's own flags (argparse hands those over untouched)."""
    rest = [a for a in args.rest if a != "--json"]
    return score(args.benchmark, rest, args.json or len(rest) < len(args.rest))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava.eval.score_cli")
    add_eval_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_command("llava eval", lambda: args.func(args))


if __name__ == "__main__":
    exit_with(main(sys.argv[1:]))
