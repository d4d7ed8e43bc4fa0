"""`llava serve`'s OpenAI-compatible API in its own process, driven by the real `openai` client and httpx.

Answers at temperature 0 must equal `llava run`'s (the pipeline in this process, same model);
every bad request gets a 4xx in OpenAI's error shape and the server keeps serving.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import os
import time
from pathlib import Path

import httpx
import openai
import PIL.Image
import pytest
from serve_helpers import ROOT, free_port, server

import llava

KEY = "test-key-123"
IMAGE = ROOT / "examples" / "shape.png"
QUESTION = "What shape is in the image?"


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """The allowed local-media folder: one image inside, and links that try to escape it."""
    root = tmp_path_factory.mktemp("media")
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "shape.png").write_bytes(IMAGE.read_bytes())
    (root / "secret.png").write_bytes(IMAGE.read_bytes())
    os.symlink(root / "secret.png", allowed / "link.png")
    return allowed


@pytest.fixture(scope="module")
def base_url(media) -> str:
    port = free_port()
    args = ["-m", "llava.serve.app", "--port", str(port), "--no-ui", "--max-batch", "2", "--max-waiting", "1",
            "--max-image-bytes", "200000", "--max-image-pixels", "1000000", "--allowed-local-media", str(media)]
    with server(args, f"http://127.0.0.1:{port}/health", env={"LLAVA_API_KEY": KEY}):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def pipe():
    return llava.load(device="cpu")


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def user(text: str, *urls: str) -> dict:
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                        {"type": "text", "text": text}]}


def ask(client, messages, **kw):
    return client.chat.completions.create(model="tiny-llava", messages=messages, temperature=0, **kw)


def test_models_health_and_an_image_answer_equal_llava_run(client, base_url, pipe):
    assert [m.id for m in client.models.list().data] == ["tiny-llava"]
    assert httpx.get(base_url + "/health").json()["status"] == "ok"
    reply = ask(client, [user(QUESTION, data_url(IMAGE.read_bytes()))])
    assert reply.choices[0].message.content.strip() == pipe.generate(QUESTION, images=[IMAGE], temperature=0)
    assert reply.choices[0].finish_reason == "stop" and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_gives_the_same_answer_in_openai_chunks(client):
    messages = [user("Describe the image in detail.", data_url(IMAGE.read_bytes()))]
    whole = ask(client, messages).choices[0].message.content
    chunks = list(ask(client, messages, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1


def test_text_only_multi_turn_and_system(client, pipe):
    messages = [{"role": "system", "content": "You are terse."}, user(QUESTION, data_url(IMAGE.read_bytes())),
                {"role": "assistant", "content": "A star."}, {"role": "user", "content": "What color is it?"}]
    reply = ask(client, messages).choices[0].message.content
    local = [{"role": "system", "content": "You are terse."},
             {"role": "user", "content": QUESTION, "images": [str(IMAGE)]},
             {"role": "assistant", "content": "A star."}, {"role": "user", "content": "What color is it?"}]
    assert reply.strip() == pipe.chat(local, temperature=0)
    plain = ask(client, [{"role": "user", "content": "Hello"}]).choices[0].message.content
    assert plain.strip() == pipe.chat([{"role": "user", "content": "Hello"}], temperature=0)


def test_stop_and_max_tokens(client, pipe):
    messages = [user("Describe the image in detail.", data_url(IMAGE.read_bytes()))]
    full = ask(client, messages).choices[0].message.content
    stop = full.split()[2]
    cut = ask(client, messages, stop=[stop]).choices[0]
    assert cut.message.content == full[:full.index(stop)] and cut.finish_reason == "stop"
    short = ask(client, messages, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    assert ask(client, messages, max_completion_tokens=3).usage.completion_tokens == 3


def test_file_urls_only_inside_the_allowed_folder(client, media, pipe):
    inside = ask(client, [user(QUESTION, (media / "shape.png").as_uri())]).choices[0].message.content
    assert inside.strip() == pipe.generate(QUESTION, images=[IMAGE], temperature=0)
    for url in [(media / ".." / "secret.png").as_uri().replace("/allowed/../", "/allowed/%2E%2E/"),
                "file://" + str(media) + "/../secret.png", (media / "link.png").as_uri(), "file:///etc/passwd"]:
        with pytest.raises(openai.BadRequestError, match="outside the allowed media folder|no such image"):
            ask(client, [user(QUESTION, url)])


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    PIL.Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


BAD_REQUESTS = [  # (description, body or raw bytes, status, words in the message)
    ("malformed JSON", b'{"model": "tiny-llava", "messages": [', 400, "not valid JSON"),
    ("no messages", {"model": "tiny-llava"}, 400, "messages"),
    ("empty messages", {"model": "tiny-llava", "messages": []}, 400, "messages"),
    ("wrong role order", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "expected role 'user'"),
    ("two users in a row", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     400, "expected role 'assistant'"),
    ("unknown part type", {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "image_url"),
    ("not an image", {"messages": [user("hi", data_url(b"hello, I am text"))]}, 400, "not a readable image"),
    ("truncated PNG", {"messages": [user("hi", data_url(IMAGE.read_bytes()[:300]))]}, 400, "not a readable image"),
    ("over the byte limit", {"messages": [user("hi", data_url(os.urandom(300_000)))]}, 400, "limit"),
    ("over the pixel limit", {"messages": [user("hi", data_url(_png((1200, 1000))))]}, 400, "pixels"),
    ("too many images", {"messages": [user("hi", *[data_url(IMAGE.read_bytes())] * 5)]}, 400, "at most 4"),
    ("remote URL", {"messages": [user("hi", "https://example.com/cat.png")]}, 400, "--allow-remote-images"),
    ("max_tokens beyond the context", {"messages": [user("hi")], "max_tokens": 100_000}, 400,
     "maximum context length"),
    ("bad temperature", {"messages": [user("hi")], "temperature": "hot"}, 400, "temperature"),
    ("n > 1", {"messages": [user("hi")], "n": 2}, 400, "n=1"),
    ("unknown model", {"model": "gpt-9", "messages": [user("hi")]}, 404, "does not exist"),
]


@pytest.mark.parametrize("what,body,status,words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(base_url, client, what, body, status, words):
    headers = {"Authorization": f"Bearer {KEY}"}
    url = base_url + "/v1/chat/completions"
    r = (httpx.post(url, content=body, headers=headers, timeout=60) if isinstance(body, bytes)
         else httpx.post(url, json=body, headers=headers, timeout=60))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and words in error["message"], error
    assert still_serving(client)


def still_serving(client) -> bool:
    reply = ask(client, [user("Hello")], max_tokens=2, extra_body={"ignore_eos": True})
    return reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 2


def test_api_key_is_required(base_url):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(base_url + "/v1/chat/completions", json={"messages": [user("hi")]}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url + "/v1", api_key="nope", max_retries=0).models.list()


def _status(base_url) -> dict:
    return httpx.get(base_url + "/status", headers={"Authorization": f"Bearer {KEY}"}).json()


def test_a_disconnecting_client_frees_its_row(base_url):
    before = _status(base_url)["cancelled"]
    body = {"messages": [user("Describe the image in detail.", data_url(IMAGE.read_bytes()))], "stream": True,
            "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 10
    while (status := _status(base_url))["active"] or status["cancelled"] == before:
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    assert status["cancelled"] == before + 1 and status["active"] == 0


def test_over_capacity_is_429_and_every_other_request_completes(base_url, client):
    """max_batch 2 + max_waiting 1: of 6 simultaneous long requests, 3 are served and the rest get 429."""
    def one(_):
        try:
            reply = ask(client, [user("Hello")], max_tokens=120, extra_body={"ignore_eos": True})
            return reply.usage.completion_tokens
        except openai.RateLimitError as err:
            return err.body["message"] if isinstance(err.body, dict) else str(err)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    served = [r for r in results if r == 120]
    refused = [r for r in results if isinstance(r, str)]
    assert len(served) + len(refused) == 6 and len(served) >= 3 and refused, results
    assert all("capacity" in r for r in refused)
    assert still_serving(client)


def test_one_command_serves_the_api_and_the_web_ui(tmp_path, pipe):
    """`llava serve` (the console script's code path): both URLs printed, and the API and the UI
    (driven by gradio_client) answer from the same process and scheduler with llava run's answer."""
    from gradio_client import Client, handle_file
    from serve_helpers import output

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["-m", "llava.cli", "serve", "--port", str(port), "--log-dir", str(tmp_path / "logs")]
    with server(args, base + "/health", env={"GRADIO_ANALYTICS_ENABLED": "False"}) as proc:
        printed = output(proc)
        assert f"{base}/v1" in printed and f"{base}/ui/" in printed
        reference = pipe.generate(QUESTION, images=[IMAGE], temperature=0, max_new_tokens=48)
        api = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        assert ask(api, [user(QUESTION, data_url(IMAGE.read_bytes()))], max_tokens=48).choices[0].message.content.strip() \
            == reference
        ui = Client(base + "/ui/", verbose=False, download_files=False, analytics_enabled=False)
        try:
            ui.predict(QUESTION, handle_file(str(IMAGE)), "Default", api_name="/add_text")
            chat = ui.predict("tiny-llava", 0, 0.7, 48, api_name="/generate")
        finally:
            ui.close()
        answer = [m for m in chat if m["role"] == "assistant"][-1]["content"]
        assert "".join(p.get("text", "") for p in answer if p.get("type") == "text") == reference
        assert httpx.get(base + "/status").json()["finished"] >= 2
