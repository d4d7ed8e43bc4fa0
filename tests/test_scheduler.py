"""The continuous-batching scheduler: rows join and leave a running batch, and no row's answer
depends on what else is in it."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from test_generate import _prompt

from llava.errors import ContextTooLong, LlavaError, Overloaded, SchedulerClosed
from llava.generate import Engine, Request, SamplingParams
from llava.generate.scheduler import Scheduler


@pytest.fixture(scope="module")
def tiny(tiny_tok):
    from llava.tiny import tiny_model

    return tiny_model("tiny", tokenizer=tiny_tok)


def _requests(model, n: int) -> list[Request]:
    """Prompts of different lengths, with and without images, so joining needs padding both ways."""
    shapes = [(5, 1), (30, 0), (12, 2), (3, 0), (22, 1), (8, 1), (40, 0), (16, 1)]
    return [_prompt(model, n_text, n_images, seed=10 + i)[0] for i, (n_text, n_images) in enumerate(shapes[:n])]


def _alone(engine: Engine, request: Request, params: SamplingParams) -> list[int]:
    return engine.generate([request], params)[0].token_ids


def assert_same_greedy_answers(engine: Engine, requests: list[Request], got: list[list[int]],
                               alone: list[list[int]]) -> None:
    """Equal, or first different where the two best logits alone were within float noise.

    A row's logits are not bitwise the same in batches of different sizes (MKL picks other
    kernels for 1 row than for 4: differences of ~1e-5), so a greedy choice between two
    near-tied tokens may go either way; anywhere else the answers must match.
    """
    for request, ours, ref in zip(requests, got, alone):
        if ours == ref:
            continue
        k = next(i for i, (a, b) in enumerate(zip(ours, ref)) if a != b)
        logits = engine.prefill([Request(request.input_ids + ref[:k], request.image_features)], 1).logits[0]
        top2 = logits.topk(2)
        assert {ours[k], ref[k]} == set(top2.indices.tolist()) and float(top2.values[0] - top2.values[1]) < 1e-4, \
            f"answer differs from the request alone at token {k}: {ours} vs {ref}"


@pytest.mark.parametrize("forward,compile", [("lean", False), ("lean", True), ("transformers", False)])
def test_staggered_requests_get_their_solo_answers(tiny, forward, compile):
    """Requests arriving while others decode join the running batch (lean forward, eager or
    compiled: batches of changing sizes and capacities through one compiled step) or wait for it
    to drain (transformers' forward); every answer equals the same request decoded alone."""
    model, tok = tiny
    engine = Engine(model, tok, eos_token_ids=[], forward=forward, compile=compile)
    requests = _requests(model, 6)
    budgets = [80, 6, 20, 9, 3, 12]  # rows finish at different steps, so rows leave while others join
    solo = [_alone(engine, r, SamplingParams(max_new_tokens=b)) for r, b in zip(requests, budgets)]
    scheduler = Scheduler(engine, max_batch=3, max_waiting=8)
    try:
        first = scheduler.submit(requests[0], SamplingParams(max_new_tokens=budgets[0]))
        first_tokens = iter(first)
        next(first_tokens)  # it is decoding now, with ~80 steps to go: the others arrive while it runs
        streams = [first]
        for r, b in zip(requests[1:], budgets[1:]):
            streams.append(scheduler.submit(r, SamplingParams(max_new_tokens=b)))
            time.sleep(0.002)
        list(first_tokens)
        got = [s.result().token_ids if s is not first else s.completion.token_ids for s in streams]
        stats = scheduler.stats()
    finally:
        scheduler.close()
    assert_same_greedy_answers(engine, requests, got, solo)
    assert stats["finished"] == 6 and stats["active"] == 0 and stats["peak_batch"] <= 3
    assert stats["continuous"] is (forward == "lean")
    if forward == "lean":
        assert stats["joins"] >= 1, stats


def test_seeded_sampling_does_not_depend_on_the_batch(tiny):
    model, tok = tiny
    engine = Engine(model, tok, eos_token_ids=[])
    requests = _requests(model, 4)
    params = [SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=10, seed=s) for s in (1, 2, 3, 4)]
    solo = [_alone(engine, r, p) for r, p in zip(requests, params)]
    scheduler = Scheduler(engine, max_batch=4)
    try:
        greedy = scheduler.submit(requests[0], SamplingParams(max_new_tokens=25))  # a greedy row rides along
        streams = [scheduler.submit(r, p) for r, p in zip(requests, params)]
        assert [s.result().token_ids for s in streams] == solo
        assert_same_greedy_answers(engine, requests[:1], [greedy.result().token_ids],
                                   [_alone(engine, requests[0], SamplingParams(max_new_tokens=25))])
    finally:
        scheduler.close()


def test_stop_strings_and_eos_end_rows_as_alone(tiny):
    model, tok = tiny
    engine = Engine(model, tok)  # the tokenizer's EOS counts
    requests = _requests(model, 4)
    alone = engine.generate(requests[:1], SamplingParams(max_new_tokens=12))[0]
    stop = alone.text[3:5] or "e"
    params = SamplingParams(max_new_tokens=12, stop=[stop])
    expected = engine.generate(requests[:1], params)[0]
    scheduler = Scheduler(engine, max_batch=4)
    try:
        others = [scheduler.submit(r, SamplingParams(max_new_tokens=16)) for r in requests[1:]]
        got = scheduler.submit(requests[0], params).result()
        [s.result() for s in others]
    finally:
        scheduler.close()
    assert (got.text, got.finish_reason, got.token_ids) == (expected.text, expected.finish_reason, expected.token_ids)


