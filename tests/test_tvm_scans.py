"""softmax, log_softmax and cumsum cpu (TVM) kernels at odd shapes, against the interpreter.

softmax / log_softmax over the last dim reduce in vector lanes per row (a tree of the
lanes, a serial tail past the last whole vector, a symbolic length's chunks), keep the
exponentials per row and scale them by 1 / sum; other dims, a lone row and a 1-d input
take plain reductions. cumsum over the last dim scans blocks of a row as interleaved
chains (block sums first, then each block from its offset), a short row or another dim
serially. Each case: built once, run at each size serial and parallel (`check`).
"""
from __future__ import annotations

import math

import pytest
import torch

from fuselm.codegen import tvm as cpu
from fuselm.ir import GraphBuilder, TensorType, symbol

from test_generic_kernels_cpu import Case, c, check, one_op_group

T = symbol("T")
F, I, L, H, B, D = "f32", "i32", "i64", "f16", "bool", "f64"

SOFTMAX = [
    c(((T, 37), F), dim=-1, sizes=(1, 5)),  # two vectors and a tail of 5 (AVX-512; 4 and 5 on AVX2)
    c(((3, T), F), dim=-1, sizes=(1, 37, 64)),  # a symbolic row: chunks of lanes, then the tail
    c(((T, 5), F), dim=-1, sizes=(1, 6)),  # shorter than a vector: the tail alone
    c(((T, 16), F), dim=1, sizes=(1, 3)),
    c(((T, 2, 48), F), dim=-1, sizes=(1, 4)),
    c(((1, 48), F), dim=-1, sizes=(None,)),  # a lone row: plain reductions
    c(((1, T), F), dim=1, sizes=(1, 37)),
    c(((48,), F), dim=0, sizes=(None,)),
    c(((T, 3, 1), F), dim=-1, sizes=(1, 4)),  # a size-1 dim reduced
    c(((T, 5, 32), F), dim=-2, sizes=(1, 3)),  # other dims: plain reductions
    c(((T, 40), F), dim=0, sizes=(1, 7)),
    c(((T, 40), H), dim=-1, sizes=(1, 3), tol=2e-3),
    c(((T, 3, 20), D), dim=-1, sizes=(2,)),
]


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("case", SOFTMAX, ids=str)
def test_softmax_shapes(op, case):
    check(one_op_group(op, case), case)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("width", [7, 16, 37, 160])
