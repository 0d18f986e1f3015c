"""One engine, many consumers, and what hostile callers do to it (scripted model, fast).

The scripted forward (see test_engine.py) continues SCRIPT whatever the batch, so every
request's expected tokens are known. Each test here failed on the engine before the
engine loop: consumers lost each other's outputs or spun forever, an interrupted step
left requests that the next step ran with zero tokens (a segfault on the compiled
model; the subprocess test checks that case on a real compiled model), interrupted
calls leaked KV blocks, and odd prompts were used silently.
"""
import _thread
import gc
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import FrozenInstanceError

import pytest

from fuselm.llm import LLM
from fuselm.runtime.engine import LLMEngine
from fuselm.sampling_params import SamplingParams

from test_engine import ScriptedForward, TEXT

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


class CheckedForward(ScriptedForward):
    """The scripted model, refusing a forward pass with no tokens (which crashes the
    compiled model) and optionally slowed down so consumers overlap."""

    delay = 0.0

    def __call__(self, input_ids, *args):
        assert input_ids.numel() > 0, "a forward pass with zero tokens was issued"
        time.sleep(self.delay)
        return super().__call__(input_ids, *args)


@pytest.fixture(scope="module")
def script(smollm2):
    return smollm2.tokenizer.encode(TEXT * 8)


def make_engine(smollm2, script, **options):
    forward = CheckedForward(script, smollm2.config.vocab_size)
    options = {"max_model_len": 256, "max_num_seqs": 8, **options}
    return LLMEngine(smollm2, "cpu", forward=forward, **options), forward


def expected(script, start: int, count: int = 12) -> list:
    return script[start:start + count]


def drain(engine) -> dict:
    finished = {}
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                finished[(output.request_id, output.index)] = output
    return finished


# -- the engine core, single-threaded -----------------------------------------------


def test_interrupt_inside_sampling_leaves_the_engine_consistent(smollm2, script):
    engine, forward = make_engine(smollm2, script)
    a = engine.add_request(script[:5], GREEDY)
    b = engine.add_request(script[:9], GREEDY)
    engine.step()  # both prefilled and sampled once
    sampler = engine.sampler

    def interrupted(*args):
        engine.sampler = sampler
        raise KeyboardInterrupt

    engine.sampler = interrupted
    with pytest.raises(KeyboardInterrupt):
        engine.step()
    finished = drain(engine)
    assert finished[(a, 0)].token_ids == expected(script, 5)
    assert finished[(b, 0)].token_ids == expected(script, 9)
    assert engine.kv.num_used_blocks == 0 and not engine.requests


def test_an_unexpected_error_in_a_step_ends_that_steps_requests_and_serving_goes_on(smollm2, script):
    engine, _ = make_engine(smollm2, script)
    a = engine.add_request(script[:5], GREEDY)
    engine.step()
    utilization = engine.scheduler.kv_utilization

    def broken():
        engine.scheduler.kv_utilization = utilization
        raise RuntimeError("scheduler bug")

    engine.scheduler.kv_utilization = broken
    (output,) = engine.step()
    assert output.request_id == a and output.finish_reason == "error" and "scheduler bug" in output.error
    assert engine.kv.num_used_blocks == 0
    b = engine.add_request(script[:3], GREEDY)
    assert drain(engine)[(b, 0)].token_ids == expected(script, 3)


def test_automatic_ids_skip_ids_users_chose(smollm2, script):
    engine, _ = make_engine(smollm2, script)
    engine.add_request(script[:3], GREEDY, request_id="0")
    engine.add_request(script[:3], GREEDY, request_id="2")
    automatic = [engine.add_request(script[:3], GREEDY) for _ in range(3)]
    assert len(set(automatic) | {"0", "2"}) == 5
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(script[:3], GREEDY, request_id=automatic[0])
    assert len(drain(engine)) == 5


def test_no_bookkeeping_grows_with_requests(smollm2, script):
    engine, _ = make_engine(smollm2, script)
    for round_ in range(5):
        for i in range(4):
            engine.add_request(script[:4 + i], SamplingParams(temperature=1.0, seed=i, max_tokens=3, n=3))
        assert len(drain(engine)) == 12
    grown = {name: len(value) for name, value in vars(engine).items()
             if isinstance(value, (dict, list, set)) and len(value)}
    assert grown == {} and engine.kv.num_used_blocks == 0


# -- validation at the door ---------------------------------------------------------