def test_cancel_frees_the_row_before_the_next_step(tiny):
    model, tok = tiny
    engine = Engine(model, tok, eos_token_ids=[])
    requests = _requests(model, 2)
    scheduler = Scheduler(engine, max_batch=2)
    try:
        long = scheduler.submit(requests[0], SamplingParams(max_new_tokens=400))
        it = iter(long)
        next(it)
        long.cancel()
        steps = scheduler.stats()["decode_steps"]
        list(it)  # deltas already queued may still arrive; then the stream ends
        assert long.completion.finish_reason == "cancelled"
        stats = scheduler.stats()  # the batch is empty now, so the step count is frozen
        assert stats["cancelled"] == 1 and stats["active"] == 0 and stats["decode_steps"] - steps <= 1, stats
        assert len(long.completion.token_ids) < 400
        other = scheduler.submit(requests[1], SamplingParams(max_new_tokens=30))
        assert other.result().token_ids == _alone(engine, requests[1], SamplingParams(max_new_tokens=30))
        waiting = scheduler.submit(requests[0], SamplingParams(max_new_tokens=5))
        waiting.cancel()  # cancelled before or right after admission: ends either way
        assert waiting.result().finish_reason in ("cancelled", "length")
    finally:
        scheduler.close()


def test_bounded_queue_refuses_with_overloaded(tiny):
    model, tok = tiny
    engine = Engine(model, tok, eos_token_ids=[])
    request = _requests(model, 1)[0]
    scheduler = Scheduler(engine, max_batch=1, max_waiting=1)
    try:
        first = scheduler.submit(request, SamplingParams(max_new_tokens=300))
        second = scheduler.submit(request, SamplingParams(max_new_tokens=3))
        with pytest.raises(Overloaded, match="capacity"):
            scheduler.submit(request, SamplingParams(max_new_tokens=3))
        first.cancel()
        assert second.result().finish_reason == "length"
        assert scheduler.stats()["rejected"] == 1
    finally:
        scheduler.close()
    with pytest.raises(SchedulerClosed):
        scheduler.submit(request)


def test_a_prompt_with_no_room_is_refused_at_submit(tiny):
    model, tok = tiny
    engine = Engine(model, tok, context_length=8)
    scheduler = Scheduler(engine)
    try:
        with pytest.raises(ContextTooLong):
            scheduler.submit(Request(list(range(10, 20))))
    finally:
        scheduler.close()


def test_async_consumers_on_an_event_loop(tiny):
    import asyncio

    model, tok = tiny
    engine = Engine(model, tok, eos_token_ids=[])
    requests = _requests(model, 3)
    solo = [_alone(engine, r, SamplingParams(max_new_tokens=8)) for r in requests]
    scheduler = Scheduler(engine, max_batch=8)

    async def consume(request: Request) -> str:
        stream = scheduler.submit(request, SamplingParams(max_new_tokens=8), loop=asyncio.get_running_loop())
        text = "".join([d async for d in stream])
        assert text == stream.completion.text
        return stream.completion.token_ids

    async def main():
        return await asyncio.gather(*(consume(r) for r in requests))

    try:
        assert_same_greedy_answers(engine, requests, asyncio.run(main()), solo)
    finally:
        scheduler.close()


def test_a_failing_request_does_not_take_the_server_down(tiny):
    """A request whose features do not fit its placeholders fails alone; the next one is served."""
    model, tok = tiny
    engine = Engine(model, tok, eos_token_ids=[])
    good = _requests(model, 1)[0]
    bad = Request(good.input_ids, [torch.zeros(3, 7)])  # wrong feature count and width
    scheduler = Scheduler(engine)
    try:
        failing = scheduler.submit(bad, SamplingParams(max_new_tokens=4))
        with pytest.raises(LlavaError, match="generation failed"):
            failing.result()
        assert scheduler.submit(good, SamplingParams(max_new_tokens=4)).result().finish_reason == "length"
        assert scheduler.stats()["failed"] == 1
    finally:
        scheduler.close()
    assert not any(t.name == "llava-scheduler" and t.is_alive() for t in threading.enumerate())


def test_images_left_as_pixels_are_encoded_at_prefill_with_the_same_answer():
    """A server's requests carry pixels; the engine encodes every newcomer's images in one tower pass."""
    import llava

    pipe = llava.load(device="cpu")
    questions = [("What shape is in the image?", "examples/shape.png"), ("What color is the object?", "examples/color.png"),
                 ("Describe the image in detail.", "examples/shapes.png")]
    params = pipe.sampling(temperature=0, max_new_tokens=24)
    alone = [pipe.engine.generate([pipe.prepare(q, images=[i]).request], params)[0].token_ids for q, i in questions]
    deferred = [pipe.prepare(q, images=[i], encode=False).request for q, i in questions]
    assert all(r.pixel_values and not r.image_features for r in deferred)
    scheduler = Scheduler(pipe.engine, max_batch=4)
    try:
        streams = [scheduler.submit(r, params) for r in deferred]
        assert_same_greedy_answers(pipe.engine, deferred, [s.result().token_ids for s in streams], alone)
    finally:
        scheduler.close()
