"""`llava serve`: the OpenAI-compatible API and the web UI for one model, in one process.

Both sit on one `ModelService`, so API clients and browser users share one continuous batch.
Safe by default: it listens on loopback, fetches no remote images, reads no local files, and
with an API key (`--api-key` or LLAVA_API_KEY) guards the API and the UI (user `llava`).
The flags come from `ServeConfig`'s fields (`llava.dataclass_cli`), not a hand-kept list.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from llava.console import run_command
from llava.dataclass_cli import add_dataclass_args, from_args
from llava.errors import InputError

UI_PATH = "/ui"


def _opt(help: str, *flags: str, **more) -> dict:
    return {"metadata": {"help": help, "flags": list(flags), **more}}


@dataclass
class ServeConfig:
    """Everything `llava serve` takes; each field is a flag of the same name."""

    model: str | None = field(default=None, **_opt("checkpoint folder or hub name (default: the bundled tiny model)",
                                                   "--model-path"))
    model_base: str | None = field(default=None, **_opt("base LM for LoRA or projector-only checkpoints"))
    model_name: str | None = field(default=None, **_opt("name clients use (default: the model folder's name)"))
    device: str | None = field(default=None, **_opt("cpu, cuda, cuda:1, mps (default: best available)"))
    dtype: str | None = field(default=None, **_opt("fp32, bf16 or fp16", choices=["fp32", "bf16", "fp16"]))
    host: str = field(default="127.0.0.1", **_opt("address to listen on; loopback unless you mean to expose it"))
    port: int = field(default=8000, **_opt("port"))
    api_key: str | None = field(default=None, **_opt("require `Authorization: Bearer KEY` (default: $LLAVA_API_KEY)"))
    max_batch: int = field(default=8, **_opt("requests decoded together"))
    max_waiting: int = field(default=64, **_opt("requests queued beyond the batch; more get HTTP 429"))
    max_images: int = field(default=4, **_opt("images per request"))
    max_image_bytes: int = field(default=20 << 20, **_opt("encoded size limit of one image, bytes"))
    max_image_pixels: int = field(default=40_000_000, **_opt("width x height limit of one image"))
    allow_remote_images: bool = field(default=False, **_opt("fetch http(s) image URLs (size limit and timeout)"))
    allowed_local_media: str | None = field(default=None, **_opt("serve file:// image URLs from this folder only"))
    ui: bool = field(default=True, **_opt(f"serve the web UI at {UI_PATH}"))
    log_dir: str = field(default="serve_logs", **_opt("web UI conversation and vote logs"))

    def __post_init__(self) -> None:
        if self.api_key is None:
            self.api_key = os.environ.get("LLAVA_API_KEY") or None
        for name in ("max_batch", "max_images", "max_image_bytes", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_waiting < 0:
            raise InputError(f"--max-waiting must be >= 0, got {self.max_waiting}")
        if self.allowed_local_media is not None and not os.path.isdir(self.allowed_local_media):
            raise InputError(f"--allowed-local-media {self.allowed_local_media}: not a folder")


def build_app(config: ServeConfig, service=None, start_scheduler: bool = True):
    """The FastAPI app: API routes, and the Gradio UI mounted at UI_PATH. Loads the model unless given
    one; `start_scheduler=False` leaves its model loop to the caller (`run_server`)."""
    from fastapi import FastAPI
    from fastapi.responses import RedirectResponse

    from llava.serve.media import MediaPolicy
    from llava.serve.openai_api import APISettings, add_openai_routes
    from llava.serve.service import ModelService

    if service is None:
        service = ModelService.load(config.model, config.model_name, config.max_batch, config.max_waiting,
                                    start=start_scheduler, model_base=config.model_base, device=config.device,
                                    dtype=config.dtype)
    media = MediaPolicy(max_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels,
                        allow_remote=config.allow_remote_images, local_dir=config.allowed_local_media)
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(title="LLaVA", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.service = service
    add_openai_routes(app, service, APISettings(api_key=config.api_key, media=media, max_images=config.max_images))
    if config.ui:
        import gradio as gr

        from llava.serve.web_ui import LocalBackend, build_ui

        blocks = build_ui(LocalBackend(service.pipe, service.scheduler, service.name), log_dir=config.log_dir)
        auth = ("llava", config.api_key) if config.api_key else None
        app = gr.mount_gradio_app(app, blocks, path=UI_PATH, auth=auth, server_name=config.host,
                                  server_port=config.port)

        @app.get("/", include_in_schema=False)
        async def root() -> RedirectResponse:
            return RedirectResponse(UI_PATH + "/")

    return app


def serve(config: ServeConfig) -> int:
    """Take the port, load the model, then serve until Ctrl-C / SIGTERM."""
    from llava.serve.protocol import bind, require_serving
    from llava.serve.service import run_server

    require_serving()
    sock = bind(config.host, config.port)  # a taken port fails at once, before the model loads
    import uvicorn

    app = build_app(config, start_scheduler=False)
    base = f"http://{config.host}:{sock.getsockname()[1]}"
    print(f"LLaVA serving {app.state.service.name}\n  OpenAI API: {base}/v1  (e.g. {base}/v1/chat/completions)"
          + (f"\n  web UI:     {base}{UI_PATH}/" if config.ui else "")
          + ("\n  API key required" if config.api_key else ""), flush=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    run_server(server, sock, app.state.service)
    return 0


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, ServeConfig)


def add_serve_command(subparsers: argparse._SubParsersAction) -> None:
    """`llava serve` on the top-level parser."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible API + web UI for one model",
                              description=__doc__.split("\n\n")[0])
    add_serve_arguments(p)
    p.set_defaults(func=lambda args: serve(from_args(ServeConfig, args)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava.serve.app", description=__doc__.split("\n\n")[0])
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    return run_command("llava serve", lambda: serve(from_args(ServeConfig, args)))


if __name__ == "__main__":
    sys.exit(main())
