"""Serving load benchmark: `fuselm serve` under many concurrent clients, against llama.cpp's
server on the same GGUF file, measured in one run.

    python benchmarks/serve_load.py                              # 500 requests, 32 clients
    python benchmarks/serve_load.py --requests 40 --clients 8    # a quick check

The workload (fixed seed): N requests with prompts of 8-256 tokens (whole-word tokens
of SmolLM2's vocabulary, so the text tokenizes back to the same ids) and 16-64 new
tokens each, greedy, streamed through /v1/completions by C clients that each send their
next request when the last one ends. fuselm serves SmolLM2-135M on cpu with its KV cache
sized at 30% (--kv-fraction) of what the C concurrent requests would need at once, so
the scheduler must queue and preempt.

Each server runs in a subprocess of this script (fuselm's is this script with
--serve-only), with the same threads, while the clients run here. Checks on fuselm:
- every request completes;
- each output equals the same request served alone afterwards through the same server
  (greedy, so batching and preemption must not change it); where they differ, the
  alone run's top-two logprob gap at the first differing token must be under NEAR_TIE
  (summation order may flip a near-tie), and such requests are counted;
- no KV blocks are held and no request is running or waiting at the end (/metrics);
- 20 clients that hang up mid-stream leave nothing behind.
Printed: requests/s, output tokens/s, p50/p99 latency and time to first token, and the
ratio fuselm / llama.cpp (> 1: fuselm faster). Nothing here is a test: speed is never
asserted in CI.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
BLOCK_SIZE = 16
NEAR_TIE = 1e-3
STARTUP_TIMEOUT_S = 900  # loading and compiling the model on a busy machine
IDLE_TIMEOUT_S = 60


@dataclass
class Job:
    prompt: str
    prompt_tokens: int
    max_tokens: int


@dataclass
class Result:
    text: str = ""
    tokens: list = field(default_factory=list)  # token strings, when logprobs were asked for
    top: list = field(default_factory=list)  # their top logprobs, {token string: logprob}
    completion_tokens: int = 0
    finish_reason: Optional[str] = None
    ttft: float = 0.0
    latency: float = 0.0
    error: Optional[str] = None


# -- the workload ---------------------------------------------------------------------


def make_workload(args, tokenizer) -> list:
    """Prompts of whole-word tokens (" house", " river"): each is its own pre-token, so
    the decoded text encodes back to the same ids on both servers."""
    words = [i for i in range(tokenizer.vocab_size) if re.fullmatch(r" [a-z]{3,10}", tokenizer.decode([i]) or "")]
    rng = random.Random(args.seed)
    jobs = []
    for _ in range(args.requests):
        ids = rng.choices(words, k=rng.randint(args.min_prompt, args.max_prompt))
        jobs.append(Job(tokenizer.decode(ids).strip(), len(ids), rng.randint(args.min_new, args.max_new)))
    return jobs


def kv_cache_bytes(args, jobs: list, config) -> int:
    """--kv-fraction of the KV cache that `clients` average requests need at once, but at
    least one full context (the engine refuses less)."""
    import torch

    from fuselm.runtime.kv_cache import kv_bytes_per_token

    mean_tokens = statistics.mean(job.prompt_tokens + job.max_tokens for job in jobs)
    tokens = max(args.kv_fraction * args.clients * mean_tokens, args.max_model_len + BLOCK_SIZE)
    return int(tokens * kv_bytes_per_token(config, torch.float32))


# -- the servers ----------------------------------------------------------------------


def serve_only(args) -> None:
    """The fuselm server process (--serve-only): SmolLM2 on cpu with the given KV cache."""
    import torch
    import uvicorn

    from fuselm.llm import LLM
    from fuselm.serve import build_app

    torch.set_num_threads(args.threads)
    llm = LLM(MODEL, "cpu", max_model_len=args.max_model_len, max_num_seqs=args.clients,
              kv_cache_bytes=args.kv_cache_bytes)
    print(f"fuselm: {llm.engine.kv.num_blocks} KV blocks of {BLOCK_SIZE} tokens", flush=True)
    app = build_app(llm, served_model_name=MODEL, max_waiting=max(args.requests, args.clients))
    try:
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    finally:
        llm.close()


def thread_env(threads: int) -> dict:
    return dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads), KMP_BLOCKTIME="0",
                HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def start_fuselm(args, kv_bytes: int, port: int) -> subprocess.Popen:
    command = [sys.executable, __file__, "--serve-only", "--port", str(port), "--threads", str(args.threads),
               "--clients", str(args.clients), "--requests", str(args.requests),
               "--max-model-len", str(args.max_model_len), "--kv-cache-bytes", str(kv_bytes)]
    return subprocess.Popen(command, env=thread_env(args.threads), cwd=ROOT)


def start_llama_cpp(args, port: int) -> Optional[subprocess.Popen]:
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        return None
    from fuselm.models import fetch

    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(fetch(MODEL)), "--port", str(port),
               "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
               "--n_ctx", str(args.max_model_len), "--model_alias", MODEL,
               # its default cancels the running request whenever another arrives: queue them instead
               "--interrupt_requests", "False"]
    return subprocess.Popen(command, env=thread_env(args.threads), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def wait_ready(http, url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server at {url} exited with status {process.returncode}")
        try:
            if (await http.get(f"{url}/v1/models")).status_code == 200:
                return
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        await asyncio.sleep(1)
    raise RuntimeError(f"the server at {url} did not start in {STARTUP_TIMEOUT_S} s")


# -- the clients ----------------------------------------------------------------------


async def complete(http, url: str, job: Job, logprobs: Optional[int] = None, hang_up_after: int = 0) -> Result:
    """One streamed greedy completion; `hang_up_after` > 0 closes the connection after
    that many chunks."""
    body = {"model": MODEL, "prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    if logprobs is not None:
        body["logprobs"] = logprobs
    result, start, chunks, text_chunks = Result(), time.perf_counter(), 0, 0
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            result.error = f"status {response.status_code}: {(await response.aread())[:200]!r}"
            return result
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                result.error = chunk["error"]["message"]
                break
            for choice in chunk.get("choices") or ():
                read_choice(result, choice, start)
                text_chunks += bool(choice.get("text"))
            if chunk.get("usage"):
                result.completion_tokens = chunk["usage"]["completion_tokens"]
            chunks += 1
            if chunks == hang_up_after:
                return result
    result.latency = time.perf_counter() - start
    result.completion_tokens = result.completion_tokens or text_chunks  # a server without usage in streams
    return result


def read_choice(result: Result, choice: dict, start: float) -> None:
    if choice.get("text") and not result.ttft:
        result.ttft = time.perf_counter() - start
    result.text += choice.get("text") or ""
    if choice.get("logprobs"):
        result.tokens += choice["logprobs"]["tokens"]
        result.top += choice["logprobs"]["top_logprobs"]
    result.finish_reason = choice.get("finish_reason") or result.finish_reason


async def run_load(url: str, jobs: list, clients: int) -> tuple:
    """(results in job order, wall seconds) for `clients` concurrent clients."""
    import httpx

    results: list = [None] * len(jobs)
    next_job = iter(range(len(jobs)))

    async def client(http) -> None:
        for index in next_job:
            results[index] = await complete(http, url, jobs[index])

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=None, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return results, time.perf_counter() - start


# -- the checks -----------------------------------------------------------------------


async def engine_state(http, url: str) -> dict:
    text = (await http.get(f"{url}/metrics")).text
    values = {}
    for line in text.splitlines():
        if line.startswith("fuselm:") and "{" in line:
            name, value = line.split("{", 1)[0], float(line.rsplit(" ", 1)[1])
            values[name] = value
    return values


async def wait_idle(http, url: str) -> dict:
    """The engine's gauges once nothing runs, waits or holds KV blocks (or at the timeout)."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while True:
        state = await engine_state(http, url)
        busy = (state["fuselm:num_requests_running"], state["fuselm:num_requests_waiting"],
                state["fuselm:kv_cache_usage_perc"])
        if not any(busy) or time.monotonic() > deadline:
            return {"running": busy[0], "waiting": busy[1], "kv_usage": busy[2],
                    "preemptions so far": state["fuselm:num_preemptions_total"]}
        await asyncio.sleep(0.1)


