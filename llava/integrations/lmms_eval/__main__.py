"""`python -m llava.integrations.lmms_eval make-task DATA`: write the local `llava_synth` task for lmms-eval."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from llava.integrations.lmms_eval.tasks.llava_synth import make_task

    p = argparse.ArgumentParser(prog="python -m llava.integrations.lmms_eval",
                                description="lmms-eval helpers for this package")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make-task", help="write a local lmms-eval task over a `llava data synth` folder")
    m.add_argument("data", help="folder with eval.jsonl and images/ (written by `llava data synth`)")
    m.add_argument("--out", default=None, help=f"task folder (default DATA/{make_task.TASK_DIR})")
    m.add_argument("--name", default=make_task.DEFAULT_NAME, help="task name (default %(default)s)")
    m.add_argument("--max-new-tokens", type=int, default=make_task.DEFAULT_MAX_NEW_TOKENS)
    m.add_argument("--limit", type=int, default=None, help="only the first N questions")
    m.add_argument("--generate", type=int, default=None, metavar="N",
                   help="first write N eval questions (and no training data) into DATA")
    m.add_argument("--seed", type=int, default=0, help="seed for --generate (default 0)")
    args = p.parse_args(argv)

    if args.generate is not None:
        from llava.data.synth import generate

        generate(args.data, seed=args.seed, n=0, eval_n=args.generate)
    yaml_path = make_task.write_task(args.data, args.out, args.name, args.max_new_tokens, args.limit)
    print(f"wrote {yaml_path} and {yaml_path.with_suffix('.jsonl').name}; evaluate with:")
    print(f"  LMMS_EVAL_PLUGINS=llava.integrations.lmms_eval lmms-eval --model llava_pkg "
          f"--model_args pretrained=PATH,batch_size=8 --tasks {args.name} "
          f"--include_path {shlex.quote(str(yaml_path.parent))} --output_path results/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
