"""A model worker of the original's serving stack: one model, registered with the controller.

    python -m llava.serve.model_worker --controller-address http://127.0.0.1:21001 --port 21002 \\
        --model-path liuhaotian/llava-v1.5-7b            # default: the bundled tiny model

`/worker_generate_stream` takes the rendered conversation (`prompt`, one literal `<image>` per
image) and `images` (base64 image files) and streams NUL-delimited JSON chunks whose `text` is
the prompt plus everything generated so far, as the original does (the web UI strips the
prompt). Requests go through the continuous-batching `Scheduler`: concurrent requests decode
together in one batch instead of one after another.

`--limit-model-concurrency N` (default 5) bounds the requests in flight, as the original's
semaphore does: up to N are admitted (image encoding, then the scheduler, which holds
`--max-batch` rows decoding, default N, and queues the rest of the N); request N+1 waits for
a free slot rather than being refused. The reported `queue_length` is admitted plus waiting.

Errors are chunks, never a crashed worker: bad input (wrong `<image>` count, an undecodable
image, bad sampling values) -> error_code 1 with the reason; a prompt that leaves no room ->
the original's "Exceeds max token length" text (error_code 0); anything unexpected -> the
original's error_code 1 "NETWORK ERROR" text, with the traceback in the worker's log.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from llava.console import exit_with, one_line, run_command
from llava.errors import (
    ContextTooLong,
    InputError,
    InputTypeError,
    LlavaError,
    Overloaded,
    SchedulerClosed,
)
from llava.serve import protocol

try:  # FastAPI resolves endpoint annotations from the module; `main` says which extra is missing
    from fastapi import Request
except ImportError:  # pragma: no cover - without the serve extra
    Request = Any

log = logging.getLogger("llava.model_worker")

MAX_NEW_TOKENS_CAP = 1024  # the original's cap, whatever the client asks
REGISTER_TIMEOUT_S = 5.0


def _number(body: dict, key: str, default: float, kind: type = float) -> Any:
    """The original's `float(params.get(key, default))`: numbers and numeric strings, named if neither."""
    value = body.get(key)
    if value is None:
        return kind(default)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputTypeError(f"{key!r} must be a number, not {type(value).__name__}")
    try:
        return kind(float(value)) if kind is int else kind(value)
    except (ValueError, OverflowError) as err:
        raise InputError(f"{key!r} must be a number, got {value!r:.40}") from err


def parse_generate(body: dict[str, Any]):
    """A `/worker_generate_stream` request -> (prompt, base64 images, SamplingParams), original defaults.

    temperature 1.0, sampling only above 0.001 (else greedy); top_p 1.0 (0, which the web UI's
    slider allows, keeps only the best token); max_new_tokens 256, at most 1024; `stop` a string
    or list. `model` is ignored.
    """
    from llava.generate.sampling import SamplingParams

    prompt, images = body.get("prompt"), body.get("images")
    if not isinstance(prompt, str):
        raise InputTypeError(f"'prompt' must be a string (the rendered conversation), not {type(prompt).__name__}")
    images = [] if images is None else images
    if not isinstance(images, list):
        raise InputTypeError(f"'images' must be a list of base64-encoded images, not {type(images).__name__}")
    temperature = _number(body, "temperature", 1.0)
    top_p = _number(body, "top_p", 1.0)
    max_new_tokens = _number(body, "max_new_tokens", 256, int)
    sample = temperature > 0.001
    params = SamplingParams(temperature=temperature if sample else 0.0,
                            top_p=(top_p or 1e-8) if sample else 1.0,
                            max_new_tokens=min(max_new_tokens, MAX_NEW_TOKENS_CAP), stop=body.get("stop"))
    return prompt, images, params


