"""The controller of the original's multi-model serving stack: workers register, clients ask it where to go.

    python -m llava.serve.controller --host 127.0.0.1 --port 21001 --dispatch-method shortest_queue

Model workers register themselves and beat every 15 s; a worker whose beats stop for
`--heart-beat-expiration` seconds (default 30, or `LLAVA_HEART_BEAT_EXPIRATION`) is dropped
at the next check, made every that many seconds, as in the original. The web UI asks for the
model list and a worker address, or streams through `/worker_generate_stream`, which
re-streams the worker's NUL-delimited chunks. All endpoints are POST, as in the original.

The state lives on the server's event loop (every endpoint is async), so it needs no lock.
Any client that can reach the controller can register a worker address, which the controller
then calls; it listens on loopback unless `--host` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from llava.console import exit_with, run_command
from llava.errors import InputError, InputTypeError
from llava.serve import protocol

try:  # FastAPI resolves endpoint annotations from the module; `main` says which extra is missing
    from fastapi import Request
except ImportError:  # pragma: no cover - without the serve extra
    Request = Any

log = logging.getLogger("llava.controller")

DISPATCH_METHODS = ("shortest_queue", "lottery")
STATUS_TIMEOUT_S = 5.0  # the original's timeout when it asks a worker for its status
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 300.0  # between two chunks; a request may wait for a free slot on a busy worker


@dataclass
class WorkerInfo:
    model_names: list[str]
    speed: float
    queue_length: int
    check_heart_beat: bool
    last_heart_beat: float  # time.monotonic()


def check_status(status: object, where: str) -> dict[str, Any]:
    """A worker's `{"model_names", "speed", "queue_length"}`, refused with a reason if malformed."""
    if not isinstance(status, dict):
        raise InputTypeError(f"{where} must be an object with model_names, speed and queue_length")
    names, speed, queue = status.get("model_names"), status.get("speed"), status.get("queue_length", 0)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InputTypeError(f"{where}.model_names must be a list of strings")
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not speed > 0:
        raise InputError(f"{where}.speed must be a positive number, got {speed!r:.40}")
    if isinstance(queue, bool) or not isinstance(queue, int) or queue < 0:
        raise InputError(f"{where}.queue_length must be a non-negative integer, got {queue!r:.40}")
    return {"model_names": names, "speed": speed, "queue_length": queue}


class Controller:
    """Which workers serve which models, how busy they are, and which one gets the next request."""

    def __init__(self, dispatch_method: str = "shortest_queue", expiration: float = 30.0, client=None,
                 rng: random.Random | None = None) -> None:
        if dispatch_method not in DISPATCH_METHODS:
            raise InputError(f"unknown dispatch method {dispatch_method!r}; valid: {', '.join(DISPATCH_METHODS)}")
        self.dispatch_method = dispatch_method
        self.expiration = expiration
        self.workers: dict[str, WorkerInfo] = {}
        self.client = client  # an httpx.AsyncClient; only the endpoints that call workers need it
        self.rng = rng or random.Random()

    # Registration and heart beats --------------------------------------------------------------
    async def register_worker(self, name: str, check_heart_beat: bool, status: dict | None) -> bool:
        """Add or refresh a worker; without a status the worker is asked (and dropped if it does not answer)."""
        log.info("%s worker %s", "Register an existing" if name in self.workers else "Register a new", name)
        if status is None:
            status = await self.get_worker_status(name)
            if status is None:
                return False
        self.workers[name] = WorkerInfo(list(status["model_names"]), status["speed"], status["queue_length"],
                                        check_heart_beat, time.monotonic())
        return True

    async def get_worker_status(self, name: str) -> dict | None:
        try:
            r = await self.client.post(name + "/worker_get_status", timeout=STATUS_TIMEOUT_S)
            return check_status(r.json(), "status") if r.status_code == 200 else None
        except Exception as err:  # noqa: BLE001 - unreachable, not JSON, malformed: all mean "no status"
            log.warning("worker %s gave no status: %s", name, err)
            return None

    async def refresh_all_workers(self) -> None:
        """Re-register every worker from its own status, dropping those that do not answer."""
        old = dict(self.workers)
        self.workers.clear()
        results = await asyncio.gather(*(self.register_worker(n, w.check_heart_beat, None) for n, w in old.items()))
        for name, ok in zip(old, results):
            if not ok:
                log.info("Remove stale worker: %s", name)

    def receive_heart_beat(self, name: str, queue_length: int) -> bool:
        worker = self.workers.get(name)
        if worker is None:
            log.info("Receive unknown heart beat from %s", name)
            return False
        worker.queue_length = queue_length
        worker.last_heart_beat = time.monotonic()
        return True

    def remove_expired(self) -> list[str]:
        """Drop the workers whose last beat is older than the expiration (those that beat at all)."""
        deadline = time.monotonic() - self.expiration
        expired = [n for n, w in self.workers.items() if w.check_heart_beat and w.last_heart_beat < deadline]
        for name in expired:
            log.info("Remove worker %s: no heart beat for %.0f s", name, self.expiration)
            del self.workers[name]
        return expired

    # Dispatch ----------------------------------------------------------------------------------
    def list_models(self) -> list[str]:
        return sorted({m for w in self.workers.values() for m in w.model_names})

    def get_worker_address(self, model: str) -> str:
        """A worker serving `model`, or "" if none does.

        lottery: drawn at random, weighted by speed. shortest_queue: the smallest
        queue_length / speed; its cached queue length then grows by one until its next beat.
        """
        candidates = [(n, w) for n, w in self.workers.items() if model in w.model_names]
        if not candidates:
            return ""
        if self.dispatch_method == "lottery":
            return self.rng.choices([n for n, _ in candidates], weights=[w.speed for _, w in candidates])[0]
        name, worker = min(candidates, key=lambda item: item[1].queue_length / item[1].speed)
        worker.queue_length += 1
        return name

    async def status(self) -> dict[str, Any]:
        """All workers' statuses summed (for a controller of controllers, as in the original)."""
        statuses = await asyncio.gather(*(self.get_worker_status(n) for n in list(self.workers)))
        found = [s for s in statuses if s is not None]
        return {"model_names": sorted({m for s in found for m in s["model_names"]}),
                "speed": sum(s["speed"] for s in found), "queue_length": sum(s["queue_length"] for s in found)}

    async def generate_stream(self, params: dict[str, Any]) -> AsyncIterator[bytes]:
        """The chosen worker's chunks, re-streamed; error_code 2 without a worker, 3 if it fails."""
        import httpx

        address = self.get_worker_address(params.get("model"))
        if not address:
            log.info("no worker for model %r", params.get("model"))
            yield protocol.chunk(protocol.SERVER_ERROR_MSG, protocol.NO_WORKER)
            return
        timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        try:
            async with self.client.stream("POST", address + "/worker_generate_stream", json=params,
                                          timeout=timeout) as r:
                if r.status_code != 200:
                    raise httpx.HTTPStatusError(f"HTTP {r.status_code}", request=r.request, response=r)
                async for item in protocol.split_chunks(r.aiter_raw()):
                    yield item + protocol.DELIMITER
        except httpx.HTTPError as err:
            log.warning("worker %s failed: %s", address, err)
            yield protocol.chunk(protocol.SERVER_ERROR_MSG, protocol.WORKER_UNREACHABLE)