@pytest.mark.parametrize("prompt, message", [
    (b"hi", "got bytes"),
    (None, "got NoneType"),
    ({"text": "hi"}, "dict with keys"),
    ({"prompt_token_ids": "hi"}, "dict with keys"),
    ([True, False], "token ids must be ints; got bool"),
    (["hi", 5], "token ids must be ints; got str"),
    ([1.0, 2.0], "token ids must be ints; got float"),
    (42, "got int"),
])
def test_prompts_of_the_wrong_type_are_refused(smollm2, script, prompt, message):
    engine, _ = make_engine(smollm2, script)
    with pytest.raises(TypeError, match=message):
        engine.add_request(prompt, GREEDY)
    assert not engine.has_unfinished()


def test_generate_names_the_prompt_that_is_wrong(smollm2, script):
    engine, forward = make_engine(smollm2, script)
    llm = LLM.from_engine(engine)
    with pytest.raises(TypeError, match=r"prompts\[1\] must be .* got int"):
        llm.generate(["hi", 5], GREEDY)
    with pytest.raises(TypeError, match="prompts must be a prompt or a list of prompts, got NoneType"):
        llm.generate(None, GREEDY)
    with pytest.raises(TypeError, match="sampling_params must be"):
        llm.generate(["hi"], "greedy")
    assert not engine.has_unfinished() and not forward.batches


def test_accepted_prompt_forms_agree(smollm2, script):
    engine, _ = make_engine(smollm2, script)
    llm = LLM.from_engine(engine)
    text = "The café on the corner"
    ids = smollm2.tokenizer.encode(text)
    outputs = llm.generate([text, ids, tuple(ids), {"prompt_token_ids": ids}, {"prompt": text}], GREEDY)
    assert len({tuple(o.token_ids) for o in outputs}) == 1
    assert outputs[0].prompt == text and outputs[1].prompt is None


def test_text_that_cannot_be_encoded_is_a_value_error(smollm2, script):
    engine, _ = make_engine(smollm2, script)
    with pytest.raises(ValueError, match="cannot be encoded as UTF-8.*surrogates not allowed"):
        engine.add_request("hi \ud800 there", GREEDY)


def test_sampling_params_are_checked_against_the_model_at_the_door(smollm2, script):
    engine, _ = make_engine(smollm2, script)
    with pytest.raises(ValueError, match=r"stop_token_ids must be token ids in \[0, 49152\)"):
        engine.add_request("hi", SamplingParams(stop_token_ids=[10**9]))
    with pytest.raises(TypeError, match="request_id must be a str"):
        engine.add_request("hi", GREEDY, request_id=7)
    assert not engine.has_unfinished()


def test_sampling_params_cannot_change_after_validation():
    params = SamplingParams(temperature=0.5)
    with pytest.raises(FrozenInstanceError):
        params.temperature = -3.0
    assert params.temperature == 0.5


# -- many consumers over one engine loop --------------------------------------------


@pytest.fixture
def llm(smollm2, script):
    engine, forward = make_engine(smollm2, script)
    llm = LLM.from_engine(engine)
    yield llm
    llm.close()


@pytest.mark.timeout(120)
def test_a_stream_survives_a_generate_in_between(llm, script):
    stream = llm.stream(script[:4], GREEDY)
    first = next(stream)
    (other,) = llm.generate(script[:20], GREEDY)
    rest = "".join(stream)
    tokenizer = llm.tokenizer
    assert other.token_ids == expected(script, 20)
    assert stream.output.token_ids == expected(script, 4)
    assert first + rest == tokenizer.decode(expected(script, 4))
    assert llm.engine.kv.num_used_blocks == 0


@pytest.mark.timeout(120)
def test_threads_calling_generate_get_their_own_outputs(llm, script):
    llm.engine.runner.forward.delay = 0.002  # steps long enough for the threads to overlap
    starts = {name: [3 + 7 * name + i for i in range(4)] for name in range(6)}
    results, errors = {}, []

    def consumer(name):
        try:
            prompts = [script[:start] for start in starts[name]]
            results[name] = [o.token_ids for o in llm.generate(prompts, GREEDY)]
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=consumer, args=(name,)) for name in starts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for name, token_ids in results.items():
        assert token_ids == [expected(script, start) for start in starts[name]]
    assert llm.engine.stats.steps < sum(12 * len(s) for s in starts.values())  # they were batched together
    assert llm.engine.kv.num_used_blocks == 0


@pytest.mark.timeout(120)
def test_seeded_samples_from_threads_equal_serial_runs(smollm2, llm, script):
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=8) for s in range(6)]
    serial = [llm.generate(script[:5], p)[0].token_ids for p in params]
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, llm.generate(script[:5], params[i])))
               for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i][0].token_ids for i in range(6)] == serial


