"""Iteration-level scheduling: requests join and leave one running batch between decode steps.

This is how vLLM and llama.cpp's server slots serve many clients with one model: there is
no fixed batch to fill and no waiting for the longest answer. One thread owns the model and
loops: admit waiting requests (prefill them together, then `Engine.join` them onto the
running batch's left-padded cache), choose one token for every row, let finished and
cancelled rows leave, decode one step for the rest. A newcomer waits at most one decode
step plus its own prefill for its first token.

Each row keeps its own sampling parameters, stop strings, budget and seeded generator, and
its own positions and mask in the batch, so at temperature 0 (or with a seed) its answer is
the one it would get alone. Bounded: `max_batch` rows decode together and `max_waiting`
requests may queue; beyond that `submit` raises `Overloaded` at once (the server's 429).

Models that do not run on the engine's lean forward cannot join a running batch; for them
newcomers are admitted whenever the batch drains (`stats()["continuous"]` says which).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from llava.errors import GenerationFailed, Overloaded, SchedulerClosed
from llava.generate.detokenize import RowText
from llava.generate.engine import Completion, DecodeState, Engine, Request
from llava.generate.sampling import SamplingParams, make_generator, sample

log = logging.getLogger("llava.scheduler")

__all__ = ["Scheduler", "Stream"]

_DONE = object()


class Stream:
    """One submitted request: iterate it (sync or async) for text deltas; `cancel()` frees its row.

    After the iteration ends, `completion` holds the whole answer and its finish_reason
    ("stop", "eos", "length" or "cancelled"). An error while generating is raised from the
    iteration.
    """

    def __init__(self, request_id: int, request: Request, params: SamplingParams,
                 loop: asyncio.AbstractEventLoop | None) -> None:
        self.id = request_id
        self.request = request
        self.params = params
        self.prompt_tokens = len(request.input_ids)
        self.completion: Completion | None = None
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self._cancelled = threading.Event()
        self._loop = loop
        self._events: queue.SimpleQueue | asyncio.Queue = asyncio.Queue() if loop else queue.SimpleQueue()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop generating for this request; its row leaves the batch before the next decode step."""
        self._cancelled.set()

    def _push(self, item: Any) -> None:
        if self._loop is None:
            self._events.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is gone: nobody is listening any more
            self.cancel()

    def __iter__(self) -> Iterator[str]:
        if self._loop is not None:
            raise TypeError("this stream was submitted with an event loop; use `async for`")
        while (item := self._events.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def __aiter__(self) -> AsyncIterator[str]:
        """Deltas that arrived while the consumer was busy come joined as one (fewer, larger chunks
        when a server falls behind the decode loop, instead of an ever-growing backlog)."""
        if self._loop is None:
            raise TypeError("this stream was submitted without an event loop; iterate it with `for`")
        done = False
        while not done:
            items = [await self._events.get()]
            while not self._events.empty():
                items.append(self._events.get_nowait())
            if _DONE in items:
                done, items = True, items[:items.index(_DONE)]
            for item in items:
                if isinstance(item, BaseException):
                    raise item
            if text := "".join(items):
                yield text

    def result(self) -> Completion:
        """Wait for the whole answer (sync streams)."""
        for _ in self:
            pass
        assert self.completion is not None
        return self.completion


@dataclass
class _Row:
    """A request while it is in the batch."""

    stream: Stream
    text: RowText
    budget: int
    generator: torch.Generator | None
    finish: str | None = None


@dataclass
class _Counters:
    submitted: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0
    steps: int = 0
    joins: int = 0  # times newcomers joined a batch that was already decoding
    tokens: int = 0
    peak_batch: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)


