"""The cpu (TVM) kernels of reductions in their parallel forms, against the reference
interpreter: reductions to one value (two stages: chunks of the largest dim, parallel,
each a few vectors of partial results; then the partials), reductions over an outer dim
(read by rows into several vector accumulators) and over the last dim. Odd shapes (size-1
dims, chunks that do not divide, widths that are not vector multiples), symbolic sizes,
NaN and infinities, integer, fp16 and bool inputs, keepdim and negative dims; amax, amin,
argmax and integer sums exactly, float sums within a rounding error of their size.
Softmax and log_softmax over an outer dim too (their max and sum read by rows, log(sum) or
1 / sum kept per result), with columns of NaN, infinities and -inf only.
"""
from __future__ import annotations

import math

import pytest
import torch

from fuselm import ir
from fuselm.codegen import tvm as cpu
from fuselm.codegen.tvm import elementwise
from fuselm.codegen.tvm.build import SERIAL_MAX
from fuselm.ir import GraphBuilder, TensorType, symbol

T = symbol("T")
F, I, L, H, B = "f32", "i32", "i64", "f16", "bool"

# (op, input shape, dtype, attrs); a shape with T runs at T = 1 and 37
TO_ONE_VALUE = [
    ("amax", (512, 1536), F, {"dims": ()}),  # rows in 16 chunks, 4 vectors wide
    ("amin", (23, 64), F, {"dims": (0, 1), "keepdim": True}),  # 23 rows: 11 chunks of 2, the last short
    ("amax", (T, 48), F, {"dims": ()}),  # symbolic chunks (short ones), one vector wide
    ("amin", (3, 1, 96), H, {"dims": (-1, 0, 1)}),  # fp16; two vectors wide; negative dims
    ("amax", (1000,), I, {"dims": (0,)}),  # one dim, not a vector multiple: 10 chunks of scalars
    ("amin", (2, 1, 7), L, {"dims": ()}),
    ("amax", (1, 5, 1), F, {"dims": (1,), "keepdim": True}),  # the dims kept have size 1: one value too
    ("sum", (512, 1536), F, {"dims": ()}),
    ("sum", (T, 5, 7), I, {"dims": ()}),  # integers sum in i64
    ("sum", (1, 4096), H, {"dims": (-1,)}),  # fp16 in fp32; the last dim's quotient chunked
    ("sum", (17, 64), B, {"dims": ()}),
    ("mean", (T, 3, 64), F, {"dims": (), "keepdim": True}),
    ("mean", (4097,), F, {"dims": (0,)}),  # 16 chunks of 257, the last short
    ("var", (64, 80), F, {"dims": ()}),
    ("var", (T, 16), F, {"dims": (), "keepdim": True, "correction": 0}),
    ("argmax", (4099,), F, {"dim": 0}),
    ("argmin", (T,), F, {"dim": -1}),
]
OUTER_DIMS = [
    ("sum", (512, 1536), F, {"dims": (0,)}),  # rows of 4 vectors of columns
    ("amax", (9, 192), F, {"dims": (0,)}),
    ("amin", (T, 4, 128), F, {"dims": (0,), "keepdim": True}),  # per output row: 2 x 4 vectors
    ("mean", (T, 96), F, {"dims": (-2,)}),  # 96 columns: one vector at a time
    ("sum", (5, 9, 64), I, {"dims": (1,)}),
    ("amax", (T, 80), H, {"dims": (0,)}),
    ("sum", (7, 1, 200), F, {"dims": (0,)}),  # columns not a vector multiple
    ("amin", (1, 6, 64), F, {"dims": (-2,)}),
    ("argmin", (512, 1536), F, {"dim": 0}),
    ("argmax", (T, 5, 64), H, {"dim": 1, "keepdim": True}),
]
LAST_DIM = [
    ("amax", (T, 1536), F, {"dims": (-1,)}),
    ("amin", (33, 64), F, {"dims": (1,), "keepdim": True}),
    ("sum", (T, 1536), F, {"dims": (-1,)}),
    ("amax", (300, 80), I, {"dims": (-1,)}),
    ("argmax", (T, 4099), F, {"dim": -1}),
    ("argmax", (32, 49152), F, {"dim": 1}),
    ("argmin", (9, 80), I, {"dim": -1}),
]
SOFTMAX_OUTER_DIMS = [
    ("softmax", (3, 17, 5), F, {"dim": 1}),  # 5 columns: less than a vector
    ("log_softmax", (33, 7), F, {"dim": 0}),
    ("softmax", (12, 128, 128), F, {"dim": 1}),  # attention scores: rows of 4 vectors of columns
    ("log_softmax", (12, 128, 128), F, {"dim": 0}),
    ("softmax", (64, 48), F, {"dim": -2}),  # 3 vectors of columns
    ("log_softmax", (2, 3, 40, 5), F, {"dim": 1}),  # 200 columns (two dims), not a vector multiple
    ("softmax", (T, 1, 80), F, {"dim": 0}),  # a symbolic reduced dim
    ("log_softmax", (4, T, 64), F, {"dim": 1}),
    ("softmax", (6, T), F, {"dim": 0}),  # symbolic columns
    ("softmax", (5, 64, 1), F, {"dim": 1}),  # only size-1 dims after it: no columns, a plain reduction
    ("log_softmax", (1, 1, 9), F, {"dim": 1}),  # a dim of 1
    ("softmax", (7, 200), H, {"dim": 0}),  # fp16 in fp32
    ("log_softmax", (9, 33), H, {"dim": -2}),
]
EXACT = ("amax", "amin", "argmax", "argmin")


