"""A scripted OpenAI-compatible judge on loopback, for the judged benchmarks' tests.

A real HTTP server (http.server in a thread) answering POST /v1/chat/completions: each request's
last message is matched against the script's markers (first match wins) and gets that marker's
next (status, text) reply, so tests choose normal, unparseable and failing replies per question.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from serve_helpers import free_port


class FakeJudge:
    """Scripted replies per marker: a list of (status, text); the last entry repeats forever."""

    def __init__(self) -> None:
        self.script: dict[str, list[tuple[int, str]]] = {}
        self.calls: list[tuple[str, dict, dict]] = []
        self.lock = threading.Lock()
        self.url = ""

    def next(self, body: dict, headers: dict) -> tuple[int, str]:
        content = body["messages"][-1]["content"]
        with self.lock:
            marker = next(m for m in self.script if m in content)
            self.calls.append((marker, body, headers))
            queue = self.script[marker]
            return queue.pop(0) if len(queue) > 1 else queue[0]

    def count(self, marker: str) -> int:
        return sum(m == marker for m, _, _ in self.calls)


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
            status, text = 404, f"no route {self.path}"
        else:
            status, text = self.server.fake.next(body, dict(self.headers))
        if status == 200:
            payload = {"object": "chat.completion", "model": body["model"],
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
        else:
            payload = {"error": {"message": text}}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def running_judge() -> Iterator[FakeJudge]:
    fake = FakeJudge()
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Handler)
    server.fake = fake
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
