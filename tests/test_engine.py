"""The engine core, scheduler and LLM front end on a scripted model (fast, no kernels).

A scripted forward pass stands in for the compiled model: the logits it returns for a
token at position p put all the mass on `SCRIPT[p + 1]`, so every request whose prompt
is a prefix of SCRIPT generates the rest of SCRIPT, whatever the batch around it. That
isolates what these tests check (scheduling, preemption, prefix caching, stop strings,
streaming, errors) from kernel numerics, which test_generate.py covers on the real model.
"""
import pytest
import torch

from fuselm.llm import LLM
from fuselm.runtime.engine import LLMEngine
from fuselm.runtime.kv_cache import kv_bytes_per_token
from fuselm.sampling_params import SamplingParams

TEXT = ("The café on the corner serves 日本語 tea 🙂 and the answer is 42. Then it closes at nine, "
        "and everyone goes home to sleep until the morning comes again.")


class ScriptedForward:
    """Logits that continue SCRIPT; records each batch's token and sequence counts."""

    def __init__(self, script: list, vocab: int):
        self.script, self.vocab = script, vocab
        self.batches: list = []
        self.fail_on_token = None  # a token id whose presence in a batch makes it raise

    def __call__(self, input_ids, positions, kv_cache, slot_mapping, block_tables, context_lens, cu_seqlens_q,
                 logits_indices):
        if self.fail_on_token is not None and bool((input_ids == self.fail_on_token).any()):
            raise RuntimeError("scripted failure")
        self.batches.append((input_ids.numel(), context_lens.numel()))
        assert bool((slot_mapping >= 0).all()) and int(slot_mapping.max()) < kv_cache.shape[2] * kv_cache.shape[3]
        logits = torch.zeros(logits_indices.numel(), self.vocab)
        for row, index in enumerate(logits_indices.tolist()):
            following = int(positions[index]) + 1
            logits[row, self.script[following % len(self.script)]] = 10.0
        return logits


@pytest.fixture(scope="module")
def script(smollm2):
    tokens = smollm2.tokenizer.encode(TEXT * 8)
    assert len(tokens) > 240
    return tokens


def make_engine(smollm2, script, **options):
    forward = ScriptedForward(script, smollm2.config.vocab_size)
    options = {"max_model_len": 256, "max_num_seqs": 8, **options}
    engine = LLMEngine(smollm2, "cpu", forward=forward, **options)
    return engine, forward


def run_to_end(engine, arrivals: dict = None) -> dict:
    """Step until idle; `arrivals` maps a step number to requests (prompt, params) added then."""
    arrivals, finished, step = dict(arrivals or {}), {}, 0
    ids = {}
    while engine.has_unfinished() or arrivals:
        for prompt, params, name in arrivals.pop(step, []):
            ids[engine.add_request(prompt, params)] = name
        for output in engine.step():
            if output.finished:
                finished[ids.get(output.request_id, output.request_id)] = output
        step += 1
    return finished


GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


def test_requests_arriving_at_different_steps_continue_the_script(smollm2, script):
    engine, forward = make_engine(smollm2, script)
    lengths = [3, 17, 40, 5, 33, 1, 64, 12]
    arrivals = {}
    for n, length in enumerate(lengths):
        arrivals.setdefault(n % 4 * 3, []).append((script[:length], GREEDY, n))
    finished = run_to_end(engine, arrivals)
    for n, length in enumerate(lengths):
        assert finished[n].token_ids == script[length:length + 20]
        assert finished[n].finish_reason == "length"
    assert max(seqs for _, seqs in forward.batches) > 1, "requests were never batched"
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_chunked_prefill_respects_the_token_budget(smollm2, script):
    engine, forward = make_engine(smollm2, script, max_num_batched_tokens=24)
    finished = run_to_end(engine, {0: [(script[:70], GREEDY, "long"), (script[:4], GREEDY, "short")]})
    assert finished["long"].token_ids == script[70:90]
    assert finished["short"].token_ids == script[4:24]
    assert max(tokens for tokens, _ in forward.batches) <= 24
    assert any(seqs == 2 for _, seqs in forward.batches), "the decode never ran beside a prefill chunk"


