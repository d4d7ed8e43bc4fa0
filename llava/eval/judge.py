"""A small client for an OpenAI-compatible chat-completions endpoint, used as the benchmark judge.

Why no `openai` package: the judged scorers (`llava.eval.scoring.llava_bench`, `mm_vet`) need one
POST and its retries, and scoring must stay free of heavy or new dependencies; stdlib
`urllib.request` does it. Any server that speaks `POST {base}/chat/completions` works (OpenAI,
vLLM, `llava serve`, a local proxy), so a run can be judged by a local model as well as GPT-4.

Failure policy, so that one flaky call never costs a long run:
- a connection error, a timeout, HTTP 408/429/5xx or a reply without `choices` is retried with
  exponential backoff (`--judge-retries` attempts, first delay `--judge-backoff` seconds, doubled
  each time; a numeric `Retry-After` is honoured up to 60 s); after the last attempt the call
  raises `JudgeCallFailed`, which the scorers record as a failed row and move on from;
- any other 4xx (400 bad request, 401/403 key, 404 unknown model) would fail the same way for
  every question, so it raises `JudgeRejected` (an `InputError`): the run stops with one line.

Judged runs are resumable (`judge_all`): one fsynced JSONL row per graded question through
`llava.eval.resume`; a rerun keeps the finished rows and asks again for the rest.

The API key comes from the environment, never from a flag (flags end up in shell history):
`OPENAI_API_KEY` by default, or the variable named by `--judge-key-env`. Without a key no
`Authorization` header is sent (local servers usually need none).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from llava.errors import DataError, InputError
from llava.eval.resume import RowWriter, open_rows, read_rows

DEFAULT_URL = "https://api.openai.com/v1"
RETRYABLE = {408, 429}  # plus every 5xx
T = TypeVar("T")


class JudgeCallFailed(Exception):
    """A judge call that still failed after its retries; the scorer records it and goes on."""


class JudgeRejected(InputError):
    """The endpoint refused the request itself (bad key, model or request): every call would fail."""


@dataclass
class Judge:
    url: str
    model: str
    api_key: str | None = None
    attempts: int = 4
    backoff: float = 1.0
    timeout: float = 120.0
    max_tokens: int = 1024

    def chat(self, messages: list[dict], temperature: float, max_tokens: int | None = None) -> str:
        """The reply text of one chat completion (retried as the module docstring says)."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": temperature,
                           "max_tokens": max_tokens or self.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        endpoint = self.url.rstrip("/") + "/chat/completions"
        problem, delay = "", 0.0
        for attempt in range(max(1, self.attempts)):
            time.sleep(delay)  # 0 before the first attempt
            delay = self.backoff * 2 ** attempt
            request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    data = json.loads(response.read().decode("utf-8"))
                content = data["choices"][0]["message"].get("content")
                return content or ""
            except urllib.error.HTTPError as err:
                detail = _error_detail(err)
                if err.code not in RETRYABLE and err.code < 500:
                    raise JudgeRejected(f"judge {endpoint} refused the request: HTTP {err.code} {detail}") from None
                problem = f"HTTP {err.code} {detail}".strip()
                delay = max(delay, _retry_after(err))
            except (OSError, ValueError, http.client.HTTPException) as err:  # refused, reset, timeout, bad JSON
                problem = f"{type(err).__name__}: {err}"
            except (KeyError, IndexError, TypeError, AttributeError):
                problem = "reply without choices[0].message"
        raise JudgeCallFailed(f"{problem} (after {max(1, self.attempts)} attempts)")


def _error_detail(err: urllib.error.HTTPError) -> str:
    """The server's own error message, on one short line (OpenAI puts it in error.message)."""
    try:
        text = err.read().decode("utf-8", "replace")
    except OSError:
        return ""
    try:
        message = json.loads(text)["error"]
        text = message.get("message", text) if isinstance(message, dict) else str(message)
    except (ValueError, KeyError, TypeError):
        pass
    return " ".join(text.split())[:200]


def _retry_after(err: urllib.error.HTTPError) -> float:
    try:
        return min(60.0, float(err.headers.get("Retry-After", 0)))
    except (TypeError, ValueError):
        return 0.0


