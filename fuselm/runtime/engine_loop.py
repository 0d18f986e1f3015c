"""One engine loop, many consumers: the engine steps on one thread and each request's
outputs go to that request's own stream.

    loop = EngineLoop(engine)
    stream = loop.submit("Hello", SamplingParams(max_tokens=8))    # from any thread
    for output in stream: ...                                      # this request's alone
    async for output in loop.submit(..., aio_loop=asyncio.get_running_loop()): ...

This is vLLM's AsyncLLM / engine-core split in one process. Consumers (`LLM.generate`,
`LLM.stream`, `LLM.chat`, the OpenAI server) never call `step`; they submit requests,
read their streams, and abort what they no longer want. The loop thread starts with the
first request, steps while any stream is unfinished, and sleeps otherwise.

- Validation (tokenizing included) runs in the consumer's thread, so a bad request
  raises there and nothing of it is queued.
- A stream that is closed, left (break, an exception), interrupted (KeyboardInterrupt
  while its consumer waits) or cancelled (an asyncio task) aborts its request, which
  frees its KV blocks at the next step; the interrupt then reaches the consumer. A
  closed stream yields nothing more. The loop holds every stream it feeds, so one
  obtained from `submit` and never read must be closed (`LLM.stream`'s text streams
  close themselves when dropped).
- Outputs of requests added to the engine core directly (`engine.add_request`, not
  through the loop) are not taken from their owner: when the loop goes idle it hands
  them back to the core, so the owner's next `engine.step()` returns them.
- If a step itself raises (the core contains per-request failures, so this is a bug),
  every stream's request ends with finish_reason "error" and the message, and the
  loop goes on serving new requests.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from typing import Iterable, Optional

from ..sampling_params import SamplingParams
from .request import Request, RequestOutput

POLL_SECONDS = 0.1  # a waiting consumer checks this often that the loop thread is alive


class EngineLoopError(RuntimeError):
    """The loop thread died; the message says why."""


class RequestStream:
    """The outputs of one request (all its samples), in order; ends when every sample has
    finished. Iterate it (sync), or `async for` it when submitted with `aio_loop`."""

    def __init__(self, loop: "EngineLoop", request_id: str, num_samples: int,
                 aio_loop: Optional[asyncio.AbstractEventLoop] = None):
        self.request_id, self.num_samples = request_id, num_samples
        self._loop, self._aio_loop = loop, aio_loop
        self._queue = asyncio.Queue() if aio_loop is not None else queue.SimpleQueue()
        self._unfinished = set(range(num_samples))  # sample indices still running (consumer side)
        self._delivered_final = 0  # finished outputs handed over (loop side)
        self.closed = False
        self.shut_down = False  # closed by EngineLoop.shutdown, not by its consumer

    # -- loop side ------------------------------------------------------------------

    def _put(self, output: RequestOutput) -> bool:
        """Deliver an output; True when it was the request's last."""
        self._delivered_final += output.finished
        if self._aio_loop is not None:
            try:
                self._aio_loop.call_soon_threadsafe(self._queue.put_nowait, output)
            except RuntimeError:  # the consumer's event loop is closed: nobody reads this
                self.closed = True
                self._loop._abandon(self)
        else:
            self._queue.put(output)
        return self._delivered_final >= self.num_samples

    # -- consumer side --------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def _take(self, output: RequestOutput) -> RequestOutput:
        if output.finished:
            self._unfinished.discard(output.index)
        return output

    def get(self) -> Optional[RequestOutput]:
        """The next output, waiting for it (sync streams only); None once the stream is closed."""
        while not self.closed:
            try:
                return self._take(self._queue.get(timeout=POLL_SECONDS))
            except queue.Empty:
                self._loop.check_alive()
        if self.shut_down:
            raise EngineLoopError(f"request {self.request_id!r} was aborted: the engine loop was shut down")
        return None

    def __iter__(self):
        try:
            while not self.finished:
                output = self.get()
                if output is None:
                    return
                yield output
        finally:
            self.close()

    async def __aiter__(self):
        try:
            while not self.finished and not self.closed:
                yield self._take(await self._queue.get())
            if self.shut_down:
                raise EngineLoopError(f"request {self.request_id!r} was aborted: the engine loop was shut down")
        finally:
            self.close()

    def close(self) -> None:
        """Stop reading: the request is aborted if unfinished (its KV blocks are freed at
        the next step). Never blocks: the loop thread does the abort, so an event loop
        closing a stream does not wait for a step to end."""
        if not self.closed:
            self.closed = True
            if not self.finished:
                self._loop._abandon(self)


