"""The IR on its own: types, builder, interpreter, text round trip, verifier."""
import math

import pytest
import torch

from fuselm import ir
from fuselm.ir import Graph, GraphBuilder, IRVerificationError, Node, TensorType, symbol

T, N = symbol("T"), symbol("N")


def small_graph():
    """x[T,8] -> gemm -> reshape [T,2,2] -> softmax -> * 0.5, plus a 1-input-scalar sub."""
    torch.manual_seed(0)
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 8), "f32"))
    w = b.constant("layer.w", torch.randn(4, 8))
    bias = b.constant("layer.b", torch.randn(4))
    h = b.op("gemm", x, w, bias, epilogue=("bias",))
    r = b.op("reshape", h, shape=(T, 2, 2))
    s = b.op("softmax", r, dim=2)
    m = b.op("mul", s, scalar=0.5)
    d = b.op("sub", m, scalar=1.0, reverse=True)
    return b.build([d, r]), (w, bias)


def test_types_print_and_parse():
    t = TensorType(("T", 576), "f32")
    assert str(t) == "f32[T,576]"
    assert ir.parse_type("i32[N+1]") == TensorType((N + 1,), "i32")
    assert str(ir.parse_type("bf16[]")) == "bf16[]"
    assert TensorType(("T", 9), "f32").numel() == 9 * T
    with pytest.raises(TypeError, match="unknown dtype"):
        TensorType((1,), "f12")


def test_interpret_matches_torch():
    g, _ = small_graph()
    x = torch.randn(5, 8)
    out, reshaped = ir.interpret(g, x)
    expected_r = torch.nn.functional.linear(x, g.constants["layer.w"], g.constants["layer.b"]).reshape(5, 2, 2)
    torch.testing.assert_close(reshaped, expected_r)
    torch.testing.assert_close(out, 1.0 - 0.5 * expected_r.softmax(2))


def test_interpret_rejects_wrong_inputs():
    g, _ = small_graph()
    with pytest.raises(TypeError, match=r"%x expects f32\[T,8\]"):
        ir.interpret(g, torch.randn(5, 7))
    with pytest.raises(TypeError, match="takes 1 inputs"):
        ir.interpret(g)


def test_symbols_shared_between_inputs_must_agree():
    b = GraphBuilder()
    a = b.input("a", TensorType(("N",), "f32"))
    c = b.input("c", TensorType(("N+1",), "f32"))
    g = b.build([b.op("add", a, b.op("slice", c, dim=0, start=1, end=None, step=1))])
    torch.testing.assert_close(ir.interpret(g, torch.ones(3), torch.arange(4.0)), torch.tensor([2.0, 3.0, 4.0]))
    with pytest.raises(TypeError, match="c expects f32\\[N\\+1\\]"):
        ir.interpret(g, torch.ones(3), torch.ones(3))


def test_text_round_trip_with_every_attribute_kind():
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 4), "f32"))
    ids = b.input("ids", TensorType(("N+1",), "i64"))
    y = b.op("gelu", x, approximate="tanh")
    y = b.op("mul", y, scalar=-1.5e-07)
    y = b.op("masked_fill", y, b.op("lt", y, scalar=0.0), value=-math.inf)
    y = b.op("reshape", y, shape=(2 * T, 2))
    z = b.op("cast", ids, dtype="f32")
    g = b.build([y, z])
    text = str(g)
    assert 'approximate="tanh"' in text and "shape=[2*T, 2]" in text and "value=-inf" in text
    again = ir.parse(text, constants=g.constants)
    assert str(again) == text
    ir.verify(again)


def test_round_trip_keeps_constants_and_sources():
    g, _ = small_graph()
    g.nodes[0].source = "model.py:12"
    text = str(g)
    assert "# model.py:12" in text and "@layer.w : f32[4,8]" in text
    again = ir.parse(text, constants=g.constants)
    assert str(again) == text
    x = torch.randn(3, 8)
    torch.testing.assert_close(ir.interpret(again, x)[0], ir.interpret(g, x)[0])


def test_parse_reports_the_bad_line():
    g, _ = small_graph()
    text = str(g).replace("softmax(", "softmax(%99, ")
    with pytest.raises(ir.IRParseError, match=r"line \d+: .*%99 is not defined"):
        ir.parse(text, constants=g.constants)
    with pytest.raises(ir.IRParseError, match="constant @layer.w was not supplied"):
        ir.parse(str(g), constants={})


def test_verifier_rejects_bad_type():
    g, _ = small_graph()
    bad = Node("softmax", g.nodes[2].inputs, g.nodes[2].attrs, TensorType(("T", 2, 3), "f32"))
    nodes = list(g.nodes)
    nodes[2] = bad
    broken = Graph(g.inputs, nodes, [bad], g.constants)
    with pytest.raises(IRVerificationError, match=r"%2 = softmax\(%1\).*type says f32\[T,2,3\] but the op infers f32\[T,2,2\]"):
        ir.verify(broken)