def values(shape, dtype: str, special: bool, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    torch_dtype = TensorType((), dtype).torch_dtype
    if dtype == B:
        return torch.rand(shape, generator=generator) > 0.5
    if not torch_dtype.is_floating_point:
        return torch.randint(-1000, 1000, shape, generator=generator).to(torch_dtype)
    x = torch.randn(shape, generator=generator) * 3
    if special:  # NaN (in the last, possibly short, chunk), infinities, signed zeros, ties
        flat = x.view(-1)
        for i, v in zip((-1, 0, flat.numel() // 2, 1, 2, 3), (math.nan, math.inf, -math.inf, -0.0, 0.0, 0.0)):
            flat[i % flat.numel()] = v
    return x.to(torch_dtype)


def runs(kernel, x):
    """The kernel's serial and parallel forms."""
    outs = []
    for serial_max in (SERIAL_MAX, 0):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(elementwise, "SERIAL_MAX", serial_max)
            outs.append(kernel.run(x.clone()))
    return outs


def agree(op: str, out, expected, x):
    assert out.shape == expected.shape and out.dtype == expected.dtype, (out.shape, out.dtype, expected.dtype)
    if op in EXACT or not expected.dtype.is_floating_point:
        assert torch.equal(out.isnan(), expected.isnan()) if expected.dtype.is_floating_point else True
        same = ~expected.isnan() if expected.dtype.is_floating_point else torch.ones_like(expected, dtype=torch.bool)
        assert torch.equal(out[same], expected[same]), (out, expected)
        return
    finite = x.double().abs().nan_to_num(0.0, 0.0, 0.0)
    terms = max(1, x.numel() if op in ("mean", "var") else expected.numel())
    scale = finite.sum().item() / terms + 1.0  # a sum's rounding error grows with its terms
    tol = 1e-3 if expected.dtype == torch.float16 else 1e-6
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol * scale, equal_nan=True)


def check(op: str, shape: tuple, dtype: str, attrs: dict):
    b = GraphBuilder()
    group = b.build([b.op(op, b.input("x", TensorType(shape, dtype)), **attrs)])
    kernel = cpu.emit(group)
    sizes = (1, 37) if T in shape else (None,)
    for size in sizes:
        concrete = tuple(size if d == T else d for d in shape)
        for special in ((False, True) if dtype in (F, H) else (False,)):
            x = values(concrete, dtype, special, seed=len(concrete))
            expected = ir.interpret(group, x.clone())
            for out in runs(kernel, x):
                agree(op, out, expected, x)
    return kernel


def case_id(case) -> str:
    op, shape, dtype, attrs = case
    return f"{op}-{dtype}{'x'.join(map(str, shape))}-{'_'.join(f'{k}{v}' for k, v in attrs.items())}"


@pytest.mark.filterwarnings("ignore:var\\(\\)")  # var of a single element: NaN, as torch warns
@pytest.mark.parametrize("case", TO_ONE_VALUE, ids=case_id)
def test_reduction_to_one_value(case):
    kernel = check(*case)
    assert "_chunks" in kernel.source  # the two-stage form


@pytest.mark.parametrize("case", OUTER_DIMS, ids=case_id)
def test_reduction_over_an_outer_dim(case):
    check(*case)


@pytest.mark.parametrize("case", LAST_DIM, ids=case_id)
def test_reduction_over_the_last_dim(case):
    check(*case)


def test_reduction_to_one_value_is_parallel_and_vectorized():
    b = GraphBuilder()
    kernel = cpu.emit(b.build([b.op("amax", b.input("x", TensorType((512, 1536), F)), dims=())]))
    assert "T.parallel" in kernel.source and "T.vectorized" in kernel.source


def test_sum_over_rows_accumulates_several_vectors_of_columns():
    b = GraphBuilder()
    kernel = cpu.emit(b.build([b.op("sum", b.input("x", TensorType((512, 1536), F)), dims=(0,))]))
    assert "T.parallel" in kernel.source and "T.vectorized" in kernel.source and "T.unroll(4)" in kernel.source


@pytest.mark.parametrize("case", SOFTMAX_OUTER_DIMS, ids=case_id)
def test_softmax_over_an_outer_dim(case):
    check(*case)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_over_an_outer_dim_reads_rows_and_keeps_one_scale_per_column(op):
    source = cpu.emit(_group(op, (12, 128, 128), dim=1)).source
    assert "T.unroll(4)" in source  # the max and sum: rows of 4 vector accumulators
    assert f"{op}_1_{'log' if op == 'log_softmax' else 'scale'}_kept" in source


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("width", [5, 64])
def test_softmax_columns_of_nan_and_infinities(op, width):
    """Over dim 0 and 1 (of a 3-d tensor), columns of plain values, all -inf (NaN, as
    torch), a NaN, +inf (NaN), -inf among finite values (0, or -inf for log_softmax), two
    +inf, in a vector-wide layout and an odd one: as torch."""
    columns = torch.tensor([[1.0, 2.0, 3.0], [-math.inf] * 3, [math.nan, 1.0, 2.0], [math.inf, 1.0, 2.0],
                            [-math.inf, 0.0, 1.0], [math.inf, math.inf, 1.0], [-1.0, 5.0, -3.0]])
    x = columns.repeat(13, 1)[:width].T.contiguous()  # [3, width]: the columns reduced over dim 0
    for dim, shaped in ((0, x), (1, x.reshape(1, 3, width).expand(2, 3, width).contiguous())):
        expected = getattr(torch, op)(shaped, dim=dim)
        for run in runs(cpu.emit(_group(op, tuple(shaped.shape), dim=dim)), shaped):
            torch.testing.assert_close(run, expected, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("op", ["argmax", "argmin"])
@pytest.mark.parametrize("dim", [0, -1])
def test_argmax_argmin_ties_zeros_infinities_nan(op, dim):
    """Rows (columns for dim 0) of ties, -0 before +0, all -inf, all +inf, NaN late, all
    NaN, in a 64-wide layout (vector lanes) and an odd one: the first index, as torch."""
    rows = torch.tensor([[1.0, 3.0, 3.0, -2.0, 3.0], [-0.0, 0.0, -0.0, 0.0, -0.0], [-math.inf] * 5, [math.inf] * 5,
                         [1.0, 2.0, 9.0, math.nan, 9.0], [math.nan] * 5, [-1.0, -3.0, -3.0, 5.0, -3.0]])
    for width in (5, 64):
        x = rows.repeat(1, 13)[:, :width].contiguous()
        x = x if dim == -1 else x.T.contiguous()
        for run in runs(cpu.emit(_group(op, tuple(x.shape), dim=dim)), x):
            assert torch.equal(run, getattr(torch, op)(x, dim=dim)), (width, run)


def _group(op, shape, **attrs):
    b = GraphBuilder()
    return b.build([b.op(op, b.input("x", TensorType(shape, F)), **attrs)])
