"""Cleanup passes: Before graph, expected After structure, rewrite count, same results."""
import pytest
import torch

from fuselm import ir
from fuselm.errors import FuselmError
from fuselm.ir import Graph, GraphBuilder, IRVerificationError, Node, TensorType, symbol
from fuselm.passes.manager import PassError
from fuselm.passes import PIPELINE, counters, run_passes
from fuselm.passes.common_subexpressions import eliminate_common_subexpressions
from fuselm.passes.constant_folding import fold_constants
from fuselm.passes.dead_code import eliminate_dead_code
from fuselm.passes.canonicalize import canonicalize

T = symbol("T")


@pytest.fixture(autouse=True)
def fresh_counters():
    counters.clear()


def assert_same_results(before: Graph, after: Graph, *inputs):
    ir.verify(after)
    expected, got = ir.interpret(before, *inputs), ir.interpret(after, *inputs)
    for e, g in zip(expected if isinstance(expected, tuple) else (expected,), got if isinstance(got, tuple) else (got,)):
        torch.testing.assert_close(g, e)


def test_dead_code_drops_unused_nodes_and_constants():
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 4), "f32"))
    used = b.op("relu", x)
    b.op("gemm", used, b.constant("unused.w", torch.randn(3, 4)))  # nobody reads it
    b.op("exp", x)
    before = b.build([used])
    after = eliminate_dead_code(before)
    assert [n.op for n in after.nodes] == ["relu"]
    assert after.constants == {}
    assert counters["dead_code.nodes"] == 2 and counters["dead_code.constants"] == 1
    assert_same_results(before, after, torch.randn(5, 4))


def cache_graph(read_cache: bool):
    """A cache write whose result is a graph output; optionally an attention reads it."""
    b = GraphBuilder()
    cache = b.input("kv_cache", TensorType((1, 2, "NB", 2, 1, 4), "f32"))
    k = b.input("k", TensorType(("T", 1, 4), "f32"))
    slots = b.input("slot_mapping", TensorType(("T",), "i64"))
    written = b.op("kv_cache_write", cache, k, b.op("neg", k), slots, layer=0)
    out = b.op("exp", k)
    return b.build([out, written])


def test_dead_code_keeps_cache_write_that_is_an_output():
    before = cache_graph(read_cache=False)
    after = run_passes(before)
    assert [n.op for n in after.nodes].count("kv_cache_write") == 1
    cache = torch.zeros(1, 2, 3, 2, 1, 4)
    k = torch.randn(3, 1, 4)
    _, updated = ir.interpret(after, cache, k, torch.tensor([0, 5, 2]))
    torch.testing.assert_close(updated[0, 0, 2, 1], k[1])
    torch.testing.assert_close(updated[0, 1, 1, 0], -k[2])


def test_cse_merges_duplicates_in_one_sweep():
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 4), "f32"))
    a1, a2 = b.op("exp", x), b.op("exp", x)
    c1, c2 = b.op("mul", a1, scalar=2.0), b.op("mul", a2, scalar=2.0)  # equal once a1 == a2
    d = b.op("mul", a1, scalar=3.0)  # different attribute: stays
    before = b.build([b.op("add", b.op("add", c1, c2), d)])
    after = eliminate_common_subexpressions(before)
    assert [n.op for n in after.nodes] == ["exp", "mul", "mul", "add", "add"]
    assert counters["cse.merged"] == 2
    assert_same_results(before, after, torch.randn(3, 4))


def test_cse_never_merges_side_effects():
    b = GraphBuilder()
    cache = b.input("kv_cache", TensorType((1, 2, 2, 2, 1, 4), "f32"))
    k = b.input("k", TensorType(("T", 1, 4), "f32"))
    slots = b.input("slot_mapping", TensorType(("T",), "i64"))
    w1 = b.op("kv_cache_write", cache, k, k, slots, layer=0)
    w2 = b.op("kv_cache_write", w1, k, k, slots, layer=0)
    after = eliminate_common_subexpressions(b.build([w2]))
    assert [n.op for n in after.nodes] == ["kv_cache_write", "kv_cache_write"]
    assert counters["cse.merged"] == 0


def test_constant_folding_evaluates_constant_subgraphs():
    torch.manual_seed(0)
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 4), "f32"))
    freq = b.constant("inv_freq", torch.rand(4))
    scaled = b.op("mul", b.op("reshape", freq, shape=(1, 4)), scalar=2.0)  # two foldable nodes
    ramp = b.op("arange", end=4, dtype="f32")  # no inputs, static shape: folds
    symbolic = b.op("arange", end=T, dtype="f32")  # symbolic shape: stays
    y = b.op("add", b.op("mul", x, scaled), ramp)
    before = b.build([y, symbolic])
    after = fold_constants(before)
    assert [n.op for n in after.nodes] == ["arange", "mul", "add"]
    assert counters["constant_folding.folded"] == 3
    assert "inv_freq" not in after.constants  # only the folded constant is left
    assert_same_results(before, after, torch.randn(6, 4))


