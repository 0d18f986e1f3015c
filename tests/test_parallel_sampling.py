"""Parallel sampling (SamplingParams.n): the prompt is prefilled once, then the samples
fork its KV blocks and copy a shared block before writing into it.

A tiny Llama compiled for cpu (its tied embeddings make the last token's logit dominate, hence
the high temperature); a sample forked with seed s + i must produce exactly the
tokens of a request run alone with seed s + i. That holds only if no sample's writes
reach another's blocks (copy-on-write), and if each sample draws from its own generator.
"""
from pathlib import Path

import pytest
import torch

from fuselm.llm import LLM
from fuselm.models import Tokenizer
from fuselm.models.loading import LoadedModel
from fuselm.runtime.engine import LLMEngine
from fuselm.sampling_params import SamplingParams

from tiny_models import tiny_llama

BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    config, model = tiny_llama(seed=3)
    loaded = LoadedModel(model, Tokenizer.of_numbered_words(config.vocab_size), config, Path("tiny-llama"))
    engine = LLMEngine(loaded, "cpu", max_model_len=64, max_num_seqs=8, block_size=BLOCK_SIZE,
                       cache_dir=str(tmp_path_factory.mktemp("kernels")))
    return LLM.from_engine(engine)


def sampled(seed: int, n: int = 1) -> SamplingParams:
    return SamplingParams(temperature=30.0, seed=seed, max_tokens=12, ignore_eos=True, n=n)


def test_forked_samples_equal_requests_run_alone_with_their_seeds(llm):
    prompt = [5 + 7 * i % 80 for i in range(10)]  # 10 tokens: the third block is shared and partial
    engine = llm.engine
    copies_before = engine.kv.stats.cow_copies
    (output,) = llm.generate([prompt], sampled(seed=11, n=4))
    assert engine.kv.stats.cow_copies - copies_before >= 3  # each sample but the last copied the block
    assert len(output.samples) == 4 and output.samples[0].token_ids == output.token_ids
    alone = [llm.generate([prompt], sampled(seed=11 + i))[0].token_ids for i in range(4)]
    assert [s.token_ids for s in output.samples] == alone
    assert len({tuple(tokens) for tokens in alone}) > 1  # the seeds do draw different samples
    assert all(s.finish_reason == "length" and len(s.token_ids) == 12 for s in output.samples)
    assert engine.kv.num_used_blocks == 0 and not engine.requests


def test_samples_of_several_prompts_in_one_batch(llm):
    prompts = [[3, 9, 27, 81], [2, 4, 8, 16, 32, 64, 50]]
    outputs = llm.generate(prompts, [sampled(seed=5, n=3), sampled(seed=9, n=2)])
    assert [len(o.samples) for o in outputs] == [3, 2]
    for prompt, output, seed in zip(prompts, outputs, (5, 9)):
        for index, sample in enumerate(output.samples):
            assert sample.token_ids == llm.generate([prompt], sampled(seed=seed + index))[0].token_ids
    assert llm.engine.kv.num_used_blocks == 0


def test_aborting_a_request_aborts_its_samples(llm):
    engine = llm.engine
    request_id = engine.add_request([1, 2, 3, 4, 5, 6], sampled(seed=1, n=3))
    outputs = engine.step()  # the prefill: its two samples are forked
    assert {(o.request_id, o.index) for o in outputs} == {(request_id, 0), (request_id, 1), (request_id, 2)}
    engine.abort(request_id)
    ended = engine.step()
    assert sorted(o.finish_reason for o in ended) == ["abort"] * 3
    assert not engine.has_unfinished() and engine.kv.num_used_blocks == 0 and not engine.requests


def test_sample_ids_cannot_collide_with_user_ids(llm):
    """Samples were once named "<id>#<i>": a user's request "P#1" next to "P" with n=2
    collided with P's sample, and the next step ran a forward pass with zero tokens
    (a segfault on the compiled model)."""
    engine = llm.engine
    engine.add_request([1, 2, 3, 4], sampled(seed=0, n=2), request_id="P")
    engine.add_request([5, 6, 7, 8], sampled(seed=1), request_id="P#1")
    finished = {}
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                finished[(output.request_id, output.index)] = output
    assert set(finished) == {("P", 0), ("P", 1), ("P#1", 0)}
    assert all(o.finish_reason == "length" and len(o.token_ids) == 12 for o in finished.values())
    assert engine.kv.num_used_blocks == 0 and not engine.requests


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_n_must_be_a_positive_int(n):
    with pytest.raises(ValueError, match="^n must be"):
        SamplingParams(n=n)
