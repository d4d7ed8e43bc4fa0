"""`python -m llava.eval.summarize_gpt_review -f REVIEW.jsonl ...`, the original's entry point.

Summarizes review files only (no judge calls); see `llava.eval.scoring.llava_bench` for the rules.
"""

from __future__ import annotations

from types import SimpleNamespace

from llava.console import exit_with


def main(argv: list[str] | None = None) -> int:
    from llava.eval.scoring import llava_bench as lb
    from llava.eval.scoring.command import run_scorer

    summary = SimpleNamespace(add_arguments=lb.add_summary_arguments, score_from_args=lb.summary_from_args,
                              format_metrics=lb.format_summary)
    return run_scorer(summary, argv, "python -m llava.eval.summarize_gpt_review",
                      "Summarize LLaVA-Bench review files as upstream summarize_gpt_review.py.")


if __name__ == "__main__":
    exit_with(main())