def test_verifier_rejects_use_before_definition():
    g, _ = small_graph()
    nodes = list(g.nodes)
    nodes[1], nodes[2] = nodes[2], nodes[1]  # softmax now reads the reshape defined after it
    with pytest.raises(IRVerificationError, match=r"%1 = softmax.*is used before it is defined"):
        ir.verify(Graph(g.inputs, nodes, g.outputs, g.constants))


def test_verifier_rejects_dangling_output():
    g, _ = small_graph()
    stray = Node("neg", (g.inputs[0],), {}, g.inputs[0].type)
    with pytest.raises(IRVerificationError, match=r"output 2 .* is not defined in this graph"):
        ir.verify(Graph(g.inputs, g.nodes, g.outputs + [stray], g.constants))


def test_verifier_rejects_unknown_op_and_bad_arity():
    g, _ = small_graph()
    odd = Node("frobnicate", (g.inputs[0],), {}, g.inputs[0].type)
    with pytest.raises(IRVerificationError, match="unknown op 'frobnicate'"):
        ir.verify(Graph(g.inputs, [odd], [odd], g.constants))
    twice = Node("neg", (g.inputs[0], g.inputs[0]), {}, g.inputs[0].type)
    with pytest.raises(IRVerificationError, match="neg takes 1..1 inputs, got 2"):
        ir.verify(Graph(g.inputs, [twice], [twice], g.constants))


def test_type_inference_errors_name_the_problem():
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 8), "f32"))
    with pytest.raises(ir.IRTypeError, match="disagree on K"):
        b.op("gemm", x, b.constant("w", torch.zeros(4, 7)))
    with pytest.raises(ir.IRTypeError, match="do not broadcast"):
        b.op("add", x, b.constant("v", torch.zeros(3)))
    with pytest.raises(ir.IRTypeError, match="elements"):
        b.op("reshape", x, shape=(T, 3))


def test_kv_cache_write_aliases_its_input():
    cache = torch.zeros(1, 2, 2, 2, 1, 3)
    b = GraphBuilder()
    c = b.input("kv_cache", TensorType.of(cache))
    k = b.input("k", TensorType(("T", 1, 3), "f32"))
    v = b.input("v", TensorType(("T", 1, 3), "f32"))
    slots = b.input("slot_mapping", TensorType(("T",), "i64"))
    out = b.op("kv_cache_write", c, k, v, slots, layer=0)
    g = b.build([out])
    assert ir.get_op("kv_cache_write").aliases_input == 0
    keys, values = torch.randn(2, 1, 3), torch.randn(2, 1, 3)
    result = ir.interpret(g, cache, keys, values, torch.tensor([3, 0]))
    assert result is cache  # updated in place, as the executor will bind it
    torch.testing.assert_close(cache[0, 0, 1, 1], keys[0])
    torch.testing.assert_close(cache[0, 1, 0, 0], values[1])


def test_a_symbol_seen_only_in_an_expression_is_solved():
    b = GraphBuilder()
    c = b.input("cu", TensorType(("N+1",), "i32"))
    g = b.build([b.op("arange", end=N, dtype="i64"), b.op("cast", c, dtype="i64")])
    steps, _ = ir.interpret(g, torch.tensor([0, 3, 5], dtype=torch.int32))
    torch.testing.assert_close(steps, torch.arange(2))


def test_integer_dtype_rules_follow_torch():
    b = GraphBuilder()
    i = b.input("i", TensorType((4,), "i32"))
    assert str(b.op("exp", i).type) == "f32[4]"
    assert str(b.op("sum", i, dims=()).type) == "i64[]"
    assert str(b.op("neg", i).type) == "i32[4]"
    with pytest.raises(ir.IRTypeError, match="non-negative start"):
        b.op("slice", i, dim=0, start=-2, end=None, step=1)


def test_gemm_epilogue_semantics():
    torch.manual_seed(0)
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 8), "f32"))
    w = b.constant("w", torch.randn(12, 8))
    res = b.input("res", TensorType(("T", 6), "f32"))
    y = b.op("gemm", x, w, res, epilogue=("gated_silu", "residual"))
    assert str(y.type) == "f32[T,6]"
    g = b.build([y])
    xx, rr = torch.randn(3, 8), torch.randn(3, 6)
    full = xx @ g.constants["w"].T
    torch.testing.assert_close(ir.interpret(g, xx, rr), torch.nn.functional.silu(full[:, :6]) * full[:, 6:] + rr)
    with pytest.raises(ir.IRTypeError, match="unknown epilogue step 'swish'"):
        b.op("gemm", x, w, epilogue=("swish",))
    with pytest.raises(ir.IRTypeError, match="inputs beyond what the epilogue"):
        b.op("gemm", x, w, res)