def keep_done_rows(path: Path, question_ids: Iterable[str], done: Callable[[dict], bool]) -> list[dict]:
    """The finished rows of a judged output file, which is rewritten without the others.

    Why rewrite: a rerun asks the judge again for failed rows; dropping them first (atomically,
    a temporary file then `os.replace`) keeps one row per question, so the file stays readable by
    the original's own summary scripts. A row for a question not in this run stops it.
    """
    if not path.exists():
        return []
    rows, known, kept, seen = read_rows(path), set(question_ids), [], set()
    for row in rows:
        qid = str(row.get("question_id"))
        if qid not in known:
            raise DataError(f"output file {path} has a row for question_id {qid}, which is not in the question "
                            "file: it belongs to another run (move it away or pick another --output)")
        if done(row) and qid not in seen:
            kept.append(row)
            seen.add(qid)
    if len(kept) < len(rows):
        tmp = path.with_name(path.name + ".tmp")
        with RowWriter(tmp) as writer:
            for row in kept:
                writer.write(row)
        os.replace(tmp, path)
    return kept


def judge_all(output: str | Path, items: Sequence[tuple[str, T]], done: Callable[[dict], bool],
              grade: Callable[[T], dict]) -> list[dict]:
    """Every row of a resumable judged run: finished rows kept, `grade(item)` appended for the rest.

    Each new row is one flushed, fsynced line (`llava.eval.resume`), so a crash loses at most the
    call in flight and a torn last line is cut away on the next run.
    """
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = keep_done_rows(path, [qid for qid, _ in items], done)
    finished = {str(r["question_id"]) for r in rows}
    _, writer = open_rows(path)
    with writer:
        for qid, item in items:
            if qid in finished:
                continue
            row = grade(item)
            writer.write(row)
            writer.sync()
            rows.append(row)
    return rows


def add_judge_arguments(parser: argparse.ArgumentParser, default_model: str, default_max_tokens: int,
                        max_tokens_note: str) -> None:
    g = parser.add_argument_group("judge (any OpenAI-compatible chat-completions endpoint)")
    g.add_argument("--judge-url", default=os.environ.get("OPENAI_BASE_URL") or DEFAULT_URL,
                   help="base URL, e.g. http://127.0.0.1:8000/v1 (default: $OPENAI_BASE_URL or OpenAI)")
    g.add_argument("--judge-model", default=default_model, help=f"model name (default {default_model})")
    g.add_argument("--judge-key-env", default=None,
                   help="environment variable holding the API key (default OPENAI_API_KEY, optional)")
    g.add_argument("--judge-retries", type=int, default=4, help="attempts per call (default 4)")
    g.add_argument("--judge-backoff", type=float, default=1.0, help="first retry delay in seconds, doubled each time")
    g.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per HTTP request")
    g.add_argument("--max-tokens", type=int, default=default_max_tokens,
                   help=f"most tokens per judge reply ({max_tokens_note})")


def judge_from_args(args: argparse.Namespace) -> Judge:
    """A Judge from the flags; a key variable named with --judge-key-env must be set."""
    if args.judge_key_env:
        key = os.environ.get(args.judge_key_env)
        if not key:
            raise InputError(f"--judge-key-env {args.judge_key_env}: that environment variable is not set")
    else:
        key = os.environ.get("OPENAI_API_KEY") or None
    if not args.judge_url.startswith(("http://", "https://")):
        raise InputError(f"--judge-url {args.judge_url!r}: expected an http:// or https:// base URL")
    if not args.judge_model:
        raise InputError("--judge-model is empty: name the judge's model")
    if args.judge_retries < 1 or args.judge_backoff < 0 or args.judge_timeout <= 0:
        raise InputError("--judge-retries must be >= 1, --judge-backoff >= 0 and --judge-timeout > 0")
    if args.max_tokens < 1:
        raise InputError("--max-tokens must be at least 1")
    return Judge(args.judge_url, args.judge_model, key, args.judge_retries, args.judge_backoff, args.judge_timeout,
                 args.max_tokens)
