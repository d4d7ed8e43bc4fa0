"""The original's web server: the chat UI in front of a controller and its model workers.

    python -m llava.serve.controller --port 21001
    python -m llava.serve.model_worker --controller-address http://127.0.0.1:21001 --port 21002
    python -m llava.serve.gradio_web_server --controller-url http://127.0.0.1:21001 --port 7860

The page is `web_ui.build_ui` over a `ControllerBackend`, which speaks the original protocol
(llava/serve/protocol.py): `/refresh_all_workers` + `/list_models` for the model list (once,
or on every page load with `--model-list-mode reload`), `/get_worker_address` per request,
then the worker's `/worker_generate_stream`, whose NUL-delimited chunks carry the prompt plus
the text so far. No model is loaded here, so this process starts without torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import PIL.Image

from llava.console import exit_with, run_command
from llava.errors import InputError, LlavaError
from llava.processing.image_io import image_to_base64
from llava.processing.templates import TEMPLATES, Template, get_template

log = logging.getLogger("llava.gradio_web_server")

DEFAULT_LOG_DIR = "serve_logs"
CONTROL_TIMEOUT_S = 10.0  # controller calls and connecting to a worker
READ_TIMEOUT_S = 120.0  # between two chunks of an answer (a big model's prefill on CPU takes a while)
SHUTDOWN_S = 2  # on Ctrl-C / SIGTERM, answers in flight get this long


class BackendError(LlavaError, RuntimeError):
    """The controller or a worker could not be reached, or a worker answered with an error."""


def web_template_name(model_name: str) -> str:
    """The original web server's first-round template choice from a model name (facts 7.3).

    Where the original names a template it never defined (mistral_orca, mpt_text) this takes
    the nearest defined one (ChatML, mpt) instead of failing with a KeyError.
    """
    name = model_name.lower()
    tagged = "mmtag" in name or ("plain" in name and "finetune" not in name)
    if "llava" not in name:
        return "mpt" if "mpt" in name else "llama_2" if "llama-2" in name else "vicuna_v1"
    if "llama-2" in name:
        return "llava_llama_2"
    if "mistral" in name or "mixtral" in name:
        return "chatml_direct" if "orca" in name or "hermes" in name else "mistral_instruct"
    if "llava-v1.6-34b" in name:
        return "chatml_direct"
    if "v1" in name:
        return "v1_mmtag" if tagged else "llava_v1"
    if "mpt" in name:
        return "mpt"
    return "v0_mmtag" if tagged else "llava_v0"


class ControllerBackend:
    """The UI's backend over the original controller + model workers protocol (httpx).

    The template: `conv_mode` if given, else the one the model's worker reports in its
    `/worker_get_status` ("template", where the worker says), else the original's name rules.
    """

    def __init__(self, controller_url: str, conv_mode: str | None = None, http: Any = None) -> None:
        import httpx

        self.url = controller_url.rstrip("/")
        self.conv_mode = get_template(conv_mode).name if conv_mode else None
        self.http = http or httpx.Client(timeout=httpx.Timeout(CONTROL_TIMEOUT_S, read=READ_TIMEOUT_S))
        self._templates: dict[str, Template] = {}

    def _post(self, url: str, body: dict | None = None) -> Any:
        import httpx

        try:
            response = self.http.post(url, json=body or {}, timeout=CONTROL_TIMEOUT_S)
            response.raise_for_status()
            return response.json() if response.content else None
        except (httpx.HTTPError, ValueError) as err:
            who = "the controller" if url.startswith(self.url + "/") else "the model worker"
            raise BackendError(f"{url} failed ({type(err).__name__}: {err}); is {who} running?") from err

    def model_names(self) -> list[str]:
        self._post(self.url + "/refresh_all_workers")
        models = _field(self._post(self.url + "/list_models"), "models") or []
        return sorted(m for m in models if isinstance(m, str))

    def worker_address(self, model_name: str) -> str:
        address = _field(self._post(self.url + "/get_worker_address", {"model": model_name}), "address")
        if not address or not isinstance(address, str):
            raise BackendError(f"no model worker serves {model_name!r} now; start one (or wait for it to "
                               "register with the controller) and Regenerate")
        return address.rstrip("/")

    def template(self, model_name: str) -> Template:
        """Asks a worker of the model once (cached); unreachable workers are asked again next time."""
        if self.conv_mode:
            return get_template(self.conv_mode)
        if model_name in self._templates:
            return self._templates[model_name]
        try:
            status = self._post(self.worker_address(model_name) + "/worker_get_status")
        except LlavaError as err:
            log.info("no worker status for %s (%s); template chosen from the name", model_name, err)
            return get_template(web_template_name(model_name))
        reported = _field(status, "template")
        name = reported if reported in TEMPLATES else web_template_name(model_name)
        self._templates[model_name] = get_template(name)
        return self._templates[model_name]

    def stream(self, model_name: str, prompt: str, images: list[PIL.Image.Image], temperature: float,
               top_p: float, max_new_tokens: int, stop: str | None) -> Iterator[str]:
        import httpx

        address = self.worker_address(model_name)
        payload = {"model": model_name, "prompt": prompt, "temperature": temperature, "top_p": top_p,
                   "max_new_tokens": max_new_tokens, "stop": stop,
                   "images": [image_to_base64(image, "PNG") for image in images]}
        try:
            with self.http.stream("POST", address + "/worker_generate_stream", json=payload) as response:
                response.raise_for_status()
                for data in _chunks(response.iter_bytes()):
                    if data.get("error_code", 0) != 0:
                        raise BackendError(f"{data.get('text', '')} (error_code: {data['error_code']})")
                    text = data.get("text", "")
                    yield text[len(prompt):]  # the worker sends the prompt back in front, as the original
        except httpx.HTTPError as err:
            raise BackendError(f"the model worker at {address} failed ({type(err).__name__}: {err})") from err


def _field(answer: Any, key: str) -> Any:
    """`answer[key]` of a JSON object answer; None for anything else."""
    return answer.get(key) if isinstance(answer, dict) else None


def _chunks(pieces: Iterator[bytes]) -> Iterator[dict]:
    """JSON objects from a byte stream of NUL-terminated chunks cut anywhere."""
    buffer = b""
    for piece in pieces:
        buffer += piece
        *complete, buffer = buffer.split(b"\0")
        for item in complete:
            if item.strip():
                yield _json(item)
    if buffer.strip():
        yield _json(buffer)


def _json(item: bytes) -> dict:
    try:
        data = json.loads(item)
    except ValueError as err:
        raise BackendError(f"the model worker sent a chunk that is not JSON ({err})") from err
    if not isinstance(data, dict):
        raise BackendError(f"the model worker sent {type(data).__name__} instead of a JSON object")
    return data


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava.serve.gradio_web_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--controller-url", default="http://127.0.0.1:21001")
    p.add_argument("--concurrency-count", type=int, default=16, help="answers generated at the same time")
    p.add_argument("--model-list-mode", choices=["once", "reload"], default="once",
                   help="list the models at start, or again on every page load")
    p.add_argument("--share", action="store_true", help="not available: needs Gradio's internet tunnel")
    p.add_argument("--log-dir", default=DEFAULT_LOG_DIR,
                   help=f"chat and vote logs, and the images chatted about (default ./{DEFAULT_LOG_DIR})")
    p.add_argument("--conv-mode", default=None,
                   help="conversation template for every model (default: the worker's, else from the model name)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def command() -> int:
        if args.share:
            raise InputError("--share opens a tunnel through Gradio's servers on the internet, which this "
                             "server does not do; serve on --host/--port behind your own proxy or tunnel instead")
        if args.concurrency_count < 1:
            raise InputError(f"--concurrency-count must be at least 1, got {args.concurrency_count}")
        from llava.serve import protocol

        protocol.require_serving()
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline server
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per controller call otherwise
        backend = ControllerBackend(args.controller_url, args.conv_mode)
        sock = protocol.bind(args.host, args.port)
        with sock:
            if args.model_list_mode == "once":  # an unreachable controller fails here, in one line
                log.info("models: %s", backend.model_names() or "none yet")
            serve(backend, sock, args)
        return 0

    return run_command("llava.serve.gradio_web_server", command)


def serve(backend: ControllerBackend, sock: Any, args: argparse.Namespace) -> None:
    """The UI at / on FastAPI + uvicorn (as `llava serve` mounts it), on the already bound socket."""
    import gradio as gr
    import uvicorn
    from fastapi import FastAPI

    from llava.serve.web_ui import build_ui

    blocks = build_ui(backend, log_dir=args.log_dir, model_list_mode=args.model_list_mode,
                      concurrency_count=args.concurrency_count)
    app = gr.mount_gradio_app(FastAPI(docs_url=None, redoc_url=None), blocks, path="",
                              server_name=args.host, server_port=args.port, ssr_mode=False)
    print(f"LLaVA web UI on http://{args.host}:{args.port}/ (controller {backend.url})", flush=True)
    # Every open tab (and gradio_client) holds an event stream open, so a graceful stop always waits
    # the whole timeout: keep it short.
    uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_S)).run(sockets=[sock])


if __name__ == "__main__":
    exit_with(main())
