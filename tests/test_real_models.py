"""Real weights end to end: fuselm's models, eager and captured, against transformers.

SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32) runs through the flattened-token
contract, one prompt per call and all prompts packed into one call, and must give
transformers' logits at every position; so must its captured IR graph after the cleanup
passes, run by the reference interpreter. all-MiniLM-L6-v2 sentence embeddings of a
padded batch, eager and captured, must match transformers' BertModel followed by mean
pooling and normalization.
"""
import pytest
import torch
import torch.nn.functional as F

from fuselm import ir
from fuselm.frontend import capture
from fuselm.models.bert import sentence_embeddings
from fuselm.models.contract import capture_example, pack_prompts, prompt_logits
from fuselm.passes import run_passes

pytestmark = pytest.mark.slow

LOGITS_TOLERANCE = 1e-3
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn, again and again.",
    "Hi",
    "Ünïcödé text, 日本語 and emoji 🚀 in one sentence.",
]


@pytest.fixture(scope="module")
def smollm2_prompts(smollm2):
    tokenizer = smollm2.tokenizer
    return [
        tokenizer.encode("The capital of France is"),
        tokenizer.apply_chat_template(QUESTION, tokenize=True),
        tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n    return"),
    ]


@pytest.fixture(scope="module")
def hf_smollm2_logits(hf_smollm2, smollm2_prompts):
    with torch.no_grad():
        return [hf_smollm2(torch.tensor([prompt])).logits[0] for prompt in smollm2_prompts]


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("index", [0, 1, 2], ids=["plain", "chat", "code"])
def test_smollm2_logits_match_hf(smollm2, smollm2_prompts, hf_smollm2_logits, index):
    prompt = smollm2_prompts[index]
    (logits,) = prompt_logits(smollm2.model, smollm2.config, [prompt], all_logits=True)
    assert logits.shape == (len(prompt), smollm2.config.vocab_size)
    assert max_abs_diff(logits, hf_smollm2_logits[index]) < LOGITS_TOLERANCE


def test_smollm2_packed_prompts_match_hf(smollm2, smollm2_prompts, hf_smollm2_logits):
    packed = prompt_logits(smollm2.model, smollm2.config, smollm2_prompts, all_logits=True)
    for logits, reference in zip(packed, hf_smollm2_logits, strict=True):
        assert max_abs_diff(logits, reference) < LOGITS_TOLERANCE


def test_smollm2_answers_the_chat_question(smollm2, smollm2_prompts):
    """Greedy decoding (whole prompt re-run each step) names Paris, then ends the turn."""
    tokens = list(smollm2_prompts[1])
    answer = []
    for _ in range(12):
        (logits,) = prompt_logits(smollm2.model, smollm2.config, [tokens], all_logits=False)
        next_token = int(logits.argmax())
        if next_token in smollm2.tokenizer.eos_token_ids:
            break
        tokens.append(next_token)
        answer.append(next_token)
    assert "Paris" in smollm2.tokenizer.decode(answer)


def hf_mean_pooled_embeddings(hf_model, input_ids, attention_mask) -> torch.Tensor:
    """sentence-transformers' all-MiniLM-L6-v2: BertModel, mean over real tokens, L2 normalize."""
    with torch.no_grad():
        hidden = hf_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    mask = attention_mask.unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)


def test_minilm_sentence_embeddings_match_hf(minilm, hf_minilm, hf_minilm_tokenizer):
    batch = hf_minilm_tokenizer(SENTENCES, padding=True, return_tensors="pt")
    ids = [minilm.tokenizer.encode(s) for s in SENTENCES]
    assert ids == [row[row != 0].tolist() for row in batch["input_ids"]]
    assert len(set(map(len, ids))) == len(SENTENCES)  # padding really happens

    with torch.no_grad():
        hidden = minilm.model(batch["input_ids"], batch["attention_mask"])
    ours = sentence_embeddings(hidden, batch["attention_mask"])
    reference = hf_mean_pooled_embeddings(hf_minilm, batch["input_ids"], batch["attention_mask"])
    assert ours.shape == (len(SENTENCES), minilm.config.hidden_size)
    assert F.cosine_similarity(ours, reference).min().item() >= 0.99999


# -- captured graphs: capture once per module, interpret, compare with transformers ----


def captured(loaded):
    example, dynamic = capture_example(loaded.config)
    graph = capture(loaded.model, example, dynamic)
    return graph, run_passes(graph)


