"""Partition into kernels, and the executor running the kernels in order.

Kernels here are run by the reference interpreter, so these tests check the partition
and the executor alone: same outputs as interpreting the whole graph, the cache written
in place, identical layers sharing kernels, and the kernel count per decoder layer.
"""
import pytest
import torch

from fuselm import ir
from fuselm.codegen.kernel import group_key
from fuselm.frontend import capture
from fuselm.ir import GraphBuilder, TensorType, symbol

T = symbol("T")
from fuselm.models import bert
from fuselm.models.config import BertConfig
from fuselm.models.contract import capture_example, pack_prompts
from fuselm.passes import run_passes
from fuselm.passes.partition import KernelGroup, ViewStep, partition
from fuselm.runtime.executor import Executor, interpreted_kernel
from tiny_models import captured, tiny_llama


@pytest.fixture(scope="module")
def llama_program():
    config, model = tiny_llama(num_layers=3)
    graph = run_passes(captured(config, model))
    return config, model, graph, partition(graph)


def kernels(steps):
    return [s for s in steps if isinstance(s, KernelGroup)]


def test_llama_decoder_layer_is_at_most_eight_kernels(llama_program):
    _, _, _, steps = llama_program
    layer_of = {}
    for step in kernels(steps):
        names = [v.name for v in step.args if isinstance(v, ir.Constant)]
        layers = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
        if step.cache_layer is not None:
            layers.add(step.cache_layer)
        if len(layers) == 1:
            layer_of.setdefault(layers.pop(), []).append(step.ops)
    assert sorted(layer_of) == [0, 1, 2]
    for layer, ops in layer_of.items():
        assert len(ops) <= 8, f"layer {layer} runs {len(ops)} kernels: {ops}"
    assert [o[0] for o in layer_of[1]] == ["rms_norm", "gemm", "kv_cache_write", "paged_attention", "gemm", "rms_norm", "gemm", "gemm"]


def test_identical_layers_share_kernels(llama_program):
    _, _, _, steps = llama_program
    keys = [group_key(s.graph, "cpu") for s in kernels(steps)]
    assert len(keys) >= 3 * 8 and len(set(keys)) <= 14  # layers add no new kernels
    for step in kernels(steps):
        assert not step.graph.constants  # weights are parameters


@pytest.mark.parametrize("lengths", [[3, 5, 1], [17, 2]])
def test_executor_matches_interpreter(llama_program, lengths):
    config, _, graph, steps = llama_program
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in lengths]
    expected_inputs = pack_prompts(config, prompts, all_logits=True)
    inputs = pack_prompts(config, prompts, all_logits=True)
    expected_logits, expected_cache = ir.interpret(graph, *expected_inputs.as_tuple())
    logits, cache = Executor(graph, steps, interpreted_kernel)(*inputs.as_tuple())
    torch.testing.assert_close(logits, expected_logits)
    assert cache is inputs.kv_cache  # written in place, layer by layer
    torch.testing.assert_close(cache, expected_cache)


def test_bert_partition_runs_like_the_graph():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    model = bert.BertModel(config).eval()
    example, dynamic = capture_example(config)
    graph = run_passes(capture(model, example, dynamic))
    steps = partition(graph)
    ids = torch.randint(0, 97, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.int64)
    mask[2, 4:] = 0
    torch.testing.assert_close(Executor(graph, steps, interpreted_kernel)(ids, mask), ir.interpret(graph, ids, mask))
    assert sum(s.ops == ("attention",) for s in kernels(steps)) == 2


def test_elementwise_chain_fuses_into_one_kernel_through_views():
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 8), "f32"))
    y = b.op("exp", b.op("reshape", b.op("mul", x, scalar=2.0), shape=(T, 2, 4)))
    z = b.op("gemm", b.op("reshape", y, shape=(T, 8)), b.constant("w", torch.randn(3, 8)))
    steps = partition(b.build([z]))
    assert [type(s).__name__ for s in steps] == ["KernelGroup", "ViewStep", "KernelGroup"]
    assert steps[0].ops == ("mul", "reshape", "exp")  # the inner reshape is read in-kernel
    assert steps[2].ops == ("gemm",)


def test_a_value_read_twice_ends_its_kernel():
    b = GraphBuilder()
    x = b.input("x", TensorType((4,), "f32"))
    shared = b.op("exp", x)
    out = b.op("add", b.op("neg", shared), b.op("sin", shared))
    steps = partition(b.build([out]))
    assert [s.ops for s in steps] == [("exp",), ("neg", "sin", "add")]
    t = torch.randn(4)
    torch.testing.assert_close(Executor(b.build([out]), steps, interpreted_kernel)(t), torch.exp(t).neg() + torch.exp(t).sin())


def test_a_product_seen_only_whole_is_one_symbol_and_a_split_one_reads_a_size_source():
    """A gemm on [B*S, D] rows (a flattened view made outside the group) is the kernel of
    any [M, D] rows: one symbol, read from its input. A group that needs B and S apart
    (a reshape to [B, S, N] inside it) but sees only B*S gets a graph input giving them."""
    b = GraphBuilder()
    ids = b.input("ids", TensorType(("B", "S"), "i64"))
    x = b.input("x", TensorType(("B", "S", 8), "f32"))
    rows = b.op("reshape", b.op("exp", x), shape=(symbol("B") * symbol("S"), 8))
    h = b.op("gemm", rows, b.constant("w", torch.randn(16, 8)))
    out = b.op("gelu", b.op("reshape", b.op("exp", h), shape=(symbol("B"), symbol("S"), 16)))
    out = b.op("add", out, b.op("cast", b.op("reshape", ids, shape=(symbol("B"), symbol("S"), 1)), dtype="f32"))
    graph = b.build([out])
    steps = [s for s in partition(graph) if isinstance(s, KernelGroup)]
    gemm = next(s for s in steps if "gemm" in s.ops)
    assert [str(v.type) for v in gemm.graph.inputs] == ["f32[n0,8]", "f32[16,8]"]
    split = next(s for s in steps if "gelu" in s.ops)
    assert ids in split.args  # B and S are read from the shape of ids
    inputs = (torch.randint(0, 5, (2, 3)), torch.randn(2, 3, 8))
    torch.testing.assert_close(Executor(graph, partition(graph), interpreted_kernel)(*inputs), ir.interpret(graph, *inputs))
