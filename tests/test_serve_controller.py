"""The original's serving stack as real processes on loopback: a controller and two model workers.

Checks the protocol the web UI relies on (NUL-delimited cumulative chunks, error codes),
dispatch, that answers through the stack equal `llava run`'s at temperature 0 (also when
requests share a batch), that bad input costs one error chunk and not the worker, that
workers re-register with a restarted controller, and that a killed worker is dropped after
the heart-beat expiry while the other keeps serving. The processes start once per module.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
from serve_helpers import ROOT, free_port, output, start, stop, wait_until_up

from llava.serve import protocol
from llava.serve.controller import Controller, WorkerInfo
from llava.serve.model_worker import ModelWorker

pytestmark = pytest.mark.slow

MODEL = "tiny-llava"
QUESTION = "Describe the image in detail."
MAX_NEW_TOKENS = 40
EXPIRATION_S = 3.0
IMAGES = {"shape": ROOT / "examples" / "shape.png", "color": ROOT / "examples" / "color.png"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post(url: str, payload: dict | None = None, timeout: float = 10.0):
    r = httpx.post(url, json=payload, timeout=timeout)
    r.raise_for_status()
    return r.json()


def generate(url: str, prompt: str, images: list[str], **extra) -> list[dict]:
    """All chunks of one `/worker_generate_stream` response (worker or controller)."""
    payload = {"model": MODEL, "prompt": prompt, "images": images, "temperature": 0,
               "max_new_tokens": MAX_NEW_TOKENS, **extra}
    with httpx.stream("POST", url + "/worker_generate_stream", json=payload, timeout=120.0) as r:
        assert r.status_code == 200
        return protocol.decode_chunks(r.read())


def wait_for(condition, timeout: float, what: str) -> float:
    """Poll `condition` until true; returns the seconds it took."""
    start_time = time.monotonic()
    while time.monotonic() - start_time < timeout:
        if condition():
            return time.monotonic() - start_time
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout:.0f} s")


def start_controller(port: int, method: str = "shortest_queue"):
    proc = start(["-m", "llava.serve.controller", "--port", str(port), "--dispatch-method", method,
                  "--heart-beat-expiration", str(EXPIRATION_S)])
    wait_until_up(f"http://127.0.0.1:{port}/list_models", proc, timeout=60)
    return proc


@pytest.fixture(scope="module")
def procs():
    """A controller (shortest_queue, 3 s expiry) and two workers beating every 0.5 s, started, not yet up."""
    ports = [free_port() for _ in range(3)]
    controller = f"http://127.0.0.1:{ports[0]}"
    state = {"controller": controller, "port": ports[0], "workers": [], "procs": {}}
    state["procs"]["controller"] = start(["-m", "llava.serve.controller", "--port", str(ports[0]),
                                          "--heart-beat-expiration", str(EXPIRATION_S)])
    try:
        for port in ports[1:]:
            address = f"http://127.0.0.1:{port}"
            state["procs"][address] = start(["-m", "llava.serve.model_worker", "--port", str(port), "--device", "cpu",
                                             "--controller-address", controller, "--limit-model-concurrency", "4"],
                                            env={protocol.HEART_BEAT_INTERVAL_ENV: "0.5"})
            state["workers"].append(address)
        yield state
    finally:
        for proc in state["procs"].values():
            stop(proc)


@pytest.fixture(scope="module")
def reference(procs):
    """`llava run`'s greedy answer per image, and the rendered prompt the web UI would send
    (computed while the servers load: `procs` first)."""
    import llava

    pipe = llava.load(device="cpu")
    prompt = pipe.template.render(["<image>\n" + QUESTION, None])
    assert pipe.prepare(QUESTION, images=[str(IMAGES["shape"])]).prompt == prompt
    answers = {name: pipe.generate(QUESTION, images=[str(path)], temperature=0, max_new_tokens=MAX_NEW_TOKENS)
               for name, path in IMAGES.items()}
    images = {name: b64(path.read_bytes()) for name, path in IMAGES.items()}
    return {"prompt": prompt, "answers": answers, "images": images}


@pytest.fixture(scope="module")
def stack(procs, reference):
    """The stack once everything answers and both workers are registered."""
    controller = procs["controller"]
    wait_until_up(controller + "/list_models", procs["procs"]["controller"], timeout=60)
    for address in procs["workers"]:
        wait_until_up(address + "/worker_get_status", procs["procs"][address], timeout=120)
    wait_for(lambda: post(controller + "/worker_get_status")["speed"] == 2, 20, "both workers registering")
    return procs


def check_answer(chunks: list[dict], prompt: str, expected: str) -> None:
    """Every chunk ok and cumulative (prompt + text so far); the last one, minus the prompt, is the answer."""
    assert chunks and all(c["error_code"] == 0 for c in chunks), chunks[-1:]
    texts = [c["text"] for c in chunks]
    assert all(t.startswith(prompt) for t in texts)
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    assert len(texts) > 1  # streamed, not sent at the end
    assert texts[-1][len(prompt):].strip() == expected


# Dispatch logic, no processes ---------------------------------------------------------------------
def test_dispatch_logic_shortest_queue_lottery_and_expiry():
    c = Controller("shortest_queue", expiration=EXPIRATION_S)
    now = time.monotonic()
    c.workers = {"http://a": WorkerInfo(["m"], 1, 2, True, now), "http://b": WorkerInfo(["m"], 2, 2, True, now),
                 "http://c": WorkerInfo(["other"], 1, 0, False, now - 100)}
    # queue_length / speed: a 2, b 1 -> b, whose cached queue then grows (3/2 = 1.5, then 2: a wins the tie)
    assert [c.get_worker_address("m") for _ in range(3)] == ["http://b", "http://b", "http://a"]
    assert c.get_worker_address("missing") == ""
    assert c.list_models() == ["m", "other"]

    c.dispatch_method, c.rng = "lottery", random.Random(0)
    picks = [c.get_worker_address("m") for _ in range(3000)]
    assert 0.28 < picks.count("http://a") / len(picks) < 0.39  # weighted by speed: 1/3

    c.workers["http://a"].last_heart_beat = now - 10
    assert c.receive_heart_beat("http://b", 5) and not c.receive_heart_beat("http://nobody", 0)
    assert c.remove_expired() == ["http://a"]  # c never beats (check_heart_beat False): kept
    assert sorted(c.workers) == ["http://b", "http://c"] and c.workers["http://b"].queue_length == 5


class FakeStream:
    """Stands in for a scheduler Stream: yields its deltas once `gate` opens."""

    def __init__(self, deltas: list[str], gate: asyncio.Event) -> None:
        self.deltas, self.gate, self.cancelled = deltas, gate, False

    async def __aiter__(self):
        await self.gate.wait()
        for delta in self.deltas:
            yield delta

    def cancel(self) -> None:
        self.cancelled = True


def fake_service(deltas: list[str], gate: asyncio.Event):
    streams, params = [], []

    def submit(request, sampling, loop):
        params.append(sampling)
        streams.append(FakeStream(deltas, gate))
        return streams[-1]

    pipe = SimpleNamespace(template=SimpleNamespace(stop_str="</s>", name="vicuna_v1"),
                           engine=SimpleNamespace(check_context=lambda request: 100),
                           prepare=lambda prompt, images, raw, encode=True: SimpleNamespace(request=prompt))
    return SimpleNamespace(name="fake", pipe=pipe, scheduler=SimpleNamespace(submit=submit), close=lambda: None,
                           streams=streams, params=params)


def test_worker_bounds_requests_in_flight_and_streams_every_interval():
    async def collect(stream) -> list[dict]:
        return protocol.decode_chunks(b"".join([item async for item in stream]))

    async def scenario() -> None:
        gate = asyncio.Event()
        service = fake_service(list("abcdefg"), gate)
        worker = ModelWorker(service, limit=1, stream_interval=3)
        try:
            first = asyncio.create_task(collect(worker.generate_stream({"prompt": "P", "temperature": 0.001})))
            second = asyncio.create_task(collect(worker.generate_stream({"prompt": "Q", "top_p": 0})))
            await asyncio.sleep(0.2)
            # --limit-model-concurrency 1: the second request waits for the slot, and counts in the queue
            assert len(service.streams) == 1
            assert worker.status() == {"model_names": ["fake"], "speed": 1, "queue_length": 2, "template": "vicuna_v1"}
            gate.set()
            texts = [[c["text"] for c in await task] for task in (first, second)]
        finally:
            worker.close()
        assert texts == [["Pabc", "Pabcdef", "Pabcdefg"], ["Qabc", "Qabcdef", "Qabcdefg"]]  # every 3 deltas and the end
        assert worker.status()["queue_length"] == 0 and all(s.cancelled for s in service.streams)
        greedy, sampled = service.params
        assert greedy.temperature == 0 and greedy.max_new_tokens == 100  # the room the context leaves
        assert sampled.temperature == 1.0 and 0 < sampled.top_p < 1e-6 and sampled.stop == ("</s>",)

    asyncio.run(scenario())


def test_bad_flags_are_one_line_and_exit_2():
    taken = free_port()
    for args in (["llava.serve.model_worker", "--limit-model-concurrency", "0"],
                 ["llava.serve.model_worker", "--load-8bit", "--load-4bit"],
                 ["llava.serve.controller", "--heart-beat-expiration", "-1"]):
        proc = start(["-m", *args])
        assert proc.wait(30) == 2
        lines = stop(proc).strip().splitlines()
        assert len(lines) == 1 and "error:" in lines[0], lines
    proc = start(["-m", "llava.serve.controller", "--port", str(taken)], env={protocol.HEART_BEAT_EXPIRATION_ENV: "x"})
    assert proc.wait(30) == 2 and "LLAVA_HEART_BEAT_EXPIRATION" in stop(proc)


# The running stack ----------------------------------------------------------------------------------
def test_workers_register_and_models_are_listed(stack):
    controller = stack["controller"]
    assert post(controller + "/list_models") == {"models": [MODEL]}
    assert post(controller + "/worker_get_status") == {"model_names": [MODEL], "speed": 2, "queue_length": 0}
    for address in stack["workers"]:
        assert post(address + "/worker_get_status") == {"model_names": [MODEL], "speed": 1, "queue_length": 0,
                                                        "template": "vicuna_v1"}


def test_shortest_queue_dispatch_uses_both_workers(stack):
    controller = stack["controller"]
    addresses = {post(controller + "/get_worker_address", {"model": MODEL})["address"] for _ in range(6)}
    assert addresses == set(stack["workers"])
    assert post(controller + "/get_worker_address", {"model": "no-such-model"}) == {"address": ""}
    chunks = generate(controller, "hello", [], model="no-such-model")
    assert chunks == [{"text": protocol.SERVER_ERROR_MSG, "error_code": protocol.NO_WORKER}]


def test_lottery_controller_dispatches_and_reports_unreachable_workers(stack):
    port = free_port()
    proc = start_controller(port, "lottery")
    url = f"http://127.0.0.1:{port}"
    try:
        for address in stack["workers"]:  # no status given: the controller asks each worker for it
            post(url + "/register_worker", {"worker_name": address, "check_heart_beat": False})
        post(url + "/register_worker", {"worker_name": f"http://127.0.0.1:{free_port()}", "check_heart_beat": False,
                                        "worker_status": {"model_names": ["ghost"], "speed": 1, "queue_length": 0}})
        assert post(url + "/list_models") == {"models": ["ghost", MODEL]}
        addresses = [post(url + "/get_worker_address", {"model": MODEL})["address"] for _ in range(30)]
        assert set(addresses) == set(stack["workers"])
        ghost = generate(url, "hello", [], model="ghost")
        assert ghost == [{"text": protocol.SERVER_ERROR_MSG, "error_code": protocol.WORKER_UNREACHABLE}]
        post(url + "/refresh_all_workers")  # the ghost does not answer: dropped
        assert post(url + "/list_models") == {"models": [MODEL]}
    finally:
        stop(proc)


def test_stream_through_controller_equals_llava_run(stack, reference):
    prompt, images = reference["prompt"], reference["images"]
    with ThreadPoolExecutor(2) as pool:
        results = {name: pool.submit(generate, stack["controller"], prompt, [images[name]]) for name in images}
        for name, result in results.items():
            check_answer(result.result(), prompt, reference["answers"][name])


def test_requests_sharing_one_worker_each_get_their_own_answer(stack, reference):
    prompt, images, worker = reference["prompt"], reference["images"], stack["workers"][0]
    names = ["shape", "color", "shape"]
    with ThreadPoolExecutor(len(names)) as pool:
        results = [pool.submit(generate, worker, prompt, [images[name]]) for name in names]
        for name, result in zip(names, results):
            check_answer(result.result(), prompt, reference["answers"][name])


def test_bad_input_gets_an_error_chunk_and_the_worker_keeps_serving(stack, reference):
    prompt, images, worker = reference["prompt"], reference["images"], stack["workers"][0]
    png = IMAGES["shape"].read_bytes()
    cases = {  # request -> words the error must contain
        "two tags, one image": ([images["shape"]], {"prompt": "<image>" + prompt}, "2 <image> tag(s) but 1 image"),
        "no image": ([], {}, "1 <image> tag(s) but 0 image"),
        "not an image": ([b64(b"hello, this is text")], {}, "images[0] is not a readable image"),
        "truncated png": ([b64(png[: len(png) // 2])], {}, "truncated"),
        "not base64": (["%%%"], {}, "images[0] is not valid base64"),
        "bad top_p": ([images["shape"]], {"temperature": 0.7, "top_p": 3}, "top_p"),
        "bad max_new_tokens": ([images["shape"]], {"max_new_tokens": "many"}, "max_new_tokens"),
    }
    for case, (imgs, extra, words) in cases.items():
        chunks = generate(worker, extra.pop("prompt", prompt), imgs, **extra)
        assert len(chunks) == 1 and chunks[0]["error_code"] == protocol.WORKER_ERROR, (case, chunks)
        assert words in chunks[0]["text"] and chunks[0]["text"].startswith("Bad request"), (case, chunks)
    r = httpx.post(worker + "/worker_generate_stream", content=b"{not json", timeout=10)
    assert protocol.decode_chunks(r.content)[0]["error_code"] == protocol.WORKER_ERROR
    through = generate(stack["controller"], prompt, [b64(b"GIF89a-broken")])  # error chunks pass through as they are
    assert len(through) == 1 and through[0]["error_code"] == protocol.WORKER_ERROR
    long_prompt = "<image>\n" + "word " * 3000
    assert generate(worker, long_prompt, [images["shape"]]) == [{"text": long_prompt + protocol.EXCEEDS_MSG,
                                                                  "error_code": 0}]
    check_answer(generate(worker, prompt, [images["color"]]), prompt, reference["answers"]["color"])
    assert post(worker + "/worker_get_status")["queue_length"] == 0


def test_a_client_that_goes_away_frees_its_batch_row(stack, reference):
    """The client leaves after two chunks: the controller drops its upstream request, the worker cancels the row."""
    prompt, controller = reference["prompt"], stack["controller"]
    payload = {"model": MODEL, "prompt": prompt, "images": [reference["images"]["color"]], "temperature": 0,
               "max_new_tokens": 1024}
    with httpx.stream("POST", controller + "/worker_generate_stream", json=payload, timeout=60) as r:
        received = b""
        for piece in r.iter_raw():
            received += piece
            if received.count(protocol.DELIMITER) >= 2:
                break
    left = time.monotonic()
    logs = lambda: "".join(output(stack["procs"][w]) for w in stack["workers"])
    wait_for(lambda: "cancelled: its batch row is free" in logs(), 10, "the worker cancelling the request")
    wait_for(lambda: all(post(w + "/worker_get_status")["queue_length"] == 0 for w in stack["workers"]), 5, "idle")
    print(f"batch row freed {time.monotonic() - left:.2f} s after the client left")


def test_workers_register_again_with_a_restarted_controller(stack):
    controller = stack["controller"]
    stop(stack["procs"]["controller"])
    stack["procs"]["controller"] = start_controller(stack["port"])
    took = wait_for(lambda: post(controller + "/worker_get_status")["speed"] == 2, 10, "re-registration")
    assert post(controller + "/list_models") == {"models": [MODEL]}
    print(f"both workers re-registered {took:.1f} s after the controller restarted")


def test_a_killed_worker_is_dropped_and_the_other_serves(stack, reference):
    """Run last: it kills the second worker."""
    controller, (alive, dead) = stack["controller"], stack["workers"]
    stack["procs"][dead].send_signal(signal.SIGKILL)
    stack["procs"][dead].wait(10)
    killed = time.monotonic()

    # The controller has no endpoint listing its workers (neither has the original): its log says when.
    dropped = f"Remove worker {dead}"
    took = wait_for(lambda: dropped in output(stack["procs"]["controller"]), 4 * EXPIRATION_S, "dropping the worker")
    assert took >= EXPIRATION_S - 1.0  # not before its heart beats (every 0.5 s) could have expired
    print(f"killed worker dropped after {time.monotonic() - killed:.1f} s (expiry {EXPIRATION_S:.0f} s)")
    assert {post(controller + "/get_worker_address", {"model": MODEL})["address"] for _ in range(6)} == {alive}
    prompt = reference["prompt"]
    for name in ("shape", "color"):
        check_answer(generate(controller, prompt, [reference["images"][name]]), prompt, reference["answers"][name])
    assert "Traceback" not in output(stack["procs"][alive])
