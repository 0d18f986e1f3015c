"""The OpenAI-compatible server (fuselm/serve), driven by the official `openai` client.

One real model for the module: SmolLM2-135M compiled once for cpu, served by two apps
over the same LLM, each uvicorn on a thread of this process at a free port: `server`
(open) and `guarded` (an API key, and at most one queued request). Answers are checked
against `LLM.generate` on the same engine, so the server must add nothing to them;
aborts are checked on the engine itself (its KV blocks and unfinished requests).
"""
import re
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from fuselm.api import compile_lm
from fuselm.llm import LLM
from fuselm.runtime.engine import LLMEngine
from fuselm.sampling_params import SamplingParams
from fuselm.serve import BackgroundServer, build_app

from test_engine import TEXT, ScriptedForward

pytestmark = pytest.mark.slow

MODEL = "smollm2-test"
KEY = "sk-test-key"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LONG = {"max_tokens": 200, "ignore_eos": True}  # a request that runs for many steps


@pytest.fixture(scope="module")
def llm(smollm2):
    forward = compile_lm(smollm2, "cpu", block_size=16, dtype=torch.float32, cache_dir=None)
    engine = LLMEngine(smollm2, "cpu", forward=forward, max_model_len=256, max_num_seqs=4)
    llm = LLM.from_engine(engine)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def server(llm):
    with BackgroundServer(build_app(llm, served_model_name=MODEL)) as running:
        yield running


@pytest.fixture(scope="module")
def guarded(llm):
    with BackgroundServer(build_app(llm, served_model_name=MODEL, api_key=KEY, max_waiting=1)) as running:
        yield running


def client(server, api_key="unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=120)


def wait_until_idle(engine, timeout: float = 20.0) -> None:
    """Every request ended and every KV block back in the free list."""
    deadline = time.monotonic() + timeout
    while engine.has_unfinished() or engine.kv.num_used_blocks:
        assert time.monotonic() < deadline, (f"{engine.kv.num_used_blocks} KV blocks held, "
                                             f"unfinished: {engine.has_unfinished()}")
        time.sleep(0.05)


# -- answers --------------------------------------------------------------------------


def test_completion_equals_llm_generate(server, llm):
    prompt = "The quick brown fox"
    reply = client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    expected = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24))[0]
    choice = reply.choices[0]
    assert (reply.object, reply.model, choice.index) == ("text_completion", MODEL, 0)
    assert choice.text == expected.text and choice.finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_completion_of_several_token_id_prompts_numbers_choices_per_prompt(server, llm):
    prompts = [llm.tokenizer.encode("1, 2, 3,"), llm.tokenizer.encode("The sky is")]
    reply = client(server).completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, n=2,
                                              logprobs=2)
    expected = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6))
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert [c.text for c in reply.choices] == [expected[0].text] * 2 + [expected[1].text] * 2
    assert all(len(c.logprobs.tokens) == 6 and len(c.logprobs.top_logprobs[0]) == 2 for c in reply.choices)
    assert reply.usage.prompt_tokens == sum(map(len, prompts))


def test_chat_answers_the_question(server):
    reply = client(server).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    message = reply.choices[0].message
    assert reply.object == "chat.completion" and message.role == "assistant"
    assert "Paris" in message.content


def test_chat_stream_deltas_add_up_to_the_answer(server, llm):
    api = client(server)
    whole = api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    chunks = list(api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
    assert usage_chunk.usage.prompt_tokens == len(llm.chat_prompt(QUESTION))


def test_models_lists_the_served_name(server):
    assert [model.id for model in client(server).models.list().data] == [MODEL]


def test_health(server):
    assert httpx.get(f"{server.url}/health").status_code == 200


# -- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize("options, param, words", [
    ({"temperature": -1}, "temperature", "temperature must be finite and >= 0"),
    ({"prompt": 3.5}, "prompt", "prompt must be a string"),
    ({"prompt": [[1, 2], ["x"]]}, "prompt", "token ids must be ints"),
    ({"prompt": "word " * 300}, "prompt", "too long"),
    ({"max_tokens": 1.5}, "max_tokens", "valid integer"),
    ({"echo": True}, "echo", "not supported"),
])
def test_invalid_requests_are_400_with_the_openai_error_body(server, options, param, words):
    request = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, **options}
    with pytest.raises(openai.BadRequestError) as refused:
        client(server).completions.create(**request)
    error = refused.value.body
    assert refused.value.status_code == 400 and set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"]


def test_bad_json_is_400(server):
    response = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"model": ',
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_another_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as refused:
        client(server).chat.completions.create(model="gpt-4", messages=QUESTION, max_tokens=2)
    assert refused.value.body["code"] == "model_not_found"


