"""Real server processes on loopback for the serving tests: start, wait until they answer, stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll `url` until it answers (any status below 500) or the process dies (its output is shown)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = output(proc)
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}:\n{out[-4000:]}")
        try:
            if httpx.get(url, timeout=2.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def output(proc: subprocess.Popen) -> str:
    """Everything the process has printed so far (stdout and stderr go to one file, never a full pipe)."""
    proc.log.flush()
    return Path(proc.log.name).read_text(errors="replace")


def start(args: Sequence[str], env: dict | None = None) -> subprocess.Popen:
    """`python ...args` in its own process, its output in a temporary file (`output(proc)`)."""
    log = tempfile.NamedTemporaryFile("w+", prefix="llava-server-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**ENV, **(env or {})}, text=True,
                            stdout=log, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20.0) -> str:
    """Stop a server process and return its output."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = output(proc)
    proc.log.close()
    os.unlink(proc.log.name)
    return text


@contextmanager
def server(args: Sequence[str], health_url: str, env: dict | None = None,
           timeout: float = 120.0) -> Iterator[subprocess.Popen]:
    """`python ...args` in its own process; yields once `health_url` answers, stops it after."""
    proc = start(args, env)
    try:
        wait_until_up(health_url, proc, timeout)
        yield proc
    finally:
        stop(proc)