class ModelWorker:
    """The protocol around one `ModelService` (pipeline + scheduler): admission, errors, chunks."""

    def __init__(self, service, limit: int = 5, stream_interval: int = 1) -> None:
        self.service = service
        self.limit = limit
        self.stream_interval = stream_interval
        self.pending = 0  # requests admitted or waiting for admission (the original's queue_length)
        self._slots = asyncio.Semaphore(limit)
        # One thread decodes images and tokenizes, so requests never share the tokenizer at once.
        self._prepare_thread = ThreadPoolExecutor(1, thread_name_prefix="llava-prepare")

    def status(self) -> dict[str, Any]:
        # "template" is ours (the original has none): the web UI renders prompts with the model's own template.
        return {"model_names": [self.service.name], "speed": 1, "queue_length": self.pending,
                "template": self.service.pipe.template.name}

    def close(self) -> None:
        self.service.close()
        self._prepare_thread.shutdown(wait=False, cancel_futures=True)

    async def generate_stream(self, body: dict[str, Any] | LlavaError) -> AsyncIterator[bytes]:
        """The response: wait for one of the `limit` slots, then generate."""
        self.pending += 1
        try:
            async with self._slots:
                async for item in self._generate(body):
                    yield item
        finally:
            self.pending -= 1

    def _prepare(self, prompt: str, images: list):
        from llava.processing.tokenize import check_image_count

        check_image_count(prompt, len(images))  # before decoding any image
        decoded = [protocol.decode_image(data, i) for i, data in enumerate(images)]
        return self.service.pipe.prepare(prompt, images=decoded, raw=True, encode=False)  # encoded at prefill

    async def _generate(self, body: dict[str, Any] | LlavaError) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        prompt = ""
        try:
            if isinstance(body, LlavaError):
                raise body
            prompt, images, params = parse_generate(body)
            if not params.stop and self.service.pipe.template.stop_str:
                params.stop = (self.service.pipe.template.stop_str,)  # as `llava run` does
            prepared = await loop.run_in_executor(self._prepare_thread, self._prepare, prompt, images)
            room = self.service.pipe.engine.check_context(prepared.request)
            params = dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, room))
            stream = self.service.scheduler.submit(prepared.request, params, loop=loop)
        except ContextTooLong:
            yield protocol.chunk(prompt + protocol.EXCEEDS_MSG)
            return
        except (Overloaded, SchedulerClosed) as err:
            log.warning("request refused: %s", err)
            yield protocol.chunk(protocol.SERVER_ERROR_MSG, protocol.WORKER_ERROR)
            return
        except LlavaError as err:
            log.info("bad request: %s", one_line(err))
            yield protocol.chunk(f"Bad request: {one_line(err)}", protocol.WORKER_ERROR)
            return
        except Exception:
            log.exception("request failed before generation")
            yield protocol.chunk(protocol.SERVER_ERROR_MSG, protocol.WORKER_ERROR)
            return
        async for item in self._relay(prompt, stream):
            yield item

    async def _relay(self, prompt: str, stream) -> AsyncIterator[bytes]:
        """Cumulative chunks every `stream_interval` deltas and at the end; a gone client frees the row."""
        text, sent, deltas = prompt, None, 0
        try:
            async for delta in stream:
                text += delta
                deltas += 1
                if deltas % self.stream_interval == 0:
                    sent = text
                    yield protocol.chunk(text)
            if sent != text:
                yield protocol.chunk(text)
        except Exception as err:  # noqa: BLE001 - the scheduler logged the traceback
            log.error("generation failed: %s", one_line(err))
            yield protocol.chunk(protocol.SERVER_ERROR_MSG, protocol.WORKER_ERROR)
        finally:
            stream.cancel()  # no-op once finished; frees the batch row when the client went away


class Heartbeat(threading.Thread):
    """Registers with the controller once the server answers, then beats every `interval` seconds.

    A controller that does not know the worker (restarted, or it expired the worker) answers
    `exist: false`; the worker then registers again, as the original does.
    """

    def __init__(self, controller: str, address: str, status: Callable[[], dict], interval: float) -> None:
        super().__init__(name="llava-heartbeat", daemon=True)
        self.controller, self.address, self.status, self.interval = controller, address, status, interval
        self.ready: Callable[[], bool] = lambda: True
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        import httpx

        registered = False
        with httpx.Client(timeout=REGISTER_TIMEOUT_S) as client:
            while not self._stop_event.is_set():
                if not self.ready():
                    self._stop_event.wait(0.05)
                    continue
                try:
                    if registered and not self._beat(client):
                        log.info("the controller does not know this worker; registering again")
                        registered = False
                    if not registered:
                        self._register(client)
                        registered = True
                except (httpx.HTTPError, ValueError, KeyError, TypeError) as err:
                    log.warning("controller %s: %s", self.controller, err)
                self._stop_event.wait(self.interval)

    def _register(self, client) -> None:
        r = client.post(self.controller + "/register_worker",
                        json={"worker_name": self.address, "check_heart_beat": True, "worker_status": self.status()})
        r.raise_for_status()
        log.info("registered %s with the controller %s", self.address, self.controller)

    def _beat(self, client) -> bool:
        r = client.post(self.controller + "/receive_heart_beat",
                        json={"worker_name": self.address, "queue_length": self.status()["queue_length"]})
        r.raise_for_status()
        return bool(r.json()["exist"])