class Scheduler:
    """Owns an `Engine` and serves `submit`ted requests from any thread.

    By default the model loop runs on a background thread. A server process does better to run
    it on its main thread (`start=False`, then `run_forever()`): PyTorch's CPU kernels launch
    their OpenMP threads far more slowly from a secondary thread (measured on 2 cores: a
    192-wide linear 13 us from the main thread, 86 us from another; a batch-8 decode step of a
    86M-parameter Llama 50 ms against 71 ms), see `llava.serve.service.run_server`.
    """

    def __init__(self, engine: Engine, max_batch: int = 8, max_waiting: int = 64, start: bool = True) -> None:
        if max_batch < 1 or max_waiting < 0:
            raise ValueError(f"max_batch must be >= 1 and max_waiting >= 0, got {max_batch} and {max_waiting}")
        self.engine = engine
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self._waiting: deque[Stream] = deque()
        self._rows: dict[int, _Row] = {}  # request id -> row; DecodeState.rows holds the ids
        self._state: DecodeState | None = None
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._closed = False
        self._stop_requested = False
        self._counters = _Counters()
        self._continuous = engine.lean is not None
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self.run_forever, name="llava-scheduler", daemon=True)
            self._thread.start()

    # Client side ------------------------------------------------------------------------------
    def submit(self, request: Request, params: SamplingParams | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> Stream:
        """Queue a request; returns its Stream at once. Pass `loop` to consume it with `async for`.

        Raises ContextTooLong when the prompt leaves no room, Overloaded when the batch and
        the queue are full, SchedulerClosed after `close()`.
        """
        params = params or SamplingParams()
        self.engine.check_context(request)
        with self._lock:
            if self._closed:
                raise SchedulerClosed("the scheduler has shut down")
            busy = len(self._rows) + len(self._waiting)
            if busy >= self.max_batch + self.max_waiting:
                self._counters.rejected += 1
                raise Overloaded(f"the server is at capacity ({len(self._rows)} requests generating, "
                                 f"{len(self._waiting)} waiting, limit {self.max_batch} + {self.max_waiting}); "
                                 f"retry shortly")
            stream = Stream(next(self._ids), request, params, loop)
            self._waiting.append(stream)
            self._counters.submitted += 1
            self._lock.notify()
        return stream

    def stats(self) -> dict[str, Any]:
        """What the batch holds now and counts since start (for /health, /status and the workers' load)."""
        with self._lock:
            c = self._counters
            return {"active": len(self._rows), "waiting": len(self._waiting), "max_batch": self.max_batch,
                    "max_waiting": self.max_waiting, "continuous": self._continuous, "submitted": c.submitted,
                    "finished": c.finished, "cancelled": c.cancelled, "failed": c.failed, "rejected": c.rejected,
                    "decode_steps": c.steps, "joins": c.joins, "generated_tokens": c.tokens, "peak_batch": c.peak_batch,
                    "finish_reasons": dict(c.by_reason)}

    @property
    def queue_length(self) -> int:
        """Requests generating plus waiting (the original worker's `queue_length`)."""
        with self._lock:
            return len(self._rows) + len(self._waiting)

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop taking requests, cancel the ones in flight and stop the thread."""
        with self._lock:
            self._closed = True
            for stream in [*self._waiting, *(r.stream for r in self._rows.values())]:
                stream.cancel()
            self._lock.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # The model thread ---------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the loop to close soon; safe in a signal handler (it takes no lock)."""
        self._stop_requested = True

    def run_forever(self) -> None:
        """The model loop, on the calling thread, until `close()` (only when built with start=False)."""
        while True:
            if self._stop_requested and not self._closed:
                self.close()
            with self._lock:
                while not self._closed and not self._waiting and not self._rows and not self._stop_requested:
                    self._lock.wait(timeout=0.5)
                if self._closed and not self._rows and not self._waiting:
                    return
            try:
                self._iteration()
            except Exception as err:  # a bug or a device failure: fail the batch, keep serving
                log.exception("generation failed; %d request(s) end with an error", len(self._rows))
                failure = GenerationFailed(f"generation failed ({type(err).__name__}; see the server log)")
                for row in list(self._rows.values()):
                    self._end(row.stream, error=failure)
                self._state = None

    def _iteration(self) -> None:
        """Admit, choose one token per row, let finished rows leave, decode one step."""
        self._admit()
        state = self._state
        if state is None:
            return
        tokens = self._choose(state)
        keep = []
        for b, (request_id, token) in enumerate(zip(state.rows, tokens.tolist())):
            row = self._rows[request_id]
            self._advance(row, token)
            if row.finish is None:
                keep.append(b)
        self._counters.steps += 1
        if not keep:
            self._state = None
            return
        if len(keep) < len(state.rows):
            self.engine.keep_rows(state, keep)
            tokens = tokens[torch.tensor(keep, device=tokens.device)]
        self.engine.decode_step(state, tokens)

    def _admit(self) -> None:
        """Drop cancelled rows, then prefill waiting requests into the free places of the batch."""
        state = self._state
        if state is not None:
            keep = [b for b, request_id in enumerate(state.rows) if not self._rows[request_id].stream.cancelled]
            for request_id in state.rows:
                if self._rows[request_id].stream.cancelled:
                    self._end(self._rows[request_id].stream, reason="cancelled")
            if not keep:
                state = self._state = None
            elif len(keep) < len(state.rows):
                self.engine.keep_rows(state, keep)
        if state is not None and not self.engine.can_join(state):
            return  # transformers' forward: newcomers wait until the batch drains
        newcomers = self._take_waiting(self.max_batch - (len(state.rows) if state else 0))
        if not newcomers:
            return
        rows = [self._new_row(stream) for stream in newcomers]
        fresh = self._prefill(rows)
        if fresh is None:
            return
        if state is None:
            self._state = fresh
        else:
            room = max(r.budget - len(r.text.token_ids) for r in self._rows.values())
            self._state = self.engine.join(state, fresh, room)
            self._counters.joins += 1
        self._counters.peak_batch = max(self._counters.peak_batch, len(self._state.rows))

    def _take_waiting(self, places: int) -> list[Stream]:
        taken = []
        with self._lock:
            while self._waiting and len(taken) < places:
                stream = self._waiting.popleft()
                if stream.cancelled:
                    self._counters.cancelled += 1
                    stream.completion = Completion([], "", "cancelled")
                    stream._push(_DONE)
                else:
                    taken.append(stream)
        return taken

    def _new_row(self, stream: Stream) -> _Row:
        budget = min(stream.params.max_new_tokens, self.engine.check_context(stream.request))
        generator = make_generator(stream.params.seed, self.engine.device)
        return _Row(stream, RowText(self.engine.tokenizer, stream.params.stop), budget, generator)

    def _prefill(self, rows: list[_Row]) -> DecodeState | None:
        """Prefill the newcomers together; if that fails, one by one, so one bad request fails alone."""
        budget = max(r.budget for r in rows)
        try:
            state = self.engine.prefill([r.stream.request for r in rows], budget)
        except Exception:
            if len(rows) == 1 or not self._continuous:  # (separate prefills could not be joined)
                log.exception("prefill failed for request(s) %s", [r.stream.id for r in rows])
                for r in rows:
                    self._end(r.stream, error=GenerationFailed("generation failed for this request (see the server log)"))
                return None
            states = [s for r in rows if (s := self._prefill([r])) is not None]
            if not states:
                return None
            state = states[0]
            for other in states[1:]:
                state = self.engine.join(state, other, budget)
            return state
        state.rows = [r.stream.id for r in rows]
        for r in rows:
            self._rows[r.stream.id] = r
        return state

    def _choose(self, state: DecodeState) -> torch.Tensor:
        """One token per row, each with its own parameters and generator (greedy rows share one argmax)."""
        rows = [self._rows[i] for i in state.rows]
        tokens = state.logits.argmax(dim=-1)
        for b, row in enumerate(rows):
            if not row.stream.params.greedy:
                tokens[b] = sample(state.logits[b:b + 1], row.stream.params, row.generator)[0]
        return tokens

    def _advance(self, row: _Row, token: int) -> None:
        """Feed one token to a row: stream its new text, and end it on EOS, a stop string or its budget."""
        text, stream = row.text, row.stream
        if stream.first_token_at is None:
            stream.first_token_at = time.perf_counter()
        self._counters.tokens += 1
        if stream.cancelled:
            row.finish = "cancelled"
        elif token in self.engine.eos_token_ids and not stream.params.ignore_eos:
            row.finish = "eos"
        elif text.add(token):
            row.finish = "stop"
        elif len(text.token_ids) >= row.budget:
            row.finish = "length"
        if row.finish is not None:
            text.flush()
        delta = text.delta(final=row.finish is not None)
        if delta and row.finish != "cancelled":
            stream._push(delta)
        if row.finish is not None:
            self._end(stream, reason=row.finish)

    def _end(self, stream: Stream, reason: str | None = None, error: BaseException | None = None) -> None:
        row = self._rows.pop(stream.id, None)
        c = self._counters
        if error is not None:
            c.failed += 1
            stream._push(error)
            return
        if reason == "cancelled":
            c.cancelled += 1
            log.info("request %d cancelled: its batch row is free", stream.id)
        else:
            c.finished += 1
        c.by_reason[reason] = c.by_reason.get(reason, 0) + 1
        text = row.text if row is not None else None
        stream.completion = Completion(text.token_ids if text else [], text.text if text else "", reason or "length")
        stream._push(_DONE)