async def expire_workers(controller: Controller) -> None:
    """The original's check: every `expiration` seconds, drop the workers that stopped beating."""
    while True:
        await asyncio.sleep(controller.expiration)
        controller.remove_expired()


async def _body(request) -> dict[str, Any]:
    """The request's JSON object; a malformed body is the client's error (HTTP 400), not a crash."""
    from fastapi import HTTPException

    try:
        return protocol.json_object(await request.body(), request.url.path)
    except (InputError, InputTypeError) as err:
        raise HTTPException(400, str(err)) from err


def _field(body: dict, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    from fastapi import HTTPException

    value = body.get(key, default)
    if value is ... or isinstance(value, bool) and kind is int or not isinstance(value, kind):
        raise HTTPException(400, f"{key!r} must be given as {getattr(kind, '__name__', kind)}")
    return value


def build_app(controller: Controller):
    """The FastAPI app: the original's endpoints, all POST."""
    import httpx
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import StreamingResponse

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own_client = controller.client is None
        if own_client:
            controller.client = httpx.AsyncClient(timeout=STATUS_TIMEOUT_S)
        checker = asyncio.create_task(expire_workers(controller))
        try:
            yield
        finally:
            checker.cancel()
            if own_client:
                await controller.client.aclose()

    app = FastAPI(title="LLaVA controller", lifespan=lifespan)

    @app.post("/register_worker")
    async def register_worker(request: Request) -> None:
        body = await _body(request)
        name = _field(body, "worker_name", str)
        if not name.startswith(("http://", "https://")):
            raise HTTPException(400, "'worker_name' must be the worker's http(s) address")
        status = body.get("worker_status")
        if status is not None:
            try:
                status = check_status(status, "worker_status")
            except (InputError, InputTypeError) as err:
                raise HTTPException(400, str(err)) from err
        await controller.register_worker(name.rstrip("/"), bool(body.get("check_heart_beat", True)), status)

    @app.post("/refresh_all_workers")
    async def refresh_all_workers() -> None:
        await controller.refresh_all_workers()

    @app.post("/list_models")
    async def list_models() -> dict:
        return {"models": controller.list_models()}

    @app.post("/get_worker_address")
    async def get_worker_address(request: Request) -> dict:
        return {"address": controller.get_worker_address(_field(await _body(request), "model", str))}

    @app.post("/receive_heart_beat")
    async def receive_heart_beat(request: Request) -> dict:
        body = await _body(request)
        name, queue = _field(body, "worker_name", str), _field(body, "queue_length", int, 0)
        return {"exist": controller.receive_heart_beat(name.rstrip("/"), queue)}

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> StreamingResponse:
        return StreamingResponse(controller.generate_stream(await _body(request)))

    @app.post("/worker_get_status")
    async def worker_get_status() -> dict:
        return await controller.status()

    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.serve.controller",
                                description="The controller of the model workers (the original's API).")
    p.add_argument("--host", type=str, default="127.0.0.1",
                   help="address to listen on (default loopback; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=21001)
    p.add_argument("--dispatch-method", choices=DISPATCH_METHODS, default="shortest_queue")
    p.add_argument("--heart-beat-expiration", type=float, default=None, metavar="SECONDS",
                   help=f"drop a worker silent this long, checked this often (default "
                        f"${protocol.HEART_BEAT_EXPIRATION_ENV} or {protocol.CONTROLLER_HEART_BEAT_EXPIRATION:.0f})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def command() -> int:
        protocol.require_serving()
        expiration = protocol.positive_seconds("--heart-beat-expiration", args.heart_beat_expiration,
                                               protocol.HEART_BEAT_EXPIRATION_ENV,
                                               protocol.CONTROLLER_HEART_BEAT_EXPIRATION)
        sock = protocol.bind(args.host, args.port)
        import uvicorn

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        log.info("controller on %s:%d, dispatch %s, heart-beat expiration %g s",
                 args.host, args.port, args.dispatch_method, expiration)
        app = build_app(Controller(args.dispatch_method, expiration))
        uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)).run(sockets=[sock])
        return 0

    return run_command("llava.serve.controller", command)


if __name__ == "__main__":
    exit_with(main())