def build_app(worker: ModelWorker, heartbeat: Heartbeat | None = None):
    """The FastAPI app: the original's two endpoints (POST)."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if heartbeat is not None:
            heartbeat.start()
        try:
            yield
        finally:
            if heartbeat is not None:
                heartbeat.stop()
            worker.close()

    app = FastAPI(title="LLaVA model worker", lifespan=lifespan)

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> StreamingResponse:
        try:
            body: dict | LlavaError = protocol.json_object(await request.body(), "request")
        except LlavaError as err:
            body = err
        return StreamingResponse(worker.generate_stream(body))

    @app.post("/worker_get_status")
    async def worker_get_status() -> dict:
        return worker.status()

    return app


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.serve.model_worker",
                                description="A model worker for the controller (the original's API).")
    p.add_argument("--host", type=str, default="127.0.0.1",
                   help="address to listen on (default loopback; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=21002)
    p.add_argument("--worker-address", type=str, default=None,
                   help="the address the controller reaches this worker at (default http://HOST:PORT)")
    p.add_argument("--controller-address", type=str, default="http://127.0.0.1:21001")
    p.add_argument("--model-path", type=str, default=None, help="checkpoint folder or hub name (default: bundled)")
    p.add_argument("--model-base", type=str, default=None)
    p.add_argument("--model-name", type=str, default=None,
                   help="default: the path's last part (the last two for a checkpoint-N folder)")
    p.add_argument("--device", type=str, default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--limit-model-concurrency", type=int, default=5, help="requests in flight; more wait")
    p.add_argument("--max-batch", type=int, default=None,
                   help="requests decoding together (default and at most --limit-model-concurrency)")
    p.add_argument("--stream-interval", type=int, default=1, help="send a chunk every this many text deltas")
    p.add_argument("--no-register", action="store_true", help="do not register with the controller")
    p.add_argument("--heart-beat-interval", type=float, default=None, metavar="SECONDS",
                   help=f"seconds between heart beats (default ${protocol.HEART_BEAT_INTERVAL_ENV} or "
                        f"{protocol.WORKER_HEART_BEAT_INTERVAL:.0f})")
    p.add_argument("--load-8bit", action="store_true")
    p.add_argument("--load-4bit", action="store_true")
    p.add_argument("--use-flash-attn", action="store_true", help="accepted for compatibility; attention uses SDPA")
    return p


def _check_args(args: argparse.Namespace) -> tuple[float, int]:
    """Bad values fail in one line before the model loads; returns (heart-beat interval, max batch)."""
    for flag in ("limit_model_concurrency", "stream_interval", "max_batch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.load_8bit and args.load_4bit:
        raise InputError("--load-8bit and --load-4bit exclude each other; pick one")
    for flag in ("controller_address", "worker_address"):
        value = getattr(args, flag)
        if value is not None and not value.startswith(("http://", "https://")):
            raise InputError(f"--{flag.replace('_', '-')} must be an http(s) address, got {value!r}")
    interval = protocol.positive_seconds("--heart-beat-interval", args.heart_beat_interval,
                                         protocol.HEART_BEAT_INTERVAL_ENV, protocol.WORKER_HEART_BEAT_INTERVAL)
    return interval, min(args.max_batch or args.limit_model_concurrency, args.limit_model_concurrency)


def _own_address(host: str, port: int) -> str:
    """Where the controller can reach a worker listening on host:port (a wildcard host means this machine)."""
    host = "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def command() -> int:
        protocol.require_serving()
        interval, max_batch = _check_args(args)
        sock = protocol.bind(args.host, args.port)  # a taken port fails before the model loads
        address = (args.worker_address or _own_address(args.host, sock.getsockname()[1])).rstrip("/")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

        import uvicorn

        from llava.api import default_model_path
        from llava.serve.service import ModelService, run_server

        quantize = "8bit" if args.load_8bit else "4bit" if args.load_4bit else None
        service = ModelService.load(args.model_path or default_model_path(), name=args.model_name,
                                    max_batch=max_batch, max_waiting=args.limit_model_concurrency - max_batch,
                                    start=False, model_base=args.model_base, device=args.device, quantize=quantize)
        log.info("model %s on %s, at %s; %d request(s) in flight, %d decoding together",
                 service.name, service.pipe.engine.device, address, args.limit_model_concurrency, max_batch)
        worker = ModelWorker(service, args.limit_model_concurrency, args.stream_interval)
        heartbeat = None
        if not args.no_register:
            heartbeat = Heartbeat(args.controller_address.rstrip("/"), address, worker.status, interval)
        server = uvicorn.Server(uvicorn.Config(build_app(worker, heartbeat), log_level="info",
                                               timeout_graceful_shutdown=5))
        if heartbeat is not None:
            heartbeat.ready = lambda: server.started  # register only once requests can be answered
        run_server(server, sock, service)  # the model loop on this (main) thread, HTTP on a helper
        return 0

    return run_command("llava.serve.model_worker", command)


if __name__ == "__main__":
    exit_with(main())