class EngineLoop:
    def __init__(self, engine):
        self.engine = engine
        self._streams: dict = {}  # request id -> RequestStream, for requests submitted here
        self._foreign: list = []  # outputs of requests added to the core directly
        self._abandoned: queue.SimpleQueue = queue.SimpleQueue()  # streams closed before their end
        self._lock = threading.RLock()  # taken before the engine's lock, never after it
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._stopping = False

    # -- consumers ------------------------------------------------------------------

    def submit(self, prompt, params: Optional[SamplingParams] = None, request_id: Optional[str] = None, *,
               final_output_only: bool = False, aio_loop=None) -> RequestStream:
        """Validate and queue one request; its stream. TypeError/ValueError queue nothing."""
        request = self.engine.make_request(prompt, params, request_id, final_output_only)
        return self.submit_requests([request], aio_loop)[0]

    def submit_requests(self, requests: Iterable[Request], aio_loop=None) -> list:
        """Queue requests made (so validated) by `engine.make_request`, all or none."""
        requests = list(requests)
        self.check_alive()
        with self._lock:
            ids = [r.request_id for r in requests if r.request_id is not None]
            taken = [i for i in ids if i in self._streams or self.engine.is_active(i)]
            if taken or len(set(ids)) < len(ids):
                raise ValueError(f"request_id {(taken or ids)[0]!r} is already in use")
            streams = []
            for request in requests:
                request_id = self.engine.enqueue(request)
                stream = RequestStream(self, request_id, request.params.n, aio_loop)
                self._streams[request_id] = stream
                streams.append(stream)
        self._start()
        self._wake.set()
        return streams

    def abort(self, request_id: str) -> None:
        """End a request submitted here; its stream gets nothing more."""
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.closed = True  # dropped from _streams when the abort's outputs come
            self.engine.abort(request_id)
        self._wake.set()

    def _abandon(self, stream: RequestStream) -> None:
        """Abort a closed stream's request from the loop thread, soon (takes no lock, so an
        event loop closing a stream never waits for a step to end)."""
        self._abandoned.put(stream)
        self._wake.set()

    def num_waiting(self) -> int:
        return self.engine.num_waiting()

    def check_alive(self) -> None:
        if self._error is not None:
            raise EngineLoopError(f"the engine loop stopped: {type(self._error).__name__}: {self._error}")

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort every request submitted here and stop the loop thread."""
        for request_id, stream in list(self._streams.items()):
            stream.shut_down = not stream.closed
            self.abort(request_id)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the loop thread ------------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="fuselm-engine-loop", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._wake.clear()
                while not self._abandoned.empty():
                    stream = self._abandoned.get()
                    if self._streams.get(stream.request_id) is stream:  # not a new request of that id
                        self.abort(stream.request_id)
                if not self._has_work():
                    self._hand_back_foreign()
                    self._wake.wait()
                    continue
                self._route(self._step())
        except BaseException as err:  # noqa: BLE001 - consumers learn it from check_alive
            self._error = err
            raise

    def _has_work(self) -> bool:
        with self._lock:
            return bool(self._streams) and self.engine.has_unfinished()

    def _step(self) -> list:
        try:
            return self.engine.step()
        except Exception as err:  # noqa: BLE001 - end the streams' requests, keep serving
            return self._fail_all(f"engine step failed: {type(err).__name__}: {err}")

    def _fail_all(self, message: str) -> list:
        with self._lock:
            streams = list(self._streams.values())
        outputs = []
        for stream in streams:
            self.engine.abort(stream.request_id)
            outputs += [RequestOutput(stream.request_id, None, [], "", [], finish_reason="error",
                                      error=message, index=index) for index in range(stream.num_samples)]
        return outputs

    def _route(self, outputs: list) -> None:
        with self._lock:
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is None:  # a request added to the engine core directly
                    self._foreign.append(output)
                elif stream.closed:  # aborted by its consumer: the outputs are not wanted
                    stream._delivered_final += output.finished
                    if stream._delivered_final >= stream.num_samples:
                        del self._streams[output.request_id]
                elif stream._put(output):
                    del self._streams[output.request_id]

    def _hand_back_foreign(self) -> None:
        with self._lock:
            foreign, self._foreign = self._foreign, []
        if foreign:
            self.engine.return_outputs(foreign)
