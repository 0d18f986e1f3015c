"""Capture (torch.export -> IR) + the reference interpreter against eager, random weights.

One capture per model serves every token count and sequence count below.
"""
import pytest
import torch

from fuselm import FuselmError, UnsupportedOpError, ir
from fuselm.frontend import capture
from fuselm.models import bert, gpt2, llama
from fuselm.models.config import BertConfig, GPT2Config, LlamaConfig
from fuselm.models.contract import capture_example, pack_prompts
from fuselm.passes import run_passes

VOCAB = 97


def perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


LM_CONFIGS = {
    "llama": (llama.LlamaForCausalLM, LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0, tie_word_embeddings=True)),
    "gpt2": (gpt2.GPT2LMHeadModel, GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)),
}


@pytest.fixture(scope="module", params=sorted(LM_CONFIGS))
def captured_lm(request):
    torch.manual_seed(0)
    cls, config = LM_CONFIGS[request.param]
    model = perturbed(cls(config))
    example, dynamic = capture_example(config)
    return model, config, capture(model, example, dynamic)


# token counts 3+5+1 = 9 and 20+2 = 22 (and the example's 24): one graph for all of them
PROMPT_LENGTHS = [[3, 5, 1], [20, 2]]


@pytest.mark.parametrize("lengths", PROMPT_LENGTHS)
@pytest.mark.parametrize("cleanup", [False, True])
def test_lm_capture_interprets_like_eager(captured_lm, lengths, cleanup):
    model, config, graph = captured_lm
    graph = run_passes(graph) if cleanup else graph
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in lengths]
    eager_inputs = pack_prompts(config, prompts, all_logits=True)
    graph_inputs = pack_prompts(config, prompts, all_logits=True)
    with torch.no_grad():
        expected = model(*eager_inputs.as_tuple())
    logits, cache = ir.interpret(graph, *graph_inputs.as_tuple())
    assert logits.shape == (sum(lengths), VOCAB)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    # The cache write survived capture and every pass: the cache holds the new keys and
    # values, written in place into the caller's buffer.
    assert cache is graph_inputs.kv_cache
    assert cache.abs().sum() > 0
    torch.testing.assert_close(cache, eager_inputs.kv_cache, atol=1e-6, rtol=1e-6)


def test_lm_graph_inputs_and_symbols(captured_lm):
    _, _, graph = captured_lm
    types = {v.name: str(v.type) for v in graph.inputs}
    assert types["input_ids"] == "i64[T]"
    assert types["block_tables"] == "i32[N,MB]"
    assert types["cu_seqlens_q"] == "i32[N+1]"
    assert types["logits_indices"] == "i64[R]"
    assert graph.op_counts()["kv_cache_write"] == 2 and graph.op_counts()["paged_attention"] == 2
    # outputs: the logits, then the updated cache (the write's result)
    assert graph.outputs[1].op == "kv_cache_write"


def test_lm_round_trip_and_verify(captured_lm):
    _, _, graph = captured_lm
    for g in (graph, run_passes(graph)):
        ir.verify(g)
        text = str(g)
        assert str(ir.parse(text, constants=g.constants)) == text


@pytest.fixture(scope="module")
def captured_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    model = perturbed(bert.BertModel(config))
    example, dynamic = capture_example(config)
    return model, capture(model, example, dynamic)


