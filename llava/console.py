"""How every command ends: an answer, one line naming the problem, or one line saying it was stopped.

Shared by `llava ...` and the original's entry points (`python -m llava.serve.cli`,
`python -m llava.eval.run_llava`, `python -m llava.train.train`), so they all report the same
way: a `LlavaError` or an OS error (a full disk, a permission) is the user's to fix (exit 2);
Ctrl-C is "interrupted" (exit 130); anything else is a bug in the project, said as such in one
line, with the traceback behind `LLAVA_DEBUG=1`.
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
from typing import Any, Callable, NoReturn

from llava.errors import LlavaError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # what shells report for a process ended by SIGINT
EXIT_BUG = 1


def one_line(err: BaseException) -> str:
    """The error's message on one line (some messages quote multi-line text from a file)."""
    return " ".join(str(err).split()) or type(err).__name__


class _InterruptsNotSwallowed:
    """While active, a Ctrl-C that lands inside a finaliser still stops the command, quietly.

    A SIGINT is raised wherever the main thread happens to be; inside a `__del__` (regex's
    `Group.__del__` while transformers imports, say) Python cannot propagate it, prints
    "Exception ignored in ..." with a traceback, and carries on as if Ctrl-C had not been
    pressed. The hook drops that report and delivers the interrupt again a moment later, once
    the finaliser has returned, so the command ends as "interrupted".
    """

    def __init__(self) -> None:
        self.previous: Callable[[Any], object] | None = None

    def __enter__(self) -> None:
        if not isinstance(getattr(sys.unraisablehook, "__self__", None), _InterruptsNotSwallowed):  # nested: one hook
            self.previous, sys.unraisablehook = sys.unraisablehook, self._hook

    def __exit__(self, *exc_info: object) -> None:
        if self.previous is not None:
            sys.unraisablehook, self.previous = self.previous, None

    def _hook(self, unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            assert self.previous is not None
            self.previous(unraisable)
            return
        # Not from inside the hook: the finaliser (and any next one in the same collection) must
        # finish first, or the interrupt would be swallowed again here.
        threading.Timer(0.05, _interrupt_main_thread).start()


def _interrupt_main_thread() -> None:
    """A real SIGINT to the main thread, so a blocking call there (a sleep, a read) is cut short too."""
    if hasattr(signal, "pthread_kill"):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # type: ignore[arg-type]
    else:  # Windows: no per-thread signals; the interrupt is seen at the next bytecode
        _thread.interrupt_main()


def run_command(prog: str, command: Callable[[], int]) -> int:
    """Run `command` and turn whatever it raises into an exit code and at most one line on stderr."""
    try:
        with _InterruptsNotSwallowed():
            return command()
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (LlavaError, OSError) as err:
        if os.environ.get("LLAVA_DEBUG"):
            raise
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as err:  # noqa: BLE001 - the one place a bug is reported instead of a traceback
        if os.environ.get("LLAVA_DEBUG"):
            raise
        print(f"{prog}: internal error, a bug in llava ({type(err).__name__}: {one_line(err)}); "
              "rerun with LLAVA_DEBUG=1 for the traceback and please report it", file=sys.stderr)
        return EXIT_BUG


def exit_with(code: int) -> NoReturn:
    """Exit after flushing the output, with Ctrl-C during interpreter shut-down ending it silently.

    Shut-down runs torch's and transformers' exit hooks for about a second; a Ctrl-C there would
    print "Exception ignored in atexit callback" under an answer that is already complete.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`llava run ... | head`) has nothing left to flush
            pass
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(code)
