"""The routes of the OpenAI-compatible server, over one `fuselm.LLM`.

    POST /v1/completions        a prompt, a list of prompts, token ids or lists of them
    POST /v1/chat/completions   messages rendered through the model's chat template
    GET  /v1/models             the one model served, under its served name
    GET  /health                200 while the engine loop runs, 503 after it died
    GET  /metrics               Prometheus text (metrics.py)

With an API key, every /v1 request needs `Authorization: Bearer KEY` (401 otherwise);
/health and /metrics stay open, as vLLM's do, for probes and scrapers that hold no key.

A streamed answer is Server-Sent Events: one `data: {chunk}` per step that produced
text, a last chunk with the usage when `stream_options.include_usage` is set, then
`data: [DONE]`. Chat streams open with a chunk carrying each choice's role. A
generation that fails mid-stream sends `data: {"error": ...}` and ends.
"""
from __future__ import annotations

import hmac
import json
import time
from typing import Optional

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from .errors import APIError, bad_request, generation_failed, install_error_handlers, invalid_api_key, \
    model_not_found, shutting_down
from .generation import Call, ClientDisconnected, EngineFront, until_disconnected
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, ChatFormat, CompletionFormat, CompletionRequest, envelope, \
    finish_reason, model_card, usage

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that hung up; nobody reads it


def build_app(llm, *, served_model_name: str, api_key: Optional[str] = None, max_waiting: int = 256) -> FastAPI:
    """An app serving `llm` (built on any engine) as `served_model_name`; it does not own
    `llm`: whoever built it closes it."""
    if not isinstance(max_waiting, int) or max_waiting < 1:
        raise ValueError(f"max_waiting must be an int >= 1 (requests allowed to queue), got {max_waiting!r}")
    if not served_model_name:
        raise ValueError("served_model_name is empty")
    app = FastAPI(title="fuselm", summary="OpenAI-compatible server", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    if api_key:
        app.add_middleware(APIKeyCheck, api_key=api_key)
    metrics = ServerMetrics(llm.engine, served_model_name)
    server = OpenAIServer(llm, served_model_name, EngineFront(llm, max_waiting, metrics))
    started = int(time.time())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        server.check_model(body.model)
        params = body.to_sampling_params()
        call = await server.front.submit(body.prompts(), params, CompletionFormat.id_prefix)
        return await server.respond(request, call, server.completion_format, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        server.check_model(body.model)
        params = body.to_sampling_params()
        prompt = server.chat_prompt(body)
        call = await server.front.submit([prompt], params, ChatFormat.id_prefix, argument="messages")
        return await server.respond(request, call, server.chat_format, body)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(served_model_name, started, llm.engine.max_model_len)]}

    @app.get("/health")
    async def health():
        try:
            llm.loop.check_alive()
        except RuntimeError as err:
            return APIError(503, str(err), type="server_error").response()
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


class OpenAIServer:
    """Turns a call's outputs into an OpenAI response or event stream."""

    def __init__(self, llm, model_name: str, front: EngineFront):
        self.llm, self.model_name, self.front = llm, model_name, front
        self.completion_format = CompletionFormat(llm.tokenizer)
        self.chat_format = ChatFormat(llm.tokenizer)

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.model_name:
            raise model_not_found(name)

    def chat_prompt(self, body: ChatCompletionRequest) -> list:
        try:
            return self.llm.chat_prompt([message.for_template() for message in body.messages])
        except (ValueError, TypeError, jinja2.TemplateError) as err:
            raise bad_request(f"messages cannot be rendered by the chat template: {err}", "messages") from None

    async def respond(self, request: Request, call: Call, fmt, body):
        if body.stream:
            return StreamingResponse(self.events(call, fmt, body.include_usage), media_type="text/event-stream")
        try:
            return JSONResponse(await until_disconnected(request, self.complete(call, fmt)))
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED_REQUEST)

    async def complete(self, call: Call, fmt) -> dict:
        finals = {}
        try:
            async for prompt_index, output in self.front.outputs(call):
                if output.finished:
                    failure = failure_of(output)
                    if failure is not None:
                        raise failure
                    finals[prompt_index * call.n + output.index] = output
        finally:
            call.close()  # after a failure, the call's other samples are not wanted
        choices = [fmt.choice(index, output.text, logprob_entries(output, 0), finish_reason(output))
                   for index, output in sorted(finals.items())]
        completion_tokens = sum(len(output.token_ids) for output in finals.values())
        return envelope(call.call_id, fmt.object_name, self.model_name, choices,
                        usage=usage(sum(call.prompt_lengths), completion_tokens))

    async def events(self, call: Call, fmt, include_usage: bool):
        """The SSE body of a streamed call; closing it (a disconnect) aborts the call."""
        tokens_sent, chars_sent = {}, {}  # per choice index
        try:
            opening = fmt.opening_chunk_choices(call.num_choices)
            if opening:
                yield self._chunk(call, fmt, opening)
            async for prompt_index, output in self.front.outputs(call):
                failure = failure_of(output)
                if failure is not None:
                    yield sse(failure.body())
                    break
                index = prompt_index * call.n + output.index
                entries = logprob_entries(output, tokens_sent.get(index, 0))
                if output.new_text or output.finished or entries:
                    tokens_sent[index] = len(output.token_ids)
                    choice = fmt.chunk_choice(index, output.new_text, entries, finish_reason(output),
                                              chars_sent.get(index, 0))
                    chars_sent[index] = chars_sent.get(index, 0) + len(output.new_text)
                    yield self._chunk(call, fmt, [choice])
            else:
                if include_usage:
                    yield self._chunk(call, fmt, [], usage=usage(sum(call.prompt_lengths), sum(tokens_sent.values())))
            yield "data: [DONE]\n\n"
        finally:
            call.close()

    def _chunk(self, call: Call, fmt, choices: list, **extra) -> str:
        return sse(envelope(call.call_id, fmt.chunk_object_name, self.model_name, choices, **extra))


def failure_of(output) -> Optional[APIError]:
    """A request that ended in error is the server's failure (500); one aborted without
    its client asking was ended by a shutdown (503)."""
    if output.finish_reason == "error":
        return generation_failed(output.error or "unknown error")
    if output.finish_reason == "abort":
        return shutting_down()
    return None


def logprob_entries(output, start: int) -> Optional[list]:
    """(token id, TokenLogprobs) of the output's tokens from `start` on; None without logprobs."""
    if output.logprobs is None:
        return None
    return list(zip(output.token_ids[start:], output.logprobs[start:])) or None


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class APIKeyCheck:
    """ASGI middleware refusing /v1 requests without the key (401), before their body is
    read, so a request without the key learns nothing else about the server."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == "/v1" or path.startswith("/v1/")) and not self._authorized(scope):
            await invalid_api_key().response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, self.expected)