def test_api_key_is_required_on_v1_only(guarded):
    for key in ("wrong", None):
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        response = httpx.get(f"{guarded.url}/v1/models", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(guarded, "wrong").completions.create(model=MODEL, prompt="Hi", max_tokens=1)
    assert client(guarded, KEY).completions.create(model=MODEL, prompt="Hi", max_tokens=1).usage.completion_tokens == 1
    assert httpx.get(f"{guarded.url}/health").status_code == 200


def test_a_full_queue_is_503_with_retry_after(guarded, llm):
    """8 concurrent requests, 4 run at once (max_num_seqs) and 1 may wait: some are refused."""
    def send(results: list) -> None:
        results.append(httpx.post(f"{guarded.url}/v1/completions", timeout=120,
                                  headers={"Authorization": f"Bearer {KEY}"},
                                  json={"model": MODEL, "prompt": "Count: 1, 2,", "max_tokens": 32,
                                        "ignore_eos": True, "temperature": 0}))

    results: list = []
    threads = [threading.Thread(target=send, args=(results,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    refused = [r for r in results if r.status_code == 503]
    served = [r for r in results if r.status_code == 200]
    assert refused and len(refused) + len(served) == 8
    assert all(r.headers["Retry-After"].isdigit() and r.json()["error"]["code"] == "overloaded" for r in refused)
    assert all(r.json()["usage"]["completion_tokens"] == 32 for r in served)
    wait_until_idle(llm.engine)


def test_a_failed_generation_is_500_or_an_error_event(smollm2):
    """A forward pass that raises (the scripted model, on one token) ends the request
    with finish_reason "error": the client gets the message, not a truncated answer."""
    script = smollm2.tokenizer.encode(TEXT * 8)
    forward = ScriptedForward(script, smollm2.config.vocab_size)
    forward.fail_on_token = next(t for t in range(smollm2.config.vocab_size) if t not in script)
    poisoned = [forward.fail_on_token] + script[1:3]
    failing = LLM.from_engine(LLMEngine(smollm2, "cpu", forward=forward, max_model_len=256, max_num_seqs=4))
    with BackgroundServer(build_app(failing, served_model_name=MODEL)) as running:
        api = client(running)
        with pytest.raises(openai.InternalServerError, match="scripted failure"):
            api.completions.create(model=MODEL, prompt=poisoned, max_tokens=8, temperature=0)
        with pytest.raises(openai.APIError, match="scripted failure"):
            list(api.completions.create(model=MODEL, prompt=poisoned, max_tokens=8, temperature=0, stream=True))
        assert api.completions.create(model=MODEL, prompt=script[:3], max_tokens=4, temperature=0).choices[0].text
    failing.close()


# -- disconnects ----------------------------------------------------------------------


def test_a_disconnect_mid_stream_aborts_the_request(server, llm):
    engine = llm.engine
    generated = engine.stats.generation_tokens
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.url}/v1/completions",
                         json={"model": MODEL, "prompt": "Once upon a time", "stream": True, **LONG}) as response:
            events = (line for line in response.iter_lines() if line.startswith("data: "))
            next(events), next(events)  # generation is under way; now hang up
    wait_until_idle(engine)
    assert engine.stats.generation_tokens - generated < LONG["max_tokens"]


def test_a_disconnect_while_waiting_for_the_answer_aborts_the_request(server, llm):
    engine = llm.engine
    generated = engine.stats.generation_tokens
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", timeout=httpx.Timeout(5, read=0.5),
                   json={"model": MODEL, "prompt": "Once upon a time", **LONG})
    wait_until_idle(engine)
    assert engine.stats.generation_tokens - generated < LONG["max_tokens"]


# -- metrics --------------------------------------------------------------------------

SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_]+="[^"]*"(,[a-zA-Z_]+="[^"]*")*\})? '
                    r'(-?[0-9.e+-]+|NaN|[+-]Inf)$')


def scrape(server) -> dict:
    """{sample name with labels: value}; every line must be a comment or a sample."""
    text = httpx.get(f"{server.url}/metrics").text
    samples = {}
    for line in text.splitlines():
        assert line.startswith("# ") or SAMPLE.match(line), f"not Prometheus text: {line!r}"
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_count_the_tokens_served(server):
    label = f'{{model_name="{MODEL}"}}'
    before = scrape(server)
    reply = client(server).completions.create(model=MODEL, prompt="The sky is", max_tokens=5, temperature=0)
    after = scrape(server)
    delta = {name: after[name] - before[name] for name in before}
    assert delta[f"fuselm:prompt_tokens_total{label}"] == reply.usage.prompt_tokens
    assert delta[f"fuselm:generation_tokens_total{label}"] == reply.usage.completion_tokens
    assert delta[f"fuselm:time_to_first_token_seconds_count{label}"] == 1
    assert after[f'fuselm:time_to_first_token_seconds_bucket{{model_name="{MODEL}",le="+Inf"}}'] == \
        after[f"fuselm:time_to_first_token_seconds_count{label}"]
    assert after[f"fuselm:num_requests_running{label}"] == 0
    assert 0 <= after[f"fuselm:kv_cache_usage_perc{label}"] <= 1


def test_python_m_fuselm_serve_is_the_cli_command():
    result = subprocess.run([sys.executable, "-m", "fuselm.serve", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--served-model-name" in result.stdout, result.stderr