def test_preemption_by_recompute_when_blocks_run_out(smollm2, script):
    per_token = kv_bytes_per_token(smollm2.config, torch.float32)
    prompts = [script[:n] for n in (30, 45, 20, 60, 10, 50, 25, 35)]
    needed_blocks = sum(-(-(len(p) + 40) // 16) for p in prompts)
    budget = int(0.3 * needed_blocks) * 16 * per_token
    engine, _ = make_engine(smollm2, script, kv_cache_bytes=budget, max_model_len=128)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    finished = run_to_end(engine, {0: [(p, params, i) for i, p in enumerate(prompts)]})
    assert engine.stats.preemptions > 0
    for i, prompt in enumerate(prompts):
        assert finished[i].token_ids == script[len(prompt):len(prompt) + 40]
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_block_size_one(smollm2, script):
    engine, _ = make_engine(smollm2, script, block_size=1)
    finished = run_to_end(engine, {0: [(script[:9], GREEDY, "a"), (script[:30], GREEDY, "b")]})
    assert finished["a"].token_ids == script[9:29] and finished["b"].token_ids == script[30:50]


def test_prefix_cache_serves_a_shared_prompt(smollm2, script):
    engine, forward = make_engine(smollm2, script)
    run_to_end(engine, {0: [(script[:110], GREEDY, "first")]})
    forward.batches.clear()
    second = script[:100] + script[200:220]  # shares 100 tokens with the first
    finished = run_to_end(engine, {0: [(second, GREEDY, "second")]})
    assert engine.kv.stats.prefix_hits == 96  # the six full blocks of the shared 100 tokens
    assert forward.batches[0][0] == 120 - 96
    assert finished["second"].token_ids == script[120:140]


def test_stop_string_across_tokens_is_cut_and_the_cache_trimmed(smollm2, script):
    tokenizer = smollm2.tokenizer
    engine, _ = make_engine(smollm2, script)
    prompt = script[:5]
    full = tokenizer.decode(script[5:60])
    stop = "answer is"
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True, stop=stop)
    finished = run_to_end(engine, {0: [(prompt, params, "r")]})["r"]
    assert finished.finish_reason == "stop" and finished.stop_reason == stop
    assert finished.text == full[:full.index(stop)]
    assert tokenizer.decode(finished.token_ids) == finished.text.rstrip(" ") or \
        finished.text.startswith(tokenizer.decode(finished.token_ids))
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_stream_pieces_concatenate_to_the_text(smollm2, script):
    tokenizer = smollm2.tokenizer
    emoji_tokens = tokenizer.encode("🙂", add_special_tokens=False)
    assert len(emoji_tokens) > 1, "the test needs a character split across tokens"
    engine, _ = make_engine(smollm2, script)
    llm = LLM.from_engine(engine)
    for stop in (None, "answer is", "日本"):
        params = SamplingParams(temperature=0, max_tokens=45, ignore_eos=True, stop=stop)
        pieces = list(llm.stream(script[:3], params))
        text = llm.generate(script[:3], params)[0].text
        assert "".join(pieces) == text
        assert all("\ufffd" not in piece for piece in pieces[:-1])  # the last may end mid-character
    assert "🙂" in "".join(llm.stream(script[:3], SamplingParams(temperature=0, max_tokens=45, ignore_eos=True)))


def test_abort_frees_the_request(smollm2, script):
    engine, _ = make_engine(smollm2, script)
    keep = engine.add_request(script[:10], GREEDY)
    drop = engine.add_request(script[:20], GREEDY)
    engine.step()
    engine.abort(drop)
    outputs = {o.request_id: o for o in engine.step()}
    assert outputs[drop].finish_reason == "abort"
    while engine.has_unfinished():
        for o in engine.step():
            outputs[o.request_id] = o
    assert outputs[keep].token_ids == script[10:30]
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_a_request_failing_while_running_does_not_stop_the_others(smollm2, script):
    engine, forward = make_engine(smollm2, script)
    poison = script[2]
    forward.fail_on_token = poison
    good = [s for s in range(40) if poison not in script[3 + s:3 + s + 10]][0]
    ok = engine.add_request(script[3 + good:3 + good + 10], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    bad = engine.add_request(script[:4], GREEDY)
    outputs = {}
    while engine.has_unfinished():
        for o in engine.step():
            outputs[o.request_id] = o
    assert outputs[bad].finish_reason == "error" and "scripted failure" in outputs[bad].error
    assert outputs[ok].finish_reason == "length" and len(outputs[ok].token_ids) == 5
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


@pytest.mark.parametrize("prompt, params, error, message", [
    ("", None, ValueError, "prompt is empty"),
    ([], None, ValueError, "prompt is empty"),
    ([1, 2, -5], None, ValueError, "token ids"),
    ("x " * 300, None, ValueError, "prompt is too long"),
    ("hello", SamplingParams(max_tokens=256), ValueError, "exceeds max_model_len"),
    ("hello", "greedy", TypeError, "SamplingParams"),
])
def test_bad_requests_raise_and_queue_nothing(smollm2, script, prompt, params, error, message):
    engine, _ = make_engine(smollm2, script)
    with pytest.raises(error, match=message):
        engine.add_request(prompt, params)
    assert not engine.has_unfinished() and not engine.requests


def test_generate_validates_every_request_before_running_any(smollm2, script):
    engine, forward = make_engine(smollm2, script)
    llm = LLM.from_engine(engine)
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        llm.generate([script[:5], "", script[:7]], GREEDY)
    assert not engine.has_unfinished() and not forward.batches
    outputs = llm.generate([script[:5], script[:7]], GREEDY)
    assert [o.token_ids for o in outputs] == [script[5:25], script[7:27]]


@pytest.mark.parametrize("options, message", [
    ({"max_model_len": 0}, "max_model_len"),
    ({"max_model_len": 10**6}, "max_model_len"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"kv_cache_bytes": 1000}, "kv_cache_bytes"),
])
def test_bad_engine_options(smollm2, script, options, message):
    with pytest.raises(ValueError, match=message):
        make_engine(smollm2, script, **options)


def test_unknown_model_and_target():
    with pytest.raises(ValueError, match="no-such-model"):
        LLM("no-such-model", target="cpu")
    with pytest.raises(ValueError, match="target"):
        LLM("smollm2-135m", target="tpu")
