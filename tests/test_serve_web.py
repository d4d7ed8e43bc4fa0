"""The web UI over the original's serving stack: controller + model worker + gradio_web_server.

Three real processes on loopback, driven two ways: gradio_client (the API a script uses) and a
real headless Chromium (Playwright over Debian's `chromium`, no browser download). The answer at
temperature 0 must be `llava run`'s for the same image and question, votes and chats must land
in the log folder as the original writes them, and a bad image must end as a message in the chat.
The image modes, the in-process LocalBackend (what `llava serve` mounts) and the command line's
refusals are checked in this process. About 40 s on 2 cores.
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import PIL.Image
import pytest
from serve_helpers import ROOT, free_port, output, start, stop, wait_until_up

import llava
from llava.errors import InputError, LlavaError
from llava.serve import gradio_web_server
from llava.serve.web_state import PAD_COLOR, Conversation, process_image
from llava.serve.web_ui import LocalBackend

IMAGE = ROOT / "examples" / "shape.png"
QUESTION = "What shape is in the image?"
MAX_NEW_TOKENS = 48
MODEL = "tiny-llava"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """controller, one model worker (the bundled model) and the web server, started side by side."""
    log_dir = tmp_path_factory.mktemp("web-logs")
    ports = [free_port() for _ in range(3)]
    controller_url, worker_url, web_url = (f"http://127.0.0.1:{p}" for p in ports)
    env = {"GRADIO_ANALYTICS_ENABLED": "False"}
    procs = [
        start(["-m", "llava.serve.controller", "--port", str(ports[0])]),
        start(["-m", "llava.serve.model_worker", "--port", str(ports[1]), "--controller-address", controller_url]),
        # reload mode: the page asks for the models when it loads, so the worker may register later
        start(["-m", "llava.serve.gradio_web_server", "--controller-url", controller_url, "--port", str(ports[2]),
               "--model-list-mode", "reload", "--log-dir", str(log_dir)], env),
    ]
    try:
        for proc, url in zip(procs, (controller_url, worker_url, web_url)):
            wait_until_up(url + "/", proc)
        _wait_for_model(controller_url, procs[1])
        yield {"url": web_url + "/", "log_dir": log_dir, "procs": procs}
    finally:
        for proc in reversed(procs):
            stop(proc)


def _wait_for_model(controller_url: str, worker, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        httpx.post(controller_url + "/refresh_all_workers", timeout=10)
        if MODEL in httpx.post(controller_url + "/list_models", timeout=10).json()["models"]:
            return
        time.sleep(0.3)
    raise TimeoutError(f"the worker never registered {MODEL}:\n{output(worker)[-3000:]}")


@pytest.fixture(scope="module")
def pipe():
    return llava.load()


@pytest.fixture(scope="module")
def reference(pipe) -> str:
    """`llava run`'s answer: the same image and question, greedy."""
    return pipe.generate(QUESTION, images=[str(IMAGE)], temperature=0, max_new_tokens=MAX_NEW_TOKENS)


@contextmanager
def _client(stack) -> Iterator:
    """A gradio_client session (its conversation lives on the server); closed so the server stops at once."""
    from gradio_client import Client

    client = Client(stack["url"], verbose=False, download_files=False, analytics_enabled=False)
    try:
        yield client
    finally:
        client.close()


def _last_answer(chat: list[dict]) -> str:
    """The text of the last assistant message (Gradio 6: content is a list of typed parts)."""
    message = [m for m in chat if m["role"] == "assistant"][-1]
    return "".join(part.get("text", "") for part in message["content"] if part.get("type") == "text")


def _log_lines(log_dir: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(log_dir.glob("*-conv.json")) for line in f.read_text().splitlines()]


@pytest.fixture(scope="module")
def client_chat(stack):
    """One chat through gradio_client: /add_text with the image, then /generate at temperature 0."""
    from gradio_client import handle_file

    with _client(stack) as client:
        client.predict(QUESTION, handle_file(str(IMAGE)), "Default", api_name="/add_text")
        yield client, client.predict(MODEL, 0, 0.7, MAX_NEW_TOKENS, api_name="/generate")


def test_client_answer_is_llava_runs(client_chat, reference):
    _, chat = client_chat
    assert reference and _last_answer(chat) == reference


