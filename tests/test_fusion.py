"""Fusion passes: Before graph, expected After structure, rewrite count, same results.

Each pass is checked on a small hand-built graph against the reference interpreter, with
negative cases where its pattern must not fire, and on captured models.
"""
import math

import pytest
import torch

from fuselm import ir
from fuselm.frontend import capture
from fuselm.ir import GraphBuilder, TensorType, symbol
from fuselm.models.contract import pack_prompts
from fuselm.passes import CLEANUP, counters, run_passes
from fuselm.passes.fuse_attention import fuse_attention
from fuselm.passes.fuse_epilogue import fuse_epilogue
from fuselm.passes.fuse_norm import fuse_norm
from fuselm.passes.fuse_sibling_gemms import fuse_sibling_gemms
from tiny_models import captured, tiny_llama

from pass_checks import fresh_counters, same_results  # noqa: F401 (fresh_counters: autouse)

T = symbol("T")




def ops(graph):
    return [n.op for n in graph.nodes]


def weight(b, name, *shape):
    return b.constant(name, torch.randn(*shape))


# ----------------------------------------------------------------------------- fuse_epilogue
def test_epilogue_bias_gelu_residual_chain():
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 8), "f32"))
    r = b.input("r", TensorType(("T", 6), "f32"))
    y = b.op("add", b.op("gemm", x, weight(b, "w", 6, 8)), weight(b, "bias", 6))
    y = b.op("add", r, b.op("gelu", y, approximate="tanh"))
    before = b.build([y])
    after = fuse_epilogue(before)
    assert ops(after) == ["gemm"]
    assert after.nodes[0].attrs["epilogue"] == ("bias", "gelu_tanh", "residual")
    assert counters["fuse_epilogue.bias"] == counters["fuse_epilogue.gelu_tanh"] == counters["fuse_epilogue.residual"] == 1
    same_results(before, after, torch.randn(5, 8), torch.randn(5, 6))


def test_epilogue_gated_silu_concatenates_weights():
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 8), "f32"))
    gate = b.op("silu", b.op("gemm", x, weight(b, "mlp.gate_proj.weight", 12, 8)))
    up = b.op("gemm", x, weight(b, "mlp.up_proj.weight", 12, 8))
    before = b.build([b.op("mul", up, gate)])
    after = fuse_epilogue(before)
    assert ops(after) == ["gemm"] and after.nodes[0].attrs["epilogue"] == ("gated_silu",)
    assert list(after.constants) == ["mlp.gate_proj+up_proj.weight"]
    assert str(after.nodes[0].type) == "f32[T,12]"
    assert counters["fuse_epilogue.gated_silu"] == 1 and counters["fuse_epilogue.silu"] == 0
    same_results(before, after, torch.randn(3, 8))


def test_epilogue_does_not_fuse_a_gemm_used_twice():
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 8), "f32"))
    g = b.op("gemm", x, weight(b, "w", 6, 8))
    before = b.build([b.op("relu", g), g])  # the raw gemm result is needed too
    after = fuse_epilogue(before)
    assert ops(after) == ["gemm", "relu"]
    assert sum(counters.values()) == 0


def test_epilogue_rejects_broadcasting_residual_and_late_bias():
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 8), "f32"))
    row = b.input("row", TensorType((1, 6), "f32"))
    y = b.op("add", b.op("relu", b.op("gemm", x, weight(b, "w", 6, 8))), row)  # broadcast: not a residual
    after = fuse_epilogue(b.build([y]))
    assert ops(after) == ["gemm", "add"] and after.nodes[0].attrs["epilogue"] == ("relu",)
    assert counters["fuse_epilogue.residual"] == 0 and counters["fuse_epilogue.bias"] == 0


# ----------------------------------------------------------------------------- fuse_norm
def test_norm_takes_the_residual_add_read_elsewhere():
    b = GraphBuilder()
    a = b.input("a", TensorType(("T", 8), "f32"))
    c = b.input("c", TensorType(("T", 8), "f32"))
    total = b.op("add", a, c)
    normed = b.op("layer_norm", total, weight(b, "ln.weight", 8), weight(b, "ln.bias", 8), eps=1e-5)
    later = b.op("mul", total, scalar=2.0)  # the residual stream goes on
    before = b.build([normed, later])
    after = fuse_norm(before)
    assert ops(after) == ["layer_norm", "select", "select", "mul"]
    fused = after.nodes[0]
    assert fused.attrs["residual"] is True and str(fused.type) == "f32[2,T,8]"
    assert counters["fuse_norm.add_norm"] == 1
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    for got, expected in zip(ir.interpret(after, x, y), ir.interpret(before, x, y)):
        torch.testing.assert_close(got, expected)


def test_norm_leaves_an_add_of_different_shapes_alone():
    b = GraphBuilder()
    a = b.input("a", TensorType(("T", 8), "f32"))
    bias = b.input("bias", TensorType((8,), "f32"))
    before = b.build([b.op("rms_norm", b.op("add", a, bias), weight(b, "w", 8), eps=1e-6)])
    assert ops(fuse_norm(before)) == ["add", "rms_norm"]
    assert counters["fuse_norm.add_norm"] == 0


# ----------------------------------------------------------------------------- fuse_sibling_gemms
def test_sibling_gemms_share_one_gemm():
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 8), "f32"))
    q = b.op("gemm", x, weight(b, "attn.q_proj.weight", 8, 8))
    k = b.op("gemm", x, weight(b, "attn.k_proj.weight", 4, 8))
    v = b.op("gemm", x, weight(b, "attn.v_proj.weight", 4, 8))
    other = b.op("gemm", x, weight(b, "other.weight", 4, 8), weight(b, "other.bias", 4), epilogue=("bias",))
    before = b.build([b.op("concat", q, k, v, other, dim=1)])
    after = fuse_sibling_gemms(before)
    assert ops(after) == ["gemm", "slice", "slice", "slice", "gemm", "concat"]
    assert "attn.q_proj+k_proj+v_proj.weight" in after.constants
    assert [(n.attrs["start"], n.attrs["end"]) for n in after.nodes[1:4]] == [(0, 8), (8, 12), (12, 16)]
    assert counters["fuse_sibling_gemms.siblings"] == 1
    same_results(before, after, torch.randn(5, 8))