@pytest.mark.timeout(120)
def test_a_request_added_to_the_core_keeps_its_output(llm, script):
    request_id = llm.engine.add_request(script[:6], GREEDY)
    (other,) = llm.generate(script[:10], GREEDY)
    assert other.token_ids == expected(script, 10)
    finished = drain(llm.engine)
    assert finished[(request_id, 0)].token_ids == expected(script, 6)


@pytest.mark.timeout(120)
def test_an_abandoned_stream_frees_its_blocks(llm, script):
    gc.disable()  # dropping the stream must abort at once, not when a collection finds a cycle
    try:
        stream = llm.stream(script[:4], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        next(stream)
        del stream
    finally:
        gc.enable()
    deadline = time.monotonic() + 10
    while (llm.engine.has_unfinished() or llm.engine.kv.num_used_blocks) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert llm.engine.kv.num_used_blocks == 0 and not llm.engine.requests


@pytest.mark.timeout(120)
def test_an_interrupted_generate_aborts_its_requests(llm, script):
    llm.engine.runner.forward.delay = 0.01
    timer = threading.Timer(0.2, _thread.interrupt_main)
    timer.start()
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([script[:4], script[:8]], long)
    deadline = time.monotonic() + 10
    while llm.engine.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not llm.engine.requests and llm.engine.kv.num_used_blocks == 0
    llm.engine.runner.forward.delay = 0.0
    assert llm.generate(script[:5], GREEDY)[0].token_ids == expected(script, 5)


# -- the compiled model, in a subprocess (a crash is the failure) -------------------

INTERRUPTED_SAMPLING = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from fuselm.models import Tokenizer
    from fuselm.models.loading import LoadedModel
    from fuselm.runtime.engine import LLMEngine
    from fuselm.sampling_params import SamplingParams
    from tiny_models import tiny_llama

    config, model = tiny_llama(seed=3)
    loaded = LoadedModel(model, Tokenizer.of_numbered_words(config.vocab_size), config, Path("tiny-llama"))
    engine = LLMEngine(loaded, "cpu", max_model_len=64, max_num_seqs=4, block_size=4)
    for n, prompt in ((2, [1, 2, 3]), (1, [4, 5, 6, 7])):
        engine.add_request(prompt, SamplingParams(temperature=0.7, seed=0, n=n, max_tokens=6, ignore_eos=True),
                           request_id="P" if n == 2 else "P#1")
    sampler = engine.sampler
    def interrupted(*args):
        engine.sampler = sampler
        raise KeyboardInterrupt
    engine.sampler = interrupted
    try:
        engine.step()
    except KeyboardInterrupt:
        pass
    finished = []
    while engine.has_unfinished():
        finished += [o for o in engine.step() if o.finished]
    assert sorted((o.request_id, o.index, len(o.token_ids)) for o in finished) == \\
        [("P", 0, 6), ("P", 1, 6), ("P#1", 0, 6)], finished
    print("ok")
""")


@pytest.mark.timeout(600)
def test_interrupted_step_and_colliding_ids_on_a_compiled_model(tmp_path):
    import os

    script = INTERRUPTED_SAMPLING.format(tests=os.path.dirname(__file__))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (result.returncode, result.stderr[-3000:])


@pytest.mark.timeout(120)
def test_closing_the_llm_under_a_waiting_generate_raises_a_clear_error(llm, script):
    """A generate waiting when another thread closed the LLM once hung (later: KeyError)."""
    from fuselm.runtime.engine_loop import EngineLoopError

    llm.engine.runner.forward.delay = 0.01
    errors = []

    def consumer():
        try:
            llm.generate(script[:4], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        except Exception as err:  # noqa: BLE001 - checked below
            errors.append(err)

    thread = threading.Thread(target=consumer)
    thread.start()
    time.sleep(0.2)
    llm.close()
    thread.join(30)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], EngineLoopError) and "shut down" in str(errors[0])
    llm.engine.runner.forward.delay = 0.0
    assert llm.generate(script[:5], GREEDY)[0].token_ids == expected(script, 5)  # it serves again
    assert llm.engine.kv.num_used_blocks == 0


def test_numpy_token_ids_are_one_prompt(llm, script):
    import numpy as np

    (output,) = llm.generate([np.int64(t) for t in script[:6]], GREEDY)
    assert output.token_ids == expected(script, 6)


@pytest.mark.parametrize("messages, message", [
    ("hello", "messages must be a list"),
    (["hello"], r"messages\[0\] must be a dict"),
    ([{"role": "user"}], r"messages\[0\] must be a dict with str 'role' and 'content'"),
    ([{"role": "user", "content": 5}], r"messages\[0\]"),
])
def test_malformed_chat_messages_are_named(llm, messages, message):
    with pytest.raises(TypeError, match=message):
        llm.chat(messages, GREEDY)