def compare_with_alone(loaded: Result, alone: Result) -> str:
    """"same", "near-tie" (the alone run's top two logprobs are within NEAR_TIE at the
    token where the texts part) or "different". The load ran without logprobs, so as
    not to slow it: the token is found from the first differing character."""
    if loaded.text == alone.text:
        return "same"
    parting = next((i for i, (a, b) in enumerate(zip(loaded.text, alone.text)) if a != b),
                   min(len(loaded.text), len(alone.text)))
    end = 0
    for token, top in zip(alone.tokens, alone.top):
        end += len(token)
        if end > parting:
            best = sorted(top.values(), reverse=True)
            return "near-tie" if len(best) > 1 and best[0] - best[1] < NEAR_TIE else "different"
    return "different"


async def check_fuselm(url: str, jobs: list, results: list, args) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=None) as http:
        after_load = await wait_idle(http, url)
        hang_ups = [complete(http, url, Job(job.prompt, job.prompt_tokens, 64), hang_up_after=2)
                    for job in jobs[:args.disconnects]]
        await asyncio.gather(*hang_ups)
        after_hang_ups = await wait_idle(http, url)
        verdicts = []
        for job, loaded in zip(jobs, results):
            alone = await complete(http, url, job, logprobs=2)
            verdicts.append(compare_with_alone(loaded, alone))
    return {"after_load": after_load, "after_hang_ups": after_hang_ups,
            "verdicts": {v: verdicts.count(v) for v in ("same", "near-tie", "different")}}


# -- a run ----------------------------------------------------------------------------


