"""Decode steps through per-bucket CUDA graphs (runtime/cuda_graphs.py).

On a GPU the graphs are captured and replayed; without one the cuda target's kernels run
in Triton's interpreter on the cpu and the same code pads each decode step to its
bucket's static buffers and calls the forward on them (nothing to capture), so what is
checked everywhere is that padding a step to its bucket changes no real row and writes
nothing into the cache; the GPU run adds capture and replay.
"""
from pathlib import Path

import pytest
import torch

from fuselm.target import get_target
from fuselm.models import Tokenizer
from fuselm.models.loading import LoadedModel
from fuselm.runtime.cuda_graphs import PADDING_SLOT, StaticDecodeInputs, batch_buckets, logits_of
from fuselm.runtime.engine import LLMEngine
from fuselm.sampling_params import SamplingParams

from tiny_models import tiny_llama

DEVICE = get_target("cuda").device
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_batch_buckets_cover_every_size_up_to_max_num_seqs():
    assert batch_buckets(1) == [1]
    assert batch_buckets(3) == [1, 2, 4]
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 24]
    for max_num_seqs in range(1, 70):
        buckets = batch_buckets(max_num_seqs)
        assert buckets == sorted(set(buckets)) and buckets[-1] >= max_num_seqs
        assert all(any(b >= n for b in buckets) for n in range(1, max_num_seqs + 1))


def test_static_inputs_pad_a_step_to_its_bucket():
    cache = torch.zeros(2, 2, 8, 4, 1, 2)
    static = StaticDecodeInputs(cache, max_batch=8, max_blocks=3)
    static.fill([11, 12, 13], [5, 0, 8], [21, 2, 30], [[5, 0], [0], [7, 1, 2]], batch=4)
    step = static.view(4)
    assert step.kv_cache is cache
    assert step.input_ids.tolist() == [11, 12, 13, 0]
    assert step.positions.tolist() == [5, 0, 8, 0]
    assert step.slot_mapping.tolist() == [21, 2, 30, PADDING_SLOT]  # the padding row writes nothing
    assert step.block_tables.tolist() == [[5, 0, 0], [0, 0, 0], [7, 1, 2], [0, 0, 0]]
    assert step.context_lens.tolist() == [6, 1, 9, 1]
    assert step.cu_seqlens_q.tolist() == [0, 1, 2, 3, 4]
    assert step.logits_indices.tolist() == [0, 1, 2, 3]
    static.fill([4], [1], [9], [[2]], batch=2)  # a smaller step: padding from row 1 on
    step = static.view(2)
    assert step.input_ids.tolist() == [4, 0] and step.slot_mapping.tolist() == [9, PADDING_SLOT]
    assert step.context_lens.tolist() == [2, 1] and step.block_tables[0, 0] == 2
    with pytest.raises(ValueError, match="exceeds the captured width 3"):
        static.fill([1], [0], [0], [[1, 2, 3, 4]], batch=1)
    with pytest.raises(ValueError, match="do not fit a decode batch of 2"):
        static.fill([1, 2, 3], [0, 0, 0], [0, 1, 2], [[0], [1], [2]], batch=2)


@pytest.fixture(scope="module")
def tiny_loaded():
    """A tiny Llama on the cuda target's device, with a tokenizer of numbered words."""
    config, model = tiny_llama()
    tokenizer = Tokenizer.of_numbered_words(config.vocab_size)
    return lambda: LoadedModel(model.to(DEVICE), tokenizer, config, Path("tiny-llama"))


def serve(engine, arrivals: dict) -> dict:
    """Step until idle, adding `arrivals[step]` prompts at that step; token ids by prompt index."""
    finished, names, step = {}, {}, 0
    arrivals = dict(arrivals)
    while engine.has_unfinished() or arrivals:
        for index, prompt in arrivals.pop(step, []):
            names[engine.add_request(prompt, GREEDY)] = index
        for output in engine.step():
            if output.finished:
                assert output.finish_reason == "length", output.error
                finished[names[output.request_id]] = output.token_ids
        step += 1
    return finished


def test_decode_replays_give_the_eager_engines_tokens(tiny_loaded, tmp_path):
    """Prompts arriving at different steps make decode batches of 1..6 sequences (buckets
    1, 2, 4, 8 of max_num_seqs=6): with graphs, every one-token step replays its bucket,
    and each request's tokens equal the eager engine's."""
    prompts = [[(7 * i + 3 * j) % 90 + 5 for j in range(3 + 5 * i)] for i in range(6)]
    arrivals = {0: [(0, prompts[0])], 2: [(1, prompts[1]), (2, prompts[2])], 5: [(3, prompts[3])],
                9: [(4, prompts[4]), (5, prompts[5])]}
    options = dict(max_model_len=64, max_num_seqs=6, block_size=4, cache_dir=str(tmp_path))
    eager = LLMEngine(tiny_loaded(), "cuda", enforce_eager=True, **options)
    graphed = LLMEngine(tiny_loaded(), "cuda", **options)
    graphs = graphed.runner.decode_graphs
    assert eager.runner.decode_graphs is None and graphs.buckets == [1, 2, 4, 8]
    if DEVICE.type == "cuda":
        assert sorted(graphs.graphs) == graphs.buckets  # one captured graph per bucket
    expected = serve(eager, arrivals)
    assert serve(graphed, arrivals) == expected
    assert graphs.replays >= 12  # most steps were decode-only
    assert graphed.kv.num_used_blocks == 0


def test_padding_rows_leave_the_cache_and_real_logits_unchanged(tiny_loaded, tmp_path):
    """One decode step of 3 sequences, run unpadded and padded to bucket 4: same logits
    (to rounding: another row count may pick another tile), and the padded run writes only
    the 3 real slots."""
    engine = LLMEngine(tiny_loaded(), "cuda", max_model_len=32, max_num_seqs=4, block_size=4,
                       cache_dir=str(tmp_path))
    runner = engine.runner
    for index, length in enumerate((5, 9, 2)):
        engine.add_request([(3 * index + j) % 90 + 1 for j in range(length)], GREEDY)
    engine.step()  # the prefills: each request now has one sampled token to decode
    scheduled = engine.scheduler.schedule().scheduled
    assert [item.num_new for item in scheduled] == [1, 1, 1]
    before = runner.kv_cache.clone()
    unpadded = logits_of(runner.forward(*runner.prepare_inputs(scheduled).as_tuple())).float()
    written = (runner.kv_cache != before).flatten(0, 1).any(-1).any(-1)  # [L*2, NB, BS] slots written
    runner.kv_cache.copy_(before)
    padded = runner.execute(scheduled, [])
    assert padded.shape == unpadded.shape == (3, engine.config.vocab_size)
    torch.testing.assert_close(padded, unpadded, rtol=1e-4, atol=1e-4)
    assert torch.equal((runner.kv_cache != before).flatten(0, 1).any(-1).any(-1), written)
    assert int(written[0].sum()) == 3
