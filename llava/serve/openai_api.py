"""An OpenAI-compatible HTTP API over one `ModelService`: /v1/chat/completions, /v1/models, /health.

Requests follow OpenAI's chat format (string content or `text` / `image_url` parts, images as
`data:` URLs), answers its response and server-sent-event chunk formats, and every error
comes back in its shape, `{"error": {"message", "type", "param", "code"}}`, with the status
code OpenAI uses, so any OpenAI client works unchanged. Generation goes through the model's
continuous-batching scheduler; a streaming client that disconnects cancels its request,
which frees its batch row before the next decode step (`GET /status` shows the counts).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llava.api import Prepared
from llava.errors import (
    ContextTooLong,
    GenerationFailed,
    InputTypeError,
    LlavaError,
    Overloaded,
    SchedulerClosed,
)
from llava.generate.sampling import SamplingParams
from llava.generate.scheduler import Stream
from llava.serve.media import MediaPolicy
from llava.serve.service import ModelService

log = logging.getLogger("llava.serve")

ROLES = ("system", "developer", "user", "assistant")
UNSUPPORTED = {  # OpenAI fields this server cannot honour: refused unless they hold the value that means "off"
    "logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}), "response_format": (None, {"type": "text"}), "audio": (None,),
}


@dataclass
class APISettings:
    """What the API accepts: the key, the image policy, and request-size limits."""

    api_key: str | None = None
    media: MediaPolicy = field(default_factory=MediaPolicy)
    max_images: int = 4  # images per request

    @property
    def max_request_bytes(self) -> int:
        """Base64 grows images by 4/3; allow every image at its limit plus 1 MiB of text."""
        return self.max_images * (self.media.max_bytes * 4 // 3 + 4) + (1 << 20)


class APIError(Exception):
    """An error answered in OpenAI's shape with its HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def from_llava_error(err: LlavaError, param: str | None = None) -> APIError:
    """The project's error types as HTTP errors: input problems 400, overload 429, shutdown 503."""
    if isinstance(err, Overloaded):
        return APIError(429, str(err), "rate_limit_error", code="server_overloaded")
    if isinstance(err, SchedulerClosed):
        return APIError(503, str(err), "server_error", code="shutting_down")
    if isinstance(err, GenerationFailed):
        return APIError(500, str(err), "server_error")
    code = "context_length_exceeded" if isinstance(err, ContextTooLong) else None
    return APIError(400, str(err), param=param, code=code)


@dataclass
class ChatRequest:
    """A checked /v1/chat/completions body (before any image is decoded)."""

    messages: list[dict[str, Any]]
    sampling: dict[str, Any]
    max_tokens: int | None
    stream: bool
    include_usage: bool


def parse_chat_request(body: Any, model_name: str, settings: APISettings) -> ChatRequest:
    """Check the body's fields and types; images are only counted here, decoded later."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{model_name}` "
                            "(GET /v1/models)", param="model", code="model_not_found")
    for name, allowed in UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            raise APIError(400, f"`{name}` is not supported by this server", param=name, code="unsupported_parameter")
    n = body.get("n")
    if n not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n", code="unsupported_parameter")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "`messages` must be a non-empty list of {role, content} objects", param="messages")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise APIError(400, f"`{param}` must be a positive integer, got {max_tokens!r:.40}", param=param)
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > 4:
        raise APIError(400, "`stop` may hold at most 4 strings", param="stop")
    stream, options = body.get("stream", False), body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise APIError(400, "`stream` must be true or false and `stream_options` an object", param="stream")
    sampling = {"temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0), "stop": stop,
                "seed": body.get("seed"), "ignore_eos": body.get("ignore_eos", False)}  # ignore_eos: vLLM's extension
    for name in ("temperature", "top_p"):
        if sampling[name] is None:
            sampling[name] = 1.0
    if isinstance(sampling["temperature"], (int, float)) and not 0 <= sampling["temperature"] <= 2:
        raise APIError(400, f"`temperature` must be between 0 and 2, got {sampling['temperature']}",
                       param="temperature")
    return ChatRequest(_checked_messages(messages, settings), sampling, max_tokens, stream,
                       bool(options.get("include_usage")))


def _checked_messages(messages: list[Any], settings: APISettings) -> list[dict[str, Any]]:
    """Roles, content types and the image count, with `param` pointing at the offending part."""
    out, n_images = [], 0
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or msg.get("role") not in ROLES:
            raise APIError(400, f"{where} must be an object with a role in {', '.join(ROLES)}", param=where)
        content = msg.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image_url":
                    n_images += 1
                elif kind != "text":
                    raise APIError(400, f"{where}.content[{j}] must be a `text` or `image_url` part, got "
                                        f"{kind!r:.40}", param=f"{where}.content[{j}]")
        elif content is not None and not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string or a list of parts", param=f"{where}.content")
        role = "system" if msg["role"] == "developer" else msg["role"]
        out.append({"role": role, "content": content})
    if n_images > settings.max_images:
        raise APIError(400, f"the request has {n_images} images; this server accepts at most {settings.max_images} "
                            "per request", param="messages")
    return out


def _resolved_images(messages: list[dict[str, Any]], media: MediaPolicy) -> list[dict[str, Any]]:
    """Every image_url part replaced by the decoded image, under the server's media policy."""
    out = []
    for i, msg in enumerate(messages):
        content = msg["content"]
        if isinstance(content, list):
            content = [_resolved_part(part, media, f"messages[{i}].content[{j}]") for j, part in enumerate(content)]
        out.append({"role": msg["role"], "content": content})
    return out