def summary(results: list, wall: float) -> dict:
    done = [r for r in results if r is not None and r.error is None and r.finish_reason in ("stop", "length")]
    latencies = sorted(r.latency for r in done) or [float("nan")]
    ttfts = sorted(r.ttft for r in done) or [float("nan")]
    return {"completed": len(done), "errors": [r.error for r in results if r is not None and r.error][:3],
            "requests_per_s": len(done) / wall, "tokens_per_s": sum(r.completion_tokens for r in done) / wall,
            "latency_p50": percentile(latencies, 50), "latency_p99": percentile(latencies, 99),
            "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99)}


def percentile(ordered: list, p: float) -> float:
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def serve_and_load(name: str, process: subprocess.Popen, url: str, jobs: list, args,
                         check: bool) -> Optional[dict]:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=None) as http:
            await wait_ready(http, url, process)
            for job in (jobs[0], Job(jobs[0].prompt, jobs[0].prompt_tokens, 4)):  # warm-up
                await complete(http, url, job)
        print(f"{name}: serving; {len(jobs)} requests from {args.clients} clients ...", flush=True)
        results, wall = await run_load(url, jobs, args.clients)
        stats = summary(results, wall)
        if check:
            stats.update(await check_fuselm(url, jobs, results, args))
        return stats
    finally:
        stop(process)


def report(args, kv_bytes: int, fuselm: dict, llama: Optional[dict]) -> None:
    print(f"\n{args.requests} requests, {args.clients} clients, prompts {args.min_prompt}-{args.max_prompt} tokens, "
          f"{args.min_new}-{args.max_new} new tokens, greedy; {args.threads} threads per server; fuselm KV cache "
          f"{kv_bytes / 2**20:.1f} MiB ({args.kv_fraction:.0%} of what {args.clients} requests need at once)")
    rows = [("fuselm fp32 (cpu)", fuselm)] + ([("llama.cpp Q4_1", llama)] if llama else [])
    print(f"{'server':<20}{'done':>6}{'req/s':>8}{'tok/s':>8}{'lat p50':>9}{'lat p99':>9}{'ttft p50':>9}{'ttft p99':>9}")
    for name, s in rows:
        print(f"{name:<20}{s['completed']:>6}{s['requests_per_s']:>8.2f}{s['tokens_per_s']:>8.1f}"
              f"{s['latency_p50']:>9.2f}{s['latency_p99']:>9.2f}{s['ttft_p50']:>9.2f}{s['ttft_p99']:>9.2f}")
    for name, s in rows:
        if s["completed"] < args.requests:
            print(f"WARNING: {name} completed {s['completed']} of {args.requests} requests "
                  f"(first errors: {s['errors']}); its rates are not comparable")
    if llama:
        print(f"fuselm / llama.cpp: requests/s x{fuselm['requests_per_s'] / llama['requests_per_s']:.2f}, "
              f"tokens/s x{fuselm['tokens_per_s'] / llama['tokens_per_s']:.2f}")
    else:
        print("llama.cpp: skipped, llama-cpp-python is not installed (pip install 'llama-cpp-python[server]'; "
              "it builds llama.cpp from source)")
    print(f"\nfuselm checks: {fuselm['completed']}/{args.requests} completed"
          + (f" (errors: {fuselm['errors']})" if fuselm["errors"] else ""))
    verdicts = fuselm["verdicts"]
    print(f"  equal to the request served alone: {verdicts['same']}, near-ties: {verdicts['near-tie']}, "
          f"different: {verdicts['different']}")
    print(f"  after the load: {fuselm['after_load']}")
    print(f"  after {args.disconnects} clients hung up mid-stream: {fuselm['after_hang_ups']}")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of each server")
    parser.add_argument("--min-prompt", type=int, default=8)
    parser.add_argument("--max-prompt", type=int, default=256)
    parser.add_argument("--min-new", type=int, default=16)
    parser.add_argument("--max-new", type=int, default=64)
    parser.add_argument("--kv-fraction", type=float, default=0.3)
    parser.add_argument("--disconnects", type=int, default=20)
    parser.add_argument("--skip-llama-cpp", action="store_true")
    parser.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--kv-cache-bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-model-len", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.max_model_len = args.max_model_len or args.max_prompt + args.max_new
    return args


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(ROOT))
    if args.serve_only:
        serve_only(args)
        return
    from fuselm.models import load

    loaded = load(MODEL)
    jobs = make_workload(args, loaded.tokenizer)
    kv_bytes = kv_cache_bytes(args, jobs, loaded.config)
    del loaded  # the weights: the servers load their own
    port = free_port()
    fuselm = asyncio.run(serve_and_load("fuselm", start_fuselm(args, kv_bytes, port), f"http://127.0.0.1:{port}",
                                        jobs, args, check=True))
    llama = None
    if not args.skip_llama_cpp:
        port = free_port()
        process = start_llama_cpp(args, port)
        if process is not None:
            llama = asyncio.run(serve_and_load("llama.cpp", process, f"http://127.0.0.1:{port}", jobs, args,
                                               check=False))
    report(args, kv_bytes, fuselm, llama)


if __name__ == "__main__":
    main()