def test_softmax_special_rows(op, width):
    """Rows of -inf give NaN, as do rows holding NaN or +inf; a -inf among finite values
    gives 0 (-inf); huge and tiny values stay finite, as in torch."""
    x = torch.randn(6, width) * 3
    x[0] = -math.inf
    x[1, width // 2] = math.nan
    x[2, width - 1] = math.inf
    x[3, 0] = -math.inf
    x[4] = x[4] * 1e30
    x[5] = 1e-30
    group = one_op_group(op, Case((((6, width), F),), {"dim": -1}, sizes=(None,)))
    out = cpu.emit(group).run(x)
    torch.testing.assert_close(out, getattr(torch, op)(x, dim=-1), rtol=1e-5, atol=1e-6, equal_nan=True)


def test_softmax_behind_masked_fill_and_before_a_product():
    """The softmax fused between other ops: its input is computed per row, its output read."""
    b = GraphBuilder()
    x = b.input("x", TensorType((T, 4, 40), F))
    mask = b.input("mask", TensorType((4, 40), B))
    probs = b.op("softmax", b.op("masked_fill", x, mask, value=-math.inf), dim=-1)
    group = b.build([b.op("mul", probs, scalar=3.0)])

    def make(size):
        mask = torch.rand(4, 40) > 0.5
        mask[1] = True  # a row hidden whole: NaN
        return [torch.randn(size, 4, 40), mask]

    check(group, Case((), sizes=(1, 5)), make=make)


CUMSUM = [
    c(((T, 37), F), dim=-1, sizes=(1, 5)),
    c(((3, T), F), dim=-1, sizes=(1, 7, 37, 1000)),
    c(((T, 1), F), dim=-1, sizes=(1, 3)),
    c(((T, 5, 7), F), dim=-2, sizes=(1, 3)),
    c(((T, 48), F), dim=0, sizes=(1, 9)),
    c(((T, 300), I), dim=-1, sizes=(1, 3)),  # ints sum in i64, exactly
    c(((2, T), L), dim=1, sizes=(1, 517)),
    c(((T, 300), B), dim=-1, sizes=(1, 2)),
    c(((2, T), H), dim=-1, sizes=(1, 300), tol=2e-2),
    c(((T, 250), D), dim=-1, sizes=(1, 3)),
    c(((1, T), F), dim=-1, sizes=(1, 2000), tol=1e-4),
    c(((T,), F), dim=0, sizes=(1, 4000), tol=1e-4),
]


@pytest.mark.parametrize("case", CUMSUM, ids=str)
def test_cumsum_shapes(case):
    check(one_op_group("cumsum", case), case)


def test_cumsum_of_large_integers_is_exact():
    """i64 partial sums beyond 2^53 (a float accumulator would round them), wrapping as torch."""
    x = torch.randint(-(1 << 60), 1 << 60, (3, 999), dtype=torch.int64)
    group = one_op_group("cumsum", Case((((3, T), L),), {"dim": -1}))
    assert torch.equal(cpu.emit(group).run(x), torch.cumsum(x, dim=-1))


def test_cumsum_keeps_nan_and_inf():
    x = torch.randn(4, 700)
    x[0, 10] = math.nan
    x[1, 400] = math.inf
    x[2, 5], x[2, 600] = math.inf, -math.inf
    group = one_op_group("cumsum", Case((((4, 700), F),), {"dim": -1}, sizes=(None,)))
    torch.testing.assert_close(cpu.emit(group).run(x), torch.cumsum(x, dim=-1), rtol=1e-5, atol=1e-4, equal_nan=True)


def test_cumsum_between_other_ops():
    """top-p's form: softmax -> cumsum -> a comparison, in one group; and a cumsum of a
    product read by another op (the scan's output an intermediate buffer)."""
    b = GraphBuilder()
    x = b.input("x", TensorType((T, 300), F))
    kept = b.op("le", b.op("cumsum", b.op("softmax", x, dim=-1), dim=-1), scalar=0.9)
    check(b.build([kept]), Case((((T, 300), F),), sizes=(1, 3)))
    b = GraphBuilder()
    x = b.input("x", TensorType((2, T), F))
    y = b.op("mul", b.op("cumsum", b.op("mul", x, scalar=2.0), dim=1), scalar=0.5)
    check(b.build([y]), Case((((2, T), F),), sizes=(1, 40)), make=lambda n: [torch.randn(2, n)])


SQUARE = [  # a dim other than the last, where the reduced shape equals the shape of the output's rows
    c(((3, T, T), F), dim=1, sizes=(1, 5, 17)),
    c(((T, T), F), dim=0, sizes=(1, 3, 37)),
    c(((T, 13, 13), F), dim=1, sizes=(1, 3)),
    c(((13, 13), F), dim=0, sizes=(None,)),
    c(((4, 24, 24), F), dim=-2, sizes=(None,)),  # rows of whole vectors
    c(((5, 7, 7), F), dim=0, sizes=(None,)),
    c(((T, 9, 9), H), dim=1, sizes=(1, 2), tol=2e-3),
]


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("case", SQUARE, ids=str)
def test_softmax_over_a_square_outer_dim(op, case):
    check(one_op_group(op, case), case)


@pytest.mark.parametrize("shape,dim", [((3, T, T), 1), ((T, T), 0), ((6, 11, 11), 1)])
def test_amax_kept_then_sub_over_a_square_outer_dim(shape, dim):
    b = GraphBuilder()
    x = b.input("x", TensorType(shape, F))
    group = b.build([b.op("sub", x, b.op("amax", x, dims=[dim], keepdim=True))])
    check(group, Case(((shape, F),), sizes=(1, 4, 19)))


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("shape,dim", [((12, 128, 128), 1), ((128, 128), 0), ((12, 128, 128), 2)])
def test_square_outer_dim_reductions_run_once(op, shape, dim):
    """A reduction the output reads across its rows (softmax over dim 1 of [b, n, n]: a
    max per (b, column)) runs on its own, not once per row of the output (which has the
    same shape [b, n], but would recompute all n columns per row); over the last dim,
    the row's max and sum stay inside the output's row loop."""
    from tvm import s_tir, te

    from fuselm.codegen.tvm import elementwise
    from fuselm.codegen.tvm.build import Dims
    from fuselm.codegen.tvm.lowering import lower

    b = GraphBuilder()
    group = b.build([b.op(op, b.input("x", TensorType(shape, F)), dim=dim)])
    placeholders, out, _ = lower(group, Dims())
    sch = s_tir.Schedule(te.create_prim_func(placeholders + [out]))
    elementwise.schedule(sch)
    root = sch.get_sblock("root")
    (output,) = sch.get_output_blocks(root)
    row_loop = sch.get(sch.get_loops(output)[0])
    inside = {sch.get(block).name_hint: sch.get(sch.get_loops(block)[0]).same_as(row_loop)
              for block in sch.get_child_blocks(root) if elementwise.is_reduction(sch, block)}
    assert inside and all(v == (dim == len(shape) - 1) for v in inside.values()), inside
