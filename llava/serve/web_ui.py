"""The web UI (Gradio), as the original LLaVA's gradio_web_server, over any `Backend`.

`build_ui(backend)` returns the Blocks and launches nothing: `llava serve` mounts it on its
FastAPI app over a `LocalBackend` (this process's model and continuous-batching scheduler);
`python -m llava.serve.gradio_web_server` serves it over a `ControllerBackend` (the original
controller + model workers protocol). The page: model choice, image upload with the image mode
(Crop / Resize / Pad / Default), streamed chat, sampling sliders, Send / Regenerate / Clear and
Upvote / Downvote / Flag, with chats and votes logged as the original does (see web_state.py).
A bad image or a backend error is shown in the chat as one message; the page keeps working.

Clients (gradio_client) call `/add_text` (text, image, image mode) and then `/generate`
(model, temperature, top_p, max output tokens); the conversation stays in the session.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import gradio as gr
import PIL.Image

from llava.console import one_line
from llava.errors import InputError, LlavaError
from llava.processing.image_io import load_image
from llava.processing.templates import Template
from llava.serve.web_state import (
    IMAGE_MODES,
    MAX_TEXT,
    MAX_TEXT_WITH_IMAGE,
    ChatLog,
    Conversation,
    process_image,
)

log = logging.getLogger("llava.web_ui")

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
DEFAULT_EXAMPLES = (("shape.png", "What shape is in the image?"), ("color.png", "What color is the object?"))
MAX_NEW_TOKENS_CAP = 1536  # the original web server's cap on what it asks for
MIN_TOP_P = 1e-4  # top_p 0 on the slider means "the best token only", which this is
NO_MODEL = "No model is available: start a model worker (or check the controller), then reload the page."


class Backend(Protocol):
    """What the UI needs from whatever runs the model."""

    def model_names(self) -> list[str]:
        """Models to offer, first = default."""

    def template(self, model_name: str) -> Template:
        """The conversation template the model was trained with (renders the prompt)."""

    def stream(self, model_name: str, prompt: str, images: list[PIL.Image.Image], temperature: float,
               top_p: float, max_new_tokens: int, stop: str | None) -> Iterator[str]:
        """The generated text so far (cumulative, without the prompt), growing until done.
        Raises LlavaError for anything the user should read."""


class LocalBackend:
    """The model in this process, served by the continuous-batching scheduler (`llava serve`)."""

    def __init__(self, pipe: Any, scheduler: Any, name: str) -> None:
        self.pipe, self.scheduler, self.name = pipe, scheduler, name

    def model_names(self) -> list[str]:
        return [self.name]

    def template(self, model_name: str) -> Template:
        self._check(model_name)
        return self.pipe.template

    def stream(self, model_name: str, prompt: str, images: list[PIL.Image.Image], temperature: float,
               top_p: float, max_new_tokens: int, stop: str | None) -> Iterator[str]:
        from llava.generate.sampling import SamplingParams

        self._check(model_name)
        params = SamplingParams(temperature=temperature, top_p=min(max(top_p, MIN_TOP_P), 1.0),
                                max_new_tokens=max_new_tokens, stop=[stop] if stop else ())
        prepared = self.pipe.prepare(prompt, images=images, raw=True, encode=False)  # encoded at prefill
        stream = self.scheduler.submit(prepared.request, params)
        text = ""
        try:
            for delta in stream:
                text += delta
                yield text
        finally:
            stream.cancel()  # a closed tab or an abandoned generator frees the batch row

    def _check(self, model_name: str) -> None:
        if model_name != self.name:
            raise LlavaError(f"unknown model {model_name!r}; this server has {self.name!r}")


def default_examples() -> list[tuple[str, str]]:
    """(image path, question) pairs from the repository's examples/ folder, where it exists."""
    return [(str(EXAMPLES_DIR / name), q) for name, q in DEFAULT_EXAMPLES if (EXAMPLES_DIR / name).is_file()]


def _upload_path(payload: Any) -> str | None:
    """The uploaded file's path from the Image component's raw payload (see `_wire`: add_text runs
    with preprocess=False, so a file PIL cannot read reaches our loader and becomes a message in
    the chat, not a Gradio error toast). Gradio has already moved it into its cache and checked it."""
    if payload is None:
        return None
    if isinstance(payload, str):
        return payload
    return payload.get("path") if isinstance(payload, dict) else None  # never its url: no fetching for users


def _buttons(interactive: bool) -> tuple[Any, ...]:
    """Upvote, Downvote, Flag, Regenerate, Clear."""
    return tuple(gr.update(interactive=interactive) for _ in range(5))


def _error_text(err: BaseException) -> str:
    if isinstance(err, LlavaError):
        return f"**Error:** {one_line(err)}"
    return f"**Error:** the server failed ({type(err).__name__}: {one_line(err)}); see its log, then Regenerate."