@pytest.fixture(scope="module")
def smollm2_graphs(smollm2):
    return captured(smollm2)


def test_smollm2_captured_graph_matches_hf(smollm2, smollm2_graphs, smollm2_prompts, hf_smollm2_logits):
    raw, cleaned = smollm2_graphs
    for graph in (raw, cleaned):
        inputs = pack_prompts(smollm2.config, smollm2_prompts, all_logits=True)
        logits, cache = ir.interpret(graph, *inputs.as_tuple())
        assert cache is inputs.kv_cache and cache.abs().sum() > 0
        rows = logits.split([len(p) for p in smollm2_prompts])
        for ours, reference in zip(rows, hf_smollm2_logits, strict=True):
            assert max_abs_diff(ours, reference) < LOGITS_TOLERANCE


def test_smollm2_graph_round_trips(smollm2_graphs):
    for graph in smollm2_graphs:
        text = str(graph)
        assert str(ir.parse(text, constants=graph.constants)) == text
        ir.verify(graph)
    counts = smollm2_graphs[1].op_counts()
    assert counts["kv_cache_write"] == counts["paged_attention"] == 30
    # fused: q/k/v one gemm, gate/up one gated gemm, o and down take the residual
    assert counts["rms_norm"] == 61 and counts["gemm"] == 30 * 4 + 1
    assert counts["kv_cache_write"] == counts["paged_attention"] == 30


def test_minilm_captured_graph_matches_hf(minilm, hf_minilm, hf_minilm_tokenizer):
    batch = hf_minilm_tokenizer(SENTENCES, padding=True, return_tensors="pt")
    reference = hf_mean_pooled_embeddings(hf_minilm, batch["input_ids"], batch["attention_mask"])
    for graph in captured(minilm):
        text = str(graph)
        assert str(ir.parse(text, constants=graph.constants)) == text
        hidden = ir.interpret(graph, batch["input_ids"], batch["attention_mask"])
        ours = sentence_embeddings(hidden, batch["attention_mask"])
        assert F.cosine_similarity(ours, reference).min().item() >= 0.99999


# -- compiled for cpu: fuselm's TVM kernels against transformers ------------------------


@pytest.fixture(scope="module")
def smollm2_cpu(smollm2, tmp_path_factory):
    import fuselm.api as api

    example, dynamic = capture_example(smollm2.config)
    return api.compile(smollm2.model, example, target="cpu", dynamic=dynamic,
                       cache_dir=str(tmp_path_factory.mktemp("kernels")))


def test_smollm2_compiled_for_cpu_matches_hf(smollm2, smollm2_cpu, smollm2_prompts, hf_smollm2_logits):
    inputs = pack_prompts(smollm2.config, smollm2_prompts, all_logits=True)
    empty_cache = inputs.kv_cache.clone()
    logits = smollm2_cpu(*inputs.as_tuple())  # the model's logits; the cache is written in place
    assert not torch.equal(inputs.kv_cache, empty_cache)
    for ours, reference in zip(logits.split([len(p) for p in smollm2_prompts]), hf_smollm2_logits, strict=True):
        assert max_abs_diff(ours, reference) < LOGITS_TOLERANCE
    for prompt, reference in zip(smollm2_prompts, hf_smollm2_logits):  # one at a time: other token counts
        single = smollm2_cpu(*pack_prompts(smollm2.config, [prompt], all_logits=True).as_tuple())
        assert max_abs_diff(single, reference) < LOGITS_TOLERANCE
    names = [k.name for k in smollm2_cpu.kernels]
    assert len(names) == len(set(names)) <= 16  # 30 layers share one set of kernels


def test_minilm_compiled_for_cpu_matches_hf(minilm, hf_minilm, hf_minilm_tokenizer, tmp_path):
    import fuselm.api as api

    example, dynamic = capture_example(minilm.config)
    compiled = api.compile(minilm.model, example, target="cpu", dynamic=dynamic, cache_dir=str(tmp_path))
    batch = hf_minilm_tokenizer(SENTENCES, padding=True, return_tensors="pt")
    reference = hf_mean_pooled_embeddings(hf_minilm, batch["input_ids"], batch["attention_mask"])
    ours = sentence_embeddings(compiled(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
    assert F.cosine_similarity(ours, reference).min().item() >= 0.99999