def _resolved_part(part: dict[str, Any], media: MediaPolicy, where: str) -> dict[str, Any]:
    if part["type"] != "image_url":
        return part
    source = part.get("image_url")
    url = source.get("url") if isinstance(source, dict) else source
    try:
        return {"type": "image", "image": media.load(url)}
    except LlavaError as err:
        raise from_llava_error(err, param=where) from err


def prepare(service: ModelService, chat: ChatRequest, settings: APISettings) -> tuple[Prepared, SamplingParams]:
    """Decode images, render and tokenize the conversation, and size the answer to the context left."""
    try:
        prepared = service.pipe.prepare_chat(_resolved_images(chat.messages, settings.media), encode=False)
        params = service.pipe.sampling(max_new_tokens=1, **chat.sampling)
        room = service.pipe.engine.check_context(prepared.request)
    except APIError:
        raise
    except LlavaError as err:
        raise from_llava_error(err, param=_param_of(err)) from err
    prompt_tokens = len(prepared.request.input_ids)
    if chat.max_tokens is not None and chat.max_tokens > room:
        context = prompt_tokens + room
        raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                            f"{prompt_tokens + chat.max_tokens} tokens ({prompt_tokens} in the messages, "
                            f"{chat.max_tokens} in the completion). Please reduce the length of the messages or "
                            "completion.", param="max_tokens", code="context_length_exceeded")
    params.max_new_tokens = chat.max_tokens or room
    return prepared, params


def _param_of(err: LlavaError) -> str:
    text = str(err)
    for name in ("temperature", "top_p", "seed", "stop", "ignore_eos"):
        if text.startswith(name):
            return name
    return "messages"


class ChatCompletions:
    """Builds OpenAI's response objects for one request."""

    def __init__(self, model: str, prompt_tokens: int) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model
        self.prompt_tokens = prompt_tokens

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def response(self, text: str, finish_reason: str, completion_tokens: int) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                             "logprobs": None, "finish_reason": finish_reason}],
                "usage": self.usage(completion_tokens)}

    def chunk(self, delta: dict[str, Any] | None, finish_reason: str | None = None,
              usage: dict[str, int] | None = None) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": finish_reason}]
        body: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def finish_reason(stream: Stream) -> str:
    """OpenAI's finish reasons: EOS and stop strings are both `stop`; the token budget is `length`."""
    reason = stream.completion.finish_reason if stream.completion else "stop"
    return "length" if reason == "length" else "stop"


async def sse_events(stream: Stream, out: ChatCompletions, include_usage: bool) -> AsyncIterator[str]:
    """The answer as server-sent events; a disconnect stops this generator, which cancels the row."""
    try:
        yield out.chunk({"role": "assistant", "content": ""})
        async for delta in stream:
            yield out.chunk({"content": delta})
        tokens = len(stream.completion.token_ids)
        yield out.chunk({}, finish_reason(stream))
        if include_usage:
            yield out.chunk(None, usage=out.usage(tokens))
    except LlavaError as err:
        error = from_llava_error(err)
        yield f"data: {json.dumps({'error': {'message': error.message, 'type': error.type, 'code': error.code}})}\n\n"
    finally:
        stream.cancel()  # a no-op when it finished; frees the batch row when the client went away
    yield "data: [DONE]\n\n"


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing oversize bodies (413) before reading them whole."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {int(declared):,} bytes is over this server's limit of {limit:,}",
                       code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body is over this server's limit of {limit:,} bytes",
                           code="request_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from err


def add_openai_routes(app: FastAPI, service: ModelService, settings: APISettings) -> None:
    """Mount the API's routes and its OpenAI-shaped error handlers on `app`."""

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            what = "Incorrect API key provided" if given else "Missing API key (send `Authorization: Bearer KEY`)"
            raise APIError(401, what, code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.name}

    @app.get("/status")
    async def status(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"model": service.name, **service.scheduler.stats()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": 0,
                                            "owned_by": "llava"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        chat = parse_chat_request(await read_json(request, settings.max_request_bytes), service.name, settings)
        prepared, params = await run_in_threadpool(prepare, service, chat, settings)
        try:
            stream = service.scheduler.submit(prepared.request, params, loop=asyncio.get_running_loop())
        except LlavaError as err:
            raise from_llava_error(err) from err
        out = ChatCompletions(service.name, stream.prompt_tokens)
        if chat.stream:
            return StreamingResponse(sse_events(stream, out, chat.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            text = "".join([delta async for delta in stream])
        except LlavaError as err:
            raise from_llava_error(err) from err
        finally:
            stream.cancel()
        return out.response(text, finish_reason(stream), len(stream.completion.token_ids))

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(InputTypeError)
    @app.exception_handler(LlavaError)
    async def llava_error(request: Request, err: LlavaError) -> JSONResponse:
        return from_llava_error(err).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        return APIError(err.status_code, str(err.detail), kind).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("internal error answering %s", request.url.path)
        return APIError(500, "internal server error (a bug; see the server log)", "server_error").response()
