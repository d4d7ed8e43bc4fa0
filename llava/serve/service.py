"""One loaded model behind one scheduler: what the API, the web UI and a model worker share."""

from __future__ import annotations

import os
import signal
import socket
import threading
from dataclasses import dataclass

from llava.api import LlavaPipeline, default_model_path, load
from llava.checkpoint.paths import model_name
from llava.generate.scheduler import Scheduler


def model_name_for(path: str | os.PathLike | None) -> str:
    """The name clients use for a model: the original's rule (`checkpoint.paths.model_name`) on
    its path, the default model's when none is given."""
    return model_name(os.fspath(path) if path else default_model_path())


@dataclass
class ModelService:
    """A pipeline (templates, image processing, tokenizer) and the scheduler that runs its model."""

    name: str
    pipe: LlavaPipeline
    scheduler: Scheduler

    @classmethod
    def load(cls, model: str | None = None, name: str | None = None, max_batch: int = 8, max_waiting: int = 64,
             start: bool = True, **load_args) -> ModelService:
        """`start=False` leaves the model loop to `run_server` (on the main thread)."""
        pipe = load(model, **load_args)
        return cls(name or model_name_for(model), pipe, Scheduler(pipe.engine, max_batch, max_waiting, start=start))

    def close(self) -> None:
        self.scheduler.close()


def run_server(server, sock: socket.socket, service: ModelService) -> None:
    """Serve HTTP (a `uvicorn.Server`) on a helper thread and the model loop on this, the main, thread.

    Why this way round: PyTorch's CPU kernels are much slower when launched from a secondary
    thread (see `Scheduler`), and the model loop is where the time goes. Ctrl-C and SIGTERM ask
    both to stop: requests in flight end, uvicorn closes its connections, and this returns.
    """
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)

    def stop(signum, frame) -> None:
        server.should_exit = True
        service.scheduler.request_stop()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread.start()
    try:
        service.scheduler.run_forever()
    finally:
        server.should_exit = True
        service.scheduler.close()
        thread.join(10)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
