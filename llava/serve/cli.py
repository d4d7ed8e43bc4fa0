"""The terminal chat: `llava chat`, and `python -m llava.serve.cli` (the original's flags work too).

In the chat a line ending in `\\` continues on the next line (one message, several lines);
`/short` toggles the short-answer instruction ("Answer the question using a single word or
phrase.", the bundled model's training format) after every question; `/help` lists these;
an empty line or end of input ends the chat.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from llava.cli_args import (
    add_model_args,
    add_sampling_args,
    images_from,
    load_from_args,
    sampling_from,
)
from llava.console import exit_with, run_command
from llava.errors import PromptError

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
CHAT_HELP = ("end a line with \\ to continue the message on the next line; /short toggles the short-answer "
             "instruction; an empty line exits")


def read_message(read: Callable[[str], str], prompt: str) -> str:
    """One message: lines ending in a backslash continue it (the backslash is dropped)."""
    lines = []
    line = read(prompt)
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read("... ")
    lines.append(line)
    return "\n".join(lines)


def chat_loop(pipe, images: Sequence, sampling: dict, read: Callable[[str], str] = input,
              write: Callable[[str], None] | None = None, debug: bool = False, short: bool = False) -> None:
    """The original CLI's loop: the image(s) go with the first message; empty input or EOF ends it.

    `debug`: after each reply, print the rendered prompt and the reply, as the original's --debug does.
    `short`: start with the short-answer instruction on (`/short` toggles it)."""
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    user_role, assistant_role = pipe.template.roles
    user_role = user_role.strip() or "USER"
    assistant_role = assistant_role.strip() or "ASSISTANT"
    messages: list[dict] = []
    pending = list(images)
    if pending:
        pipe.encode_images(pending)  # fail early on a bad image, before the first question
    while True:
        try:
            text = read_message(read, f"{user_role}: ")
        except (EOFError, KeyboardInterrupt):
            text = ""
        if not text.strip():
            write("exit...\n")
            return
        if text.strip() in ("/short", "/help"):
            short = not short if text.strip() == "/short" else short
            write(f"[short answers {'on' if short else 'off'}; {CHAT_HELP}]\n")
            continue
        messages.append({"role": "user", "content": text + (SHORT_ANSWER if short else ""), "images": pending})
        write(f"{assistant_role}: ")
        reply = ""
        try:
            for delta in pipe.stream(messages, **sampling):
                reply += delta
                write(delta)
        except PromptError as err:  # too long, or an <image> tag without an image: this turn only
            write(f"\n[{err}]\n")
            messages.pop()
            continue
        pending = []
        write("\n")
        if debug:
            write(f"\n{ {'prompt': pipe.prepare_chat(messages).prompt, 'outputs': reply} }\n\n")
        messages.append({"role": "assistant", "content": reply.strip()})


def add_chat_args(p: argparse.ArgumentParser) -> None:
    """The chat's flags (model, images, sampling, --short, --debug), shared by `llava chat` and this module.

    The original's spellings (--model-path, --image-file, --conv-mode, --load-8bit, ...) all work."""
    add_model_args(p)
    p.add_argument("--image", "--image-file", dest="image", action="append",
                   help="image for the first message (repeatable)")
    p.add_argument("--short", action="store_true",
                   help="ask for short answers (the bundled model's training format); /short toggles it")
    p.add_argument("--debug", action="store_true", help="print the rendered prompt and reply after each turn")
    add_sampling_args(p)


def run_chat(args: argparse.Namespace) -> int:
    """Check the images and sampling flags, load the model, then chat on stdin/stdout."""
    images, sampling = images_from(args), sampling_from(args)  # bad input fails before the model loads
    pipe = load_from_args(args)
    print(f"[{CHAT_HELP}]", file=sys.stderr)
    chat_loop(pipe, images, sampling, debug=args.debug, short=args.short)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.serve.cli", epilog=f"In the chat: {CHAT_HELP}.")
    add_chat_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("llava.serve.cli", lambda: run_chat(args))


if __name__ == "__main__":
    exit_with(main())