def test_upvote_logs_the_chat_and_its_image(stack, client_chat, reference):
    client, _ = client_chat
    client.predict(MODEL, api_name="/upvote")
    lines = _log_lines(stack["log_dir"])
    chat = next(r for r in lines if r["type"] == "chat" and r["state"]["messages"][-1] == ["assistant", reference])
    vote = [r for r in lines if r["type"] == "upvote"][-1]
    assert vote["model"] == chat["model"] == MODEL and vote["state"]["messages"] == chat["state"]["messages"]
    assert chat["finish"] >= chat["start"] and chat["state"]["template"] == "vicuna_v1"
    digest = hashlib.md5(PIL.Image.open(IMAGE).convert("RGB").tobytes()).hexdigest()
    assert chat["images"] == vote["images"] == [digest]
    saved = list((stack["log_dir"] / "serve_images").glob(f"*/{digest}.jpg"))
    assert len(saved) == 1 and PIL.Image.open(saved[0]).size == PIL.Image.open(IMAGE).size


def test_bad_image_is_a_chat_message_and_the_ui_keeps_working(stack, tmp_path, reference):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a PNG")
    with _client(stack) as client:
        _check_bad_image_then_recovery(client, bad, reference)


def _check_bad_image_then_recovery(client, bad: Path, reference: str) -> None:
    """A broken upload is answered in the chat; the next message with a good image works; an unknown
    model is a message too."""
    from gradio_client import handle_file

    chat, *_ = client.predict("What is this?", handle_file(str(bad)), "Default", api_name="/add_text")
    answer = _last_answer(chat)
    assert answer.startswith("**Error:**") and "broken.png" in answer and "Traceback" not in answer
    chat = client.predict(MODEL, 0, 0.7, MAX_NEW_TOKENS, api_name="/generate")  # nothing to answer: a no-op
    assert _last_answer(chat) == answer
    client.predict(QUESTION, handle_file(str(IMAGE)), "Default", api_name="/add_text")
    chat = client.predict(MODEL, 0, 0.7, MAX_NEW_TOKENS, api_name="/generate")
    assert _last_answer(chat) == reference
    assert _last_answer(client.predict(MODEL, 0, 0.7, MAX_NEW_TOKENS, api_name="/generate")) == reference  # no-op
    client.predict("And now?", None, "Default", api_name="/add_text")
    chat = client.predict("no-such-model", 0, 0.7, MAX_NEW_TOKENS, api_name="/generate")
    assert _last_answer(chat).startswith("**Error:** no model worker serves 'no-such-model'")


