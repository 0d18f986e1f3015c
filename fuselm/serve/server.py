"""Running the app: `run` serves a model until Ctrl-C; `BackgroundServer` serves an app
on a thread of this process, for tests and benchmarks that keep the engine at hand."""
from __future__ import annotations

import threading
import time
from typing import Optional

import uvicorn

from .app import build_app

# On Ctrl-C, open responses get this long to finish before their requests are aborted.
GRACEFUL_SHUTDOWN_SECONDS = 5


def run(model: str = "smollm2-135m", *, target: str = "auto", host: str = "127.0.0.1", port: int = 8000,
        served_model_name: Optional[str] = None, api_key: Optional[str] = None, max_waiting: int = 256,
        max_model_len: int = 2048, max_num_seqs: int = 16) -> None:
    """Load `model` (compiled for `target`) and serve it at http://host:port as
    `served_model_name` (default: `model`). Returns after Ctrl-C (or SIGTERM): uvicorn
    stops taking requests, gives open responses GRACEFUL_SHUTDOWN_SECONDS, and then
    every request still running is aborted."""
    from ..llm import LLM

    llm = LLM(model, target, max_model_len=max_model_len, max_num_seqs=max_num_seqs)
    try:
        app = build_app(llm, served_model_name=served_model_name or model, api_key=api_key,
                        max_waiting=max_waiting)
        uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS)
    finally:
        llm.close()


class BackgroundServer:
    """uvicorn on a daemon thread; port 0 picks a free port (`port` says which)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.host = host
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS))
        self.thread = threading.Thread(target=self.server.run, name="fuselm-http", daemon=True)

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.host}")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
