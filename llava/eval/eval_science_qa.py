"""`python -m llava.eval.eval_science_qa`, the original's entry point; see `llava.eval.scoring.science_qa`."""

from __future__ import annotations

from llava.console import exit_with


def main() -> None:
    from llava.eval.scoring.science_qa import main as score_main

    exit_with(score_main())


if __name__ == "__main__":
    main()
