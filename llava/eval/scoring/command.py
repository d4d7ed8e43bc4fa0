"""How every scorer runs from the command line: the original's flags in, its printout (or JSON) out.

Each scoring module offers `add_arguments`, `score_from_args` and `format_metrics`; this runs
them as one command whose user errors end in one line and exit 2 (`llava.console`). Both the
original's entry points (`python -m llava.eval.eval_pope ...`) and `llava eval score` use it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from types import ModuleType

from llava.console import run_command


def run_scorer(scorer: ModuleType, argv: Sequence[str] | None, prog: str, description: str,
               as_json: bool = False) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    scorer.add_arguments(parser)
    args = parser.parse_args(argv)

    def command() -> int:
        metrics = scorer.score_from_args(args)
        print(json.dumps(metrics, indent=2) if as_json else scorer.format_metrics(metrics))
        return 0

    return run_command(prog, command)