def test_constant_folding_leaves_graph_inputs_alone():
    b = GraphBuilder()
    x = b.input("x", TensorType((4,), "f32"))
    before = b.build([b.op("mul", x, b.constant("c", torch.ones(4)))])
    assert fold_constants(before).nodes == before.nodes
    assert counters["constant_folding.folded"] == 0


def test_canonicalize_removes_identities():
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 4), "f32"))
    y = b.op("reshape", x, shape=(T, 4))
    y = b.op("cast", y, dtype="f32")
    y = b.op("mul", y, scalar=1)
    y = b.op("permute", y, dims=(0, 1))
    kept = b.op("reshape", y, shape=(T, 2, 2))  # a real reshape
    before = b.build([kept])
    after = canonicalize(before)
    assert [n.op for n in after.nodes] == ["reshape"] and after.nodes[0].inputs[0] is x
    assert sum(v for k, v in counters.items() if k.startswith("canonicalize.")) == 4
    assert_same_results(before, after, torch.randn(3, 4))


def test_canonicalize_takes_one_element_constants_as_scalars():
    """ONNX's 0-d initializers as torch capture's `scalar` attribute (left operands
    `reverse`); a constant of another dtype, or one that would broadcast the result, stays."""
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 4), "f32"))
    half, three, one = b.constant("half", torch.tensor(0.5)), b.constant("three", torch.tensor([3.0])), b.constant("one", torch.tensor(1.0))
    y = b.op("pow", b.op("mul", x, half), three)
    y = b.op("sub", one, y)  # 1 - y: reverse
    y = b.op("mul", y, one)  # an identity once scalar
    y = b.op("add", y, b.constant("i", torch.tensor(2, dtype=torch.int32)))  # another dtype: stays
    n = b.input("n", TensorType((), "f32"))
    z = b.op("mul", n, b.constant("row", torch.tensor([2.0])))  # [] * [1] is [1]: stays
    before = b.build([y, z, b.op("logical_and", b.constant("yes", torch.tensor(True)), b.op("gt", x, scalar=0.0))])
    after = canonicalize(before)
    ops = [(n.op, n.attrs.get("scalar"), n.attrs.get("reverse", False), len(n.inputs)) for n in after.nodes]
    assert ops == [("mul", 0.5, False, 1), ("pow", 3.0, False, 1), ("sub", 1.0, True, 1), ("add", None, False, 2),
                   ("mul", None, False, 2), ("gt", 0.0, False, 1)]
    assert counters["canonicalize.scalar_operand"] == 5 and counters["canonicalize.mul"] == 1
    assert counters["canonicalize.logical_and"] == 1
    assert_same_results(before, after, torch.randn(3, 4), torch.tensor(1.5))


def test_manager_dumps_every_pass_and_disables_by_name(tmp_path):
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 4), "f32"))
    before = b.build([b.op("add", b.op("exp", x), b.op("exp", x))])
    after = run_passes(before, dump_dir=str(tmp_path), disable=["constant_folding"])
    names = sorted(p.name for p in tmp_path.iterdir())
    expected = ["00_captured.ir"] + [f"{i:02d}_{n}.ir" for i, (n, _) in enumerate((p for p in PIPELINE if p[0] != "constant_folding"), 1)]
    assert names == expected
    last = (tmp_path / names[-1]).read_text()
    assert last == str(after) and str(ir.parse(last, constants=after.constants)) == last
    assert len(after.nodes) == 2
    with pytest.raises(ValueError, match="cannot disable unknown passes"):
        run_passes(before, disable=["no_such_pass"])


def test_fuselm_dump_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSELM_DUMP", str(tmp_path))
    b = GraphBuilder()
    x = b.input("x", TensorType((2,), "f32"))
    run_passes(b.build([b.op("neg", x)]))
    assert (tmp_path / "00_captured.ir").exists()


def test_verifier_runs_after_every_pass(monkeypatch):
    def broken_pass(graph):
        node = graph.nodes[0]
        wrong = Node(node.op, node.inputs, node.attrs, TensorType((7,), "f32"))
        return Graph(graph.inputs, [wrong], [wrong], graph.constants)

    b = GraphBuilder()
    x = b.input("x", TensorType((2,), "f32"))
    graph = b.build([b.op("neg", x)])
    monkeypatch.setenv("FUSELM_VERIFY", "1")
    with pytest.raises(PassError, match="pass 'broken' produced an invalid graph: .*type says f32\\[7\\]") as raised:
        run_passes(graph, passes=[("broken", broken_pass)])
    assert isinstance(raised.value.__cause__, IRVerificationError) and isinstance(raised.value, FuselmError)
    monkeypatch.setenv("FUSELM_VERIFY", "0")
    run_passes(graph, passes=[("broken", broken_pass)])  # unchecked without the flag
