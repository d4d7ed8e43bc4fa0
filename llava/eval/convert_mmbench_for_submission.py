"""`python -m llava.eval.convert_mmbench_for_submission`, the original's entry point; see `llava.eval.scoring.mmbench`."""

from __future__ import annotations

from llava.console import exit_with


def main() -> None:
    from llava.eval.scoring.mmbench import main as score_main

    exit_with(score_main())


if __name__ == "__main__":
    main()