@pytest.mark.parametrize("batch, seq", [(3, 7), (5, 13)])
def test_bert_capture_interprets_like_eager(captured_bert, batch, seq):
    model, graph = captured_bert
    input_ids = torch.randint(0, VOCAB, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[1:, seq // 2:] = 0
    with torch.no_grad():
        expected = model(input_ids, mask)
    for g in (graph, run_passes(graph)):
        torch.testing.assert_close(ir.interpret(g, input_ids, mask), expected, atol=1e-5, rtol=1e-5)
    assert graph.op_counts()["attention"] == 2
    assert [str(v.type) for v in graph.inputs] == ["i64[B,S]", "i64[B,S]"]
    text = str(graph)
    assert str(ir.parse(text, constants=graph.constants)) == text


class _UsesCummax(torch.nn.Module):
    def forward(self, x):
        y = x * 2
        return torch.cummax(y, dim=0).values  # the unsupported line


def test_unsupported_op_names_op_and_source_line():
    # strict=True refuses fallbacks (by default the op becomes an `aten` node: test_fallbacks.py)
    with pytest.raises(UnsupportedOpError) as err:
        capture(_UsesCummax(), (torch.randn(4, 3),), strict=True)
    message = str(err.value)
    assert "aten.cummax" in message
    assert "test_capture.py:" in message and "torch.cummax(y, dim=0).values" in message
    assert err.value.op.startswith("aten.cummax")


def test_unmapped_op_becomes_an_aten_node_by_default():
    graph = capture(_UsesCummax(), (torch.randn(4, 3),))
    assert graph.op_counts() == {"mul": 1, "aten": 1}
    node = next(n for n in graph.nodes if n.op == "aten")
    assert node.attrs["overload"] == "aten.cummax.default" and node.attrs["index"] == 0
    x = torch.randn(4, 3)
    torch.testing.assert_close(ir.interpret(graph, x), _UsesCummax()(x))


class _Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(6, 4)

    def forward(self, x, y):
        return torch.nn.functional.gelu(self.proj(x)) + y


def test_dynamic_spec_with_bounds_and_shared_symbol():
    graph = capture(_Scale(), (torch.randn(5, 6), torch.randn(5, 4)),
                    dynamic={"x": {0: ("T", 2, 64)}, "y": {0: "T"}})
    assert [str(v.type) for v in graph.inputs] == ["f32[T,6]", "f32[T,4]"]
    assert graph.op_counts() == {"gemm": 1, "gelu": 1, "add": 1}
    x, y = torch.randn(9, 6), torch.randn(9, 4)
    torch.testing.assert_close(ir.interpret(graph, x, y), _Scale.forward(graph_module_like(graph), x, y))


def graph_module_like(graph):
    """A _Scale whose weights are the graph's constants (they were copied at capture)."""
    module = _Scale()
    module.proj.weight.data = graph.constants["proj.weight"]
    module.proj.bias.data = graph.constants["proj.bias"]
    return module


def test_dynamic_spec_rejects_unknown_parameter():
    with pytest.raises(ValueError, match=r"dynamic names \['z'\] are not parameters"):
        capture(_Scale(), (torch.randn(5, 6), torch.randn(5, 4)), dynamic={"z": {0: "T"}})


class _Glu(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.glu(x, dim=-1) * 3.0


def test_ops_the_table_lacks_are_decomposed_first():
    from fuselm.frontend.capture import unmapped_ops

    x = torch.randn(5, 8)
    exported = torch.export.export(_Glu(), (x,))
    assert unmapped_ops(exported) == {"aten.glu.default"}
    graph = capture(_Glu(), (x,), dynamic={"x": {0: "T"}})
    assert "sigmoid" in graph.op_counts()  # glu arrived decomposed
    y = torch.randn(7, 8)
    torch.testing.assert_close(ir.interpret(graph, y), _Glu()(y))


def test_cat_skips_legacy_empty_tensors():
    """torch.cat skips 1-d empty tensors beside tensors of any rank (Hugging Face's
    DynamicCache concatenates each layer's first keys onto torch.tensor([])): a concat of
    what is left, not an aten fallback."""
    class GrowingCache(torch.nn.Module):
        def forward(self, k, v):
            empty = torch.tensor([], dtype=k.dtype)
            return torch.cat([empty, k], dim=-2), torch.cat([empty, k, v], dim=-2)

    k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 2, 4)
    graph = capture(GrowingCache(), (k, v))
    assert "aten" not in graph.op_counts() and graph.op_counts().get("concat") == 1
    for got, want in zip(ir.interpret(graph, k, v), GrowingCache()(k, v)):
        assert torch.equal(got, want)


def test_a_branch_on_tensor_values_is_a_capture_error_naming_the_line():
    """torch.export's GuardOnDataDependentSymNode, as a FuselmError at the model's line."""
    import fuselm

    class Branchy(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # the line the error names
                return x + 1
            return x - 1

    with pytest.raises(fuselm.CaptureError, match=r"test_capture\.py:\d+ `if x\.sum\(\) > 0:.*`: the model branches.*torch\.where"):
        capture(Branchy(), (torch.randn(5),))


def test_a_dynamic_dim_the_model_fixes_is_a_capture_error():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x.reshape(4, 3) + 1

    with pytest.raises(FuselmError, match="a dim marked dynamic is fixed by the model.*constant"):
        capture(Fixed(), (torch.randn(12),), {"x": {0: "N"}})