def _ip(request: gr.Request | None) -> str | None:
    client = getattr(request, "client", None)
    return getattr(client, "host", None)


class ChatHandlers:
    """The event handlers of one UI: each takes the tab's Conversation and returns component values."""

    def __init__(self, backend: Backend, chat_log: ChatLog) -> None:
        self.backend, self.log = backend, chat_log

    def add_text(self, state: Conversation, text: str | None, upload: Any, image_mode: str) -> tuple:
        """A new message (a new image starts a new conversation, one image per conversation)."""
        text = text if isinstance(text, str) else ""
        image = _upload_path(upload)
        if not text.strip() and image is None:
            state.skip_next = True
            return (state, state.chat_messages(), "", None) + _buttons(bool(state.turns))
        if image is not None:
            state = Conversation(image_mode=image_mode)
            state.shown_image = image
            text = text[:MAX_TEXT_WITH_IMAGE]
            try:
                state.image = process_image(load_image(image), image_mode)
            except (LlavaError, OSError, ValueError) as err:
                state.shown_image, state.skip_next = None, True
                state.add_user(text)
                state.set_answer(_error_text(err).replace(image, Path(image).name), error=True)
                return (state, state.chat_messages(), "", None) + _buttons(True)
        state.add_user(text[:MAX_TEXT])
        state.skip_next = False
        return (state, state.chat_messages(), "", None) + _buttons(False)

    def regenerate(self, state: Conversation, image_mode: str) -> tuple:
        """Answer the last message again (with the image mode now chosen)."""
        if not state.turns:
            state.skip_next = True
            return (state, [], "", None) + _buttons(False)
        if state.image is not None and image_mode != state.image_mode and state.shown_image is not None:
            try:
                state.image, state.image_mode = process_image(load_image(state.shown_image), image_mode), image_mode
            except (LlavaError, OSError, ValueError):
                pass  # the upload is gone from Gradio's cache: keep the image already prepared
        state.set_answer(None)
        state.skip_next = False
        return (state, state.chat_messages(), "", None) + _buttons(False)

    def clear(self) -> tuple:
        return (Conversation(), [], "", None) + _buttons(False)

    def generate(self, state: Conversation, model: str | None, temperature: float, top_p: float,
                 max_new_tokens: float, request: gr.Request) -> Iterator[tuple]:
        """Stream the answer to the last message into the chat, then log the chat."""
        if state.skip_next or not state.turns or state.turns[-1][1] is not None:  # nothing new to answer
            state.skip_next = False
            yield (state, state.chat_messages()) + _buttons(bool(state.turns))
            return
        start = time.time()
        yield (state, state.chat_messages(cursor=True)) + _buttons(False)
        try:
            if not model:
                raise LlavaError(NO_MODEL)
            state.template = self.backend.template(model)
            prompt = state.prompt(state.template)
            images = [state.image] if state.image is not None else []
            tokens = min(int(max_new_tokens), MAX_NEW_TOKENS_CAP)
            stream = self.backend.stream(model, prompt, images, float(temperature), float(top_p), tokens,
                                         state.template.stop_str)
            texts = iter(stream)
            try:
                for text in texts:
                    state.set_answer(text.strip())
                    yield (state, state.chat_messages(cursor=True)) + _buttons(False)
            finally:  # also when Gradio drops this generator (a closed tab): closing cancels the generation
                getattr(texts, "close", lambda: None)()
            state.set_answer((state.turns[-1][1] or "").strip())
        except Exception as err:
            if not isinstance(err, LlavaError):
                log.exception("generation failed")
            partial = state.turns[-1][1]
            state.set_answer((f"{partial}\n\n" if partial else "") + _error_text(err), error=True)
        self._log_chat(state, model, start, request)
        yield (state, state.chat_messages()) + _buttons(True)

    def _log_chat(self, state: Conversation, model: str | None, start: float, request: gr.Request | None) -> None:
        try:
            images = [self.log.save_image(state.image)] if state.image is not None else []
            self.log.write({"type": "chat", "model": model, "start": round(start, 4),
                            "finish": round(time.time(), 4), "state": state.record(), "images": images,
                            "ip": _ip(request)})
        except OSError as err:  # a full disk must not take the chat down with it
            log.error("could not write the chat log: %s", err)

    def vote(self, kind: str) -> Callable[..., tuple]:
        """Handler for Upvote / Downvote / Flag: one log line, then the three vote buttons go grey."""
        def handler(state: Conversation, model: str | None, request: gr.Request) -> tuple:
            try:
                images = [self.log.save_image(state.image)] if state.image is not None else []
                self.log.write({"type": kind, "model": model, "state": state.record(), "images": images,
                                "ip": _ip(request)})
            except OSError as err:
                log.error("could not write the vote log: %s", err)
            return ("",) + tuple(gr.update(interactive=False) for _ in range(3))
        handler.__name__ = f"{kind}_last_response"
        return handler

    def load_models(self) -> Any:
        """Reload mode: ask the backend again for its models when a page loads."""
        try:
            names = self.backend.model_names()
        except LlavaError as err:
            log.warning("could not list models: %s", err)
            names = []
        return gr.update(choices=names, value=names[0] if names else None)