def test_browser_chat(stack, tmp_path, reference):
    """Headless Chromium: upload, ask, Send, read the streamed answer, Upvote; a screenshot is kept."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("no chromium binary on PATH: the browser test needs it (apt-get install -y chromium)")
    from playwright.sync_api import expect, sync_playwright

    votes_before = sum(r["type"] == "upvote" for r in _log_lines(stack["log_dir"]))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(stack["url"])
            expect(page.get_by_label("Model")).to_have_value(MODEL, timeout=20_000)  # listed on page load
            page.get_by_text("Parameters").click()
            for name, value in (("Temperature", "0"), ("Max output tokens", str(MAX_NEW_TOKENS))):
                box = page.get_by_label(f"number input for {name}")
                box.fill(value)
                box.press("Enter")
            page.locator("input[type=file]").first.set_input_files(str(IMAGE))
            page.get_by_placeholder("Enter text and press ENTER").fill(QUESTION)
            page.get_by_role("button", name="Send", exact=True).click()
            upvote = page.get_by_role("button", name="Upvote")
            expect(upvote).to_be_enabled(timeout=60_000)  # enabled again once the stream has ended
            chat = page.locator("#chatbot")
            expect(chat).to_contain_text(QUESTION)
            expect(chat).to_contain_text(reference)
            assert "▌" not in chat.inner_text()
            shot = tmp_path / "web_ui.png"
            page.screenshot(path=str(shot), full_page=True)
            upvote.click()
            expect(upvote).to_be_disabled(timeout=10_000)
        finally:
            browser.close()
    assert shot.is_file() and shot.stat().st_size > 10_000
    assert sum(r["type"] == "upvote" for r in _log_lines(stack["log_dir"])) == votes_before + 1


def test_local_backend_streams_llava_runs_answer(pipe, reference):
    """What `llava serve` mounts: the UI's prompt through this process's scheduler."""
    from llava.generate.scheduler import Scheduler

    scheduler = Scheduler(pipe.engine, max_batch=2, max_waiting=2)
    try:
        backend = LocalBackend(pipe, scheduler, MODEL)
        conv = Conversation(image=PIL.Image.open(IMAGE).convert("RGB"))
        conv.add_user(QUESTION)
        template = backend.template(MODEL)
        texts = list(backend.stream(MODEL, conv.prompt(template), [conv.image], 0.0, 0.0, MAX_NEW_TOKENS,
                                    template.stop_str))
        assert texts and all(b.startswith(a) for a, b in itertools.pairwise(texts))  # cumulative
        assert texts[-1].strip() == reference
        with pytest.raises(InputError):  # the same bad-input errors as the API
            list(backend.stream(MODEL, "USER: <image> hi ASSISTANT:", [], 0.0, 1.0, 4, None))
        partial = backend.stream(MODEL, conv.prompt(template), [conv.image], 0.0, 1.0, MAX_NEW_TOKENS, None)
        next(partial)
        partial.close()  # a closed tab: the row is cancelled and leaves the batch
        deadline = time.monotonic() + 10
        while scheduler.queue_length and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scheduler.queue_length == 0
    finally:
        scheduler.close()


def test_image_modes():
    wide = PIL.Image.new("RGB", (30, 10), (255, 0, 0))
    padded = process_image(wide, "Pad")
    assert padded.size == (30, 30) and padded.getpixel((0, 0)) == PAD_COLOR and padded.getpixel((15, 15)) == (255, 0, 0)
    assert process_image(wide, "Resize").size == (336, 336)
    assert process_image(wide, "Default") is wide and process_image(wide, "Crop") is wide
    assert process_image(PIL.Image.new("RGB", (3000, 1000)), "Default").size == (1344, 448)
    assert process_image(PIL.Image.new("RGB", (1000, 3000)), "Crop").size == (448, 1344)
    assert process_image(PIL.Image.new("RGB", (2000, 1600)), "Pad").size == (672, 672)
    with pytest.raises(InputError, match="unknown image mode"):
        process_image(wide, "Stretch")


def test_prompt_puts_the_image_first_and_leaves_errors_out():
    from llava.processing.templates import get_template

    conv = Conversation(image=PIL.Image.new("RGB", (4, 4)))
    conv.add_user("broken upload")
    conv.set_answer("**Error:** no", error=True)
    conv.add_user("What is it? <image>")
    assert conv.prompt(get_template("vicuna_v1")) == get_template("vicuna_v1").render(["<image>\nWhat is it?", None])


def test_command_line_refusals(capsys):
    assert gradio_web_server.main(["--share"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--share" in err and "internet" in err
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert gradio_web_server.main(["--controller-url", dead, "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is the controller running" in err


def test_controller_backend_speaks_the_original_protocol():
    """Against a stand-in controller and worker (httpx.MockTransport): the model list, the worker's
    template, the NUL-delimited cumulative chunks cut anywhere, and error codes as messages."""
    from llava.processing.templates import get_template

    seen: list[dict] = []

    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content or b"{}")
        seen.append({"path": request.url.path, **body})
        if request.url.path == "/list_models":
            return httpx.Response(200, json={"models": ["zeta", MODEL]})
        if request.url.path == "/get_worker_address":
            return httpx.Response(200, json={"address": "http://worker:1" if body["model"] == MODEL else ""})
        if request.url.path == "/worker_get_status":
            return httpx.Response(200, json={"model_names": [MODEL], "speed": 1, "queue_length": 0,
                                             "template": "vicuna_v1"})
        if request.url.path == "/worker_generate_stream":
            if body["temperature"] > 0.5:
                return httpx.Response(200, content=json.dumps({"text": "busy", "error_code": 1}).encode() + b"\0")
            chunks = b"".join(json.dumps({"text": body["prompt"] + t, "error_code": 0}).encode() + b"\0"
                              for t in (" A", " A cat", " A cat."))
            return httpx.Response(200, content=iter([chunks[:7], chunks[7:40], chunks[40:]]))
        return httpx.Response(200, json=None)

    backend = gradio_web_server.ControllerBackend(
        "http://controller:2", http=httpx.Client(transport=httpx.MockTransport(handle)))
    assert backend.model_names() == [MODEL, "zeta"]
    assert [s["path"] for s in seen[:2]] == ["/refresh_all_workers", "/list_models"]
    assert backend.template(MODEL) == get_template("vicuna_v1")  # as the worker says
    assert backend.template("zeta") == get_template("vicuna_v1")  # no worker: the original's name rules
    assert gradio_web_server.web_template_name("llava-v1.5-7b") == "llava_v1"
    image = PIL.Image.new("RGB", (8, 8), (1, 2, 3))
    assert list(backend.stream(MODEL, "PROMPT", [image], 0.0, 1.0, 16, "</s>")) == [" A", " A cat", " A cat."]
    sent = seen[-1]
    assert sent["path"] == "/worker_generate_stream" and sent["stop"] == "</s>" and sent["max_new_tokens"] == 16
    assert PIL.Image.open(io.BytesIO(base64.b64decode(sent["images"][0]))).getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(LlavaError, match=r"busy \(error_code: 1\)"):
        list(backend.stream(MODEL, "PROMPT", [], 0.9, 1.0, 16, None))
    with pytest.raises(LlavaError, match="no model worker serves 'zeta'"):
        list(backend.stream("zeta", "PROMPT", [], 0.0, 1.0, 16, None))