def test_biased_siblings_concatenate_their_biases_too():
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 8), "f32"))
    q = b.op("gemm", x, weight(b, "self.query.weight", 8, 8), weight(b, "self.query.bias", 8), epilogue=("bias",))
    k = b.op("gemm", x, weight(b, "self.key.weight", 8, 8), weight(b, "self.key.bias", 8), epilogue=("bias",))
    plain = b.op("gemm", x, weight(b, "plain.weight", 4, 8))  # another kind: left alone
    before = b.build([b.op("concat", q, k, dim=1), plain])
    after = fuse_sibling_gemms(before)
    assert ops(after) == ["gemm", "slice", "slice", "gemm", "concat"]
    assert {"self.query+key.weight", "self.query+key.bias"} <= set(after.constants)
    assert counters["fuse_sibling_gemms.siblings"] == 1
    x_value = torch.randn(5, 8)
    for got, expected in zip(ir.interpret(after, x_value), ir.interpret(before, x_value)):
        torch.testing.assert_close(got, expected)


def test_a_lone_gemm_is_not_a_sibling():
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 8), "f32"))
    before = b.build([b.op("gemm", x, weight(b, "w", 4, 8))])
    assert fuse_sibling_gemms(before).nodes == before.nodes


# ----------------------------------------------------------------------------- fuse_attention
class ExplicitAttention(torch.nn.Module):
    """Attention as Hugging Face's eager BERT/GPT-2 write it, with optional repeat_kv."""

    def __init__(self, groups: int = 1):
        super().__init__()
        self.groups = groups

    def repeat_kv(self, x):
        b, h, s, d = x.shape
        return x[:, :, None].expand(b, h, self.groups, s, d).reshape(b, h * self.groups, s, d)

    def forward(self, q, k, v, mask):
        k, v = self.repeat_kv(k), self.repeat_kv(v)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        return torch.matmul(torch.softmax(scores + mask, dim=-1), v)


@pytest.mark.parametrize("groups", [1, 2])
def test_explicit_attention_becomes_one_op(groups):
    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 4 // groups, 7, 8), torch.randn(2, 4 // groups, 7, 8)
    mask = torch.zeros(2, 1, 1, 7)
    mask[1, ..., 4:] = -1e9  # padding mask of the second sequence
    dynamic = {"q": {2: "S"}, "k": {2: "S"}, "v": {2: "S"}, "mask": {3: "S"}}
    before = run_passes(capture(ExplicitAttention(groups), (q, k, v, mask), dynamic), passes=CLEANUP)
    after = fuse_attention(before)
    assert ops(after) == ["attention"]
    node = after.nodes[0]
    assert node.attrs["scale"] == pytest.approx(8 ** -0.5) and node.attrs["gqa"] == (groups > 1)
    assert counters["fuse_attention.attention"] == 1
    same_results(before, after, q, k, v, mask)


def test_flattened_batch_matmul_is_restored():
    """core ATen's spelling of a 4-d matmul: reshape to 3-d, bmm, reshape back."""
    b = GraphBuilder()
    x = b.input("x", TensorType((2, 3, "S", 4), "f32"))
    y = b.input("y", TensorType((2, 3, 4, "S"), "f32"))
    flat = b.op("matmul", b.op("reshape", x, shape=(6, symbol("S"), 4)), b.op("reshape", y, shape=(6, 4, symbol("S"))))
    before = b.build([b.op("reshape", flat, shape=(2, 3, symbol("S"), symbol("S")))])
    after = fuse_attention(before)
    assert ops(after) == ["matmul"] and counters["fuse_attention.batched_matmul"] == 1
    same_results(before, after, torch.randn(2, 3, 5, 4), torch.randn(2, 3, 4, 5))


def test_attention_without_softmax_is_left_alone():
    b = GraphBuilder()
    q = b.input("q", TensorType((1, 2, "S", 4), "f32"))
    k = b.input("k", TensorType((1, 2, "S", 4), "f32"))
    before = b.build([b.op("matmul", q, b.op("permute", k, dims=(0, 1, 3, 2)))])
    assert ops(fuse_attention(before)) == ["permute", "matmul"]


@pytest.fixture(scope="module")
def llama_graph():
    config, model = tiny_llama()
    return config, run_passes(captured(config, model), passes=CLEANUP)


def test_rope_is_found_and_folded_into_the_cache_ops(llama_graph):
    config, before = llama_graph
    after = fuse_attention(before)
    assert counters["fuse_attention.rope"] == 4  # q and k of two layers
    assert counters["fuse_attention.rope_into_cache_write"] == counters["fuse_attention.rope_into_paged_attention"] == 2
    assert "rope" not in ops(after) and "neg" not in ops(after)
    assert all(n.attrs.get("rope") for n in after.nodes if n.op in ("kv_cache_write", "paged_attention"))
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8]]
    logits_before, cache_before = ir.interpret(before, *pack_prompts(config, prompts, all_logits=True).as_tuple())
    logits_after, cache_after = ir.interpret(after, *pack_prompts(config, prompts, all_logits=True).as_tuple())
    torch.testing.assert_close(logits_after, logits_before)
    torch.testing.assert_close(cache_after, cache_before)  # keys are stored rotated, as before
