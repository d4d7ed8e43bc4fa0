"""`python -m llava.eval.convert_gqa_for_eval --src A --dst B`: the original's GQA converter.

Upstream `scripts/convert_gqa_for_eval.py`; the conversion and the GQA scorer live in
`llava.eval.scoring.gqa` (scoring: `llava eval score gqa`).
"""

from __future__ import annotations

from llava.console import exit_with
from llava.eval.scoring.gqa import convert_main

if __name__ == "__main__":
    exit_with(convert_main())
