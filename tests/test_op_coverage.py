"""The op registry walk: every IR op has a generated kernel on each target (Triton or TIR
source, not a call into torch), or is a view; only fallback ops and the transient
quantize/dequantize ops (folded into qgemm by the pass after the one inserting them) are exempt. Ops added
later fall under the same walk: an op without a sample group here fails it.

Correctness of each kernel is tested per target (test_generic_kernels_cpu/_cuda.py and the
dedicated files); this walk proves nothing is left without a kernel."""
import pytest

from fuselm.codegen import triton as cuda
from fuselm.codegen import tvm as cpu
from fuselm.ir import GraphBuilder, TensorType, symbol
from fuselm.ir.registry import all_ops
from test_generic_kernels_cpu import CASES, DEDICATED, one_op_group

T = symbol("T")

# Item 1 of the compile-any-model issue names these; each must stay registered.
NAMED_OPS = {
    "matmul", "sum", "mean", "amax", "amin", "argmax", "argmin", "var", "softmax", "log_softmax",
    "where", "masked_fill", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not",
    "logical_xor", "cumsum", "gather", "index_select", "concat", "slice", "copy", "tril", "triu", "permute",
}


def dedicated_group(op: str):
    """A sample group of each op with its own emitter and tests."""
    b = GraphBuilder()
    x = b.input("x", TensorType((T, 16), "f32"))
    if op == "gemm":
        return b.build([b.op(op, x, b.input("w", TensorType((8, 16), "f32")))])
    if op == "qgemm":
        q, scale = b.input("q", TensorType((8, 16), "i8")), b.input("scale", TensorType((8, 1), "f32"))
        return b.build([b.op(op, x, q, scale, format="int8", group_size=16, n=8, k=16, parts=["q", "scale"],
                             activations="float")])
    if op in ("layer_norm", "rms_norm"):
        return b.build([b.op(op, x, b.input("w", TensorType((16,), "f32")), eps=1e-5)])
    if op == "embedding":
        ids = b.input("ids", TensorType((T,), "i64"))
        return b.build([b.op(op, b.input("table", TensorType((32, 16), "f32")), ids)])
    if op == "qembedding":
        ids = b.input("ids", TensorType((T,), "i64"))
        q, scale = b.input("q", TensorType((32, 16), "u8")), b.input("scale", TensorType((32, 1), "f16"))
        return b.build([b.op(op, ids, q, scale, format="nf4", group_size=32, n=32, k=16)])
    if op == "rope":
        heads = b.input("q", TensorType((T, 2, 16), "f32"))
        return b.build([b.op(op, heads, x, b.input("sin", TensorType((T, 16), "f32")))])
    if op == "attention":
        q, k, v = (b.input(n, TensorType((1, 2, T, 16), "f32")) for n in "qkv")
        return b.build([b.op(op, q, k, v, causal=True, scale=0.25)])
    if op == "pack":
        padded = b.input("padded", TensorType((2, symbol("S"), 16), "f32"))
        return b.build([b.op(op, padded, b.input("tokens", TensorType((T,), "i64")))])
    if op == "unpack":
        return b.build([b.op(op, x, b.input("positions", TensorType((2, symbol("S")), "i64")))])
    if op == "varlen_attention":
        q, k, v = (b.input(n, TensorType((T, 2, 16), "f32")) for n in "qkv")
        cu = b.input("cu", TensorType((3,), "i32"))
        return b.build([b.op(op, q, k, v, cu, causal=False, scale=None)])
    cache = b.input("cache", TensorType((1, 2, 4, 4, 2, 16), "f32"))
    if op == "kv_cache_write":
        k, v = (b.input(n, TensorType((T, 2, 16), "f32")) for n in "kv")
        return b.build([b.op(op, cache, k, v, b.input("slots", TensorType((T,), "i64")), layer=0)])
    query = b.input("q", TensorType((T, 2, 16), "f32"))
    tables = b.input("tables", TensorType((2, 4), "i32"))
    lens, starts = b.input("lens", TensorType((2,), "i32")), b.input("cu", TensorType((3,), "i32"))
    return b.build([b.op(op, query, cache, tables, lens, starts, layer=0, scale=0.25)])


def sample_group(op: str):
    if op in DEDICATED:
        return dedicated_group(op)
    case = CASES[op][0]
    if case.inputs:
        return one_op_group(op, case)
    b = GraphBuilder()  # a generator of T elements: partition gives its kernel an input of that size
    b.input("sizes", TensorType((T,), "f32"))
    sized = {"end": T} if op == "arange" else {"shape": (T,) + tuple(case.attrs["shape"][1:])}
    return b.build([b.op(op, **{**case.attrs, **sized})])


def kernel_ops():
    return sorted(name for name, op in all_ops().items() if not (op.view or op.fallback or op.transient))


def test_the_ops_the_issue_names_are_registered():
    assert NAMED_OPS <= set(all_ops()), sorted(NAMED_OPS - set(all_ops()))


def test_only_views_fallbacks_and_transient_ops_are_exempt():
    exempt = {name for name, op in all_ops().items() if op.view or op.fallback or op.transient}
    assert exempt == {"reshape", "permute", "slice", "select", "expand", "aten", "dequantize", "quantize_dynamic"}


@pytest.mark.parametrize("op", kernel_ops())
def test_every_op_has_a_generated_kernel_on_both_targets(op, tmp_path):
    group = sample_group(op)
    tir = cpu.emit(group)
    assert "T.prim_func" in tir.source and tir.source_ext == "tir", f"no TIR for {op}"
    triton = cuda.emit(group, tmp_path)
    assert "@triton.jit" in triton.source and triton.source_ext == "py", f"no Triton kernel for {op}"
