"""One API call served by the engine loop, from the event loop: admit, submit, read, abort.

- Admission: a call that would make more than `max_waiting` requests wait for the engine
  is refused (503, Retry-After) before anything is queued. The count is the engine's
  waiting queue plus the calls being submitted at that moment, so concurrent calls
  cannot all slip in under the limit.
- Submission: validation (tokenizing, the context check) runs on the event loop and
  raises 400 there; queuing runs in a worker thread, because it takes the engine's lock,
  which a step holds for as long as a forward pass takes.
- Reading: `outputs` yields (prompt index, RequestOutput) from all of a call's requests
  as they come and times them into the metrics (time to first token, latency).
- Aborting: closing a call (a finished response, a client that hung up, a cancelled
  task) aborts its unfinished requests, which frees their KV blocks at the next step.
  A non-streaming call learns of a disconnect by racing its work against the client's
  disconnect message (`until_disconnected`); a streaming one is cancelled by Starlette.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable

from fastapi import Request

from ..sampling_params import SamplingParams
from .errors import bad_request, overloaded
from .metrics import ServerMetrics

RETRY_AFTER_SECONDS = 1


class ClientDisconnected(Exception):
    """The client hung up before its answer was ready; its requests were aborted."""


@dataclass
class Call:
    """The requests of one API call: one per prompt, each with its `n` samples."""

    call_id: str
    streams: list  # a RequestStream per prompt
    prompt_lengths: list  # tokens per prompt
    n: int
    started: float = field(default_factory=time.perf_counter)

    @property
    def num_choices(self) -> int:
        return len(self.streams) * self.n

    def close(self) -> None:
        """Abort whatever is unfinished (a no-op for finished streams)."""
        for stream in self.streams:
            stream.close()


class EngineFront:
    def __init__(self, llm, max_waiting: int, metrics: ServerMetrics):
        self.llm, self.max_waiting, self.metrics = llm, max_waiting, metrics
        self._submitting = 0  # requests between admission and the engine's waiting queue

    async def submit(self, prompts: list, params: SamplingParams, id_prefix: str, argument: str = "prompt") -> Call:
        """Validate every prompt (400 on the first bad one), admit the call (503 when the
        queue is full) and queue its requests, all or none."""
        call_id = f"{id_prefix}{uuid.uuid4().hex}"
        requests = [self._make_request(prompt, params, f"{call_id}-{i}",
                                       argument if len(prompts) == 1 else f"{argument}[{i}]")
                    for i, prompt in enumerate(prompts)]
        queued = self.llm.loop.num_waiting() + self._submitting
        if queued + len(requests) > self.max_waiting:
            raise overloaded(queued, RETRY_AFTER_SECONDS)
        self._submitting += len(requests)
        try:
            streams = await asyncio.to_thread(self.llm.loop.submit_requests, requests, asyncio.get_running_loop())
        finally:
            self._submitting -= len(requests)
        return Call(call_id, streams, [len(r.prompt_token_ids) for r in requests], params.n)

    def _make_request(self, prompt, params: SamplingParams, request_id: str, argument: str):
        try:
            return self.llm.engine.make_request(prompt, params, request_id, argument=argument)
        except (TypeError, ValueError) as err:
            raise bad_request(str(err), argument.split("[")[0]) from None

    async def outputs(self, call: Call) -> AsyncIterator[tuple]:
        """(prompt index, output) of every request of the call, as they come; timed."""
        first_token_seen = False
        try:
            async for prompt_index, output in _interleaved(call.streams):
                if not first_token_seen and output.token_ids:
                    first_token_seen = True
                    self.metrics.time_to_first_token.observe(time.perf_counter() - call.started)
                yield prompt_index, output
            self.metrics.request_latency.observe(time.perf_counter() - call.started)
        finally:
            call.close()


async def _interleaved(streams: list) -> AsyncIterator[tuple]:
    """(stream index, output) from several streams in the order the outputs arrive."""
    if len(streams) == 1:  # the usual case, without a task per output
        async for output in streams[0]:
            yield 0, output
        return
    iterators = [aiter(stream) for stream in streams]
    pending = {asyncio.ensure_future(anext(it)): i for i, it in enumerate(iterators)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index = pending.pop(task)
                try:
                    output = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(iterators[index]))] = index
                yield index, output
    finally:
        for task in pending:
            task.cancel()


async def until_disconnected(request: Request, work: Awaitable):
    """The result of `work`; ClientDisconnected if the client hangs up first (then `work`
    is cancelled, which aborts its requests)."""
    work = asyncio.ensure_future(work)
    hang_up = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({work, hang_up}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hang_up.cancel()
        if not work.done():
            work.cancel()
    if not work.done():
        raise ClientDisconnected()
    return work.result()


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: the next message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