def _model_list(backend: Backend) -> list[str]:
    try:
        return backend.model_names()
    except LlavaError as err:
        log.warning("could not list models: %s", err)
        return []


def build_ui(backend: Backend, log_dir: str | os.PathLike = "serve_logs", examples: Sequence[tuple[str, str]] | None = None,
             model_list_mode: str = "once", concurrency_count: int = 16, title: str = "LLaVA") -> gr.Blocks:
    """The chat page over `backend`. `examples`: (image path, question) pairs (default: examples/).
    `model_list_mode`: "once" lists the models now, "reload" again on every page load."""
    if model_list_mode not in ("once", "reload"):
        raise InputError(f"model_list_mode must be 'once' or 'reload', not {model_list_mode!r}")
    handlers = ChatHandlers(backend, ChatLog(log_dir))
    models = _model_list(backend)
    examples = default_examples() if examples is None else list(examples)
    with gr.Blocks(title=title) as demo:
        state = gr.State(Conversation())
        gr.Markdown(f"# {title}: Large Language and Vision Assistant")
        with gr.Row():
            with gr.Column(scale=3):
                model = gr.Dropdown(models, value=models[0] if models else None, label="Model", interactive=True,
                                    allow_custom_value=True)  # reload mode: models may come later
                image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"])
                image_mode = gr.Radio(list(IMAGE_MODES), value="Default", label="Preprocess for non-square image")
                with gr.Accordion("Parameters", open=False):
                    temperature = gr.Slider(0.0, 1.0, value=0.2, step=0.1, label="Temperature")
                    top_p = gr.Slider(0.0, 1.0, value=0.7, step=0.1, label="Top P")
                    max_tokens = gr.Slider(16, 1024, value=512, step=16, label="Max output tokens")
            with gr.Column(scale=8):
                chatbot = gr.Chatbot(label="LLaVA Chatbot", elem_id="chatbot", height=550, feedback_options=None)
                with gr.Row():
                    text = gr.Textbox(label="Question", show_label=False, placeholder="Enter text and press ENTER", scale=8,
                                      container=False, elem_id="message")
                    send = gr.Button("Send", variant="primary", scale=1)
                with gr.Row():
                    buttons = [gr.Button(name, interactive=False)
                               for name in ("Upvote", "Downvote", "Flag", "Regenerate", "Clear")]
        if examples:
            gr.Examples([[path, question] for path, question in examples], inputs=[image, text])
        _wire(demo, handlers, state, model, image, image_mode, (temperature, top_p, max_tokens), chatbot, text,
              send, buttons, model_list_mode)
    demo.queue(default_concurrency_limit=concurrency_count)
    return demo


def _wire(demo: gr.Blocks, h: ChatHandlers, state: gr.State, model: gr.Dropdown, image: gr.Image,
          image_mode: gr.Radio, sliders: tuple, chatbot: gr.Chatbot, text: gr.Textbox, send: gr.Button,
          buttons: list[gr.Button], model_list_mode: str) -> None:
    """Connect the events; public API names: add_text, generate, regenerate, clear, upvote, downvote, flag."""
    upvote, downvote, flag, regenerate, clear = buttons
    gen_in = [state, model, *sliders]
    gen_out = [state, chatbot, *buttons]
    edit_out = [state, chatbot, text, image, *buttons]
    add_in = [state, text, image, image_mode]  # raw values: add_text loads the upload itself (_upload_path)
    send.click(h.add_text, add_in, edit_out, api_name="add_text", preprocess=False).then(
        h.generate, gen_in, gen_out, api_name="generate")
    text.submit(h.add_text, add_in, edit_out, api_visibility="undocumented", preprocess=False).then(
        h.generate, gen_in, gen_out, api_visibility="undocumented")
    regenerate.click(h.regenerate, [state, image_mode], edit_out, api_name="regenerate").then(
        h.generate, gen_in, gen_out, api_visibility="undocumented")
    clear.click(h.clear, None, edit_out, api_name="clear")
    chatbot.clear(h.clear, None, edit_out, api_visibility="undocumented")  # the chat's own bin icon
    for button, kind in ((upvote, "upvote"), (downvote, "downvote"), (flag, "flag")):
        button.click(h.vote(kind), [state, model], [text, upvote, downvote, flag], api_name=kind)
    if model_list_mode == "reload":
        demo.load(h.load_models, None, model, api_name="load_models")
