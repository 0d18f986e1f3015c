"""`fuselm serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over `fuselm.LLM`.

    fuselm serve --model smollm2-135m --port 8000          # or: python -m fuselm.serve
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="smollm2-135m", messages=[...], stream=True)

The server is one more consumer of the engine loop (runtime/engine_loop.py), as vLLM's
OpenAI server is of its AsyncLLM: each HTTP request submits its prompts and reads its
own stream on the event loop, continuous batching serves them together, and a client
that hangs up aborts its requests, freeing their KV blocks.

    protocol.py    request bodies -> SamplingParams; outputs -> responses and chunks
    generation.py  admission (503), submission, reading outputs, disconnects
    app.py         the routes, streaming as Server-Sent Events, the API-key check
    metrics.py     /metrics in Prometheus' text format, vLLM's names under `fuselm:`
    errors.py      OpenAI's error body for every refusal
    server.py      `run` (the CLI's) and `BackgroundServer` (tests, benchmarks)

FastAPI and uvicorn are the `serve` extra: importing `fuselm` does not import them.
"""
from .app import build_app
from .server import BackgroundServer, run

__all__ = ["run", "build_app", "BackgroundServer"]
