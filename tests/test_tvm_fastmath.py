"""fastmath's vectorized fp32 functions through generated cpu kernels, against torch in
fp64 (accuracy over wide grids, large trig arguments) and torch eager (special values),
and NaN propagation as torch eager propagates it (maximum, minimum, relu, clamp, softmax).
"""
from __future__ import annotations

import math

import pytest
import torch

from fuselm.codegen import tvm as cpu
from fuselm.ir import GraphBuilder, TensorType

SPECIAL = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, 1.17549435e-38, 3.4028235e38,
           -3.4028235e38, 1.0, -1.0, -0.9999999, -1.0000001, 2.0, -2.0]


def kernel(op: str, *shapes, dtype: str = "f32", **attrs):
    b = GraphBuilder()
    inputs = [b.input(f"x{i}", TensorType(shape, dtype)) for i, shape in enumerate(shapes)]
    return cpu.emit(b.build([b.op(op, *inputs, **attrs)]))


def magnitudes(low: float, high: float, n: int = 1 << 16, signed: bool = True) -> torch.Tensor:
    """Log-uniform magnitudes in [low, high), with random signs."""
    generator = torch.Generator().manual_seed(0)
    m = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(low), math.log(high), generator=generator))
    if signed:
        m = m * torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double()
    return m.float()


# op -> (the ranges of |x| (log-uniform), whether negative x too, the largest error in fp32 ulps of the result)
ACCURACY = {
    "sin": ([(1e-6, 1.0), (1.0, 1e4), (1e4, 1e6), (1e6, 1e8), (1e8, 3e38)], True, 3),
    "cos": ([(1e-6, 1.0), (1.0, 1e4), (1e4, 1e6), (1e6, 1e8), (1e8, 3e38)], True, 3),
    "tan": ([(1e-6, 1.0), (1.0, 1e4), (1e4, 1e6), (1e6, 1e8)], True, 4),
    "atan": ([(1e-30, 1e-3), (1e-3, 1.0), (1.0, 30.0), (30.0, 3e38)], True, 4),
    "tanh": ([(1e-30, 1e-3), (1e-3, 1.0), (1.0, 30.0), (30.0, 3e38)], True, 3),
    "log": ([(1e-44, 1e-38), (1e-38, 1e-3), (1e-3, 10.0), (10.0, 3e38)], False, 2),
    "log1p": ([(1e-30, 1e-3), (1e-3, 1.0), (1.0, 30.0), (30.0, 3e38)], True, 4),
}


@pytest.mark.parametrize("op", list(ACCURACY))
def test_accuracy_against_fp64(op):
    """Within a few fp32 ulps of the fp64 result (relative to the result; sin / cos of large
    arguments included: the reduction by pi/2 is exact far beyond where fp32 keeps digits)."""
    ranges, signed, ulps = ACCURACY[op]
    x = torch.cat([magnitudes(lo, hi, signed=signed) for lo, hi in ranges])
    if op == "log1p":
        x = x.clamp(min=-0.99999)
    out = kernel(op, tuple(x.shape)).run(x).double()
    exact = getattr(torch, op)(x.double())
    finite = exact.isfinite() & (exact.abs() > 1e-37)
    error = ((out - exact).abs() / exact.abs())[finite]
    assert error.max() < ulps * 2 ** -24, (op, error.max().item(), x[finite][error.argmax()].item())


@pytest.mark.parametrize("op", ["sin", "cos"])
def test_trig_of_large_arguments_absolute(op):
    """sin / cos at 1e4 .. 1e6 and beyond 2^23 (libm's, per row that holds such an x)."""
    x = torch.cat([torch.linspace(1e4, 1e6, 4001), torch.tensor([2.0 ** 23 + 3, 1e10, -1e30, 3e38])]).reshape(5, -1)
    out = kernel(op, tuple(x.shape)).run(x).double()
    assert (out - getattr(torch, op)(x.double())).abs().max() < 2e-7


@pytest.mark.parametrize("op", [*ACCURACY, "exp"])
def test_special_values_as_torch(op):
    x = torch.tensor(SPECIAL)
    out, expected = kernel(op, tuple(x.shape)).run(x), getattr(torch, op)(x)
    assert torch.equal(out.isnan(), expected.isnan()), (x, out, expected)
    same = ~expected.isnan() & (expected.isinf() | (expected == 0))
    if op == "log1p":  # torch's log1p flushes denormal results to 0; fastmath's is x (exact)
        same &= x.abs() >= 1.17549435e-38
    assert torch.equal(out[same], expected[same]) and torch.equal(out[same].signbit(), expected[same].signbit())
    torch.testing.assert_close(out, expected, rtol=3e-7, atol=0 if op != "log1p" else 1e-44, equal_nan=True)


@pytest.mark.parametrize("op", ["sin", "cos", "tanh", "log"])
def test_fp16_through_fp32(op):
    x = (torch.rand(6, 16) * 4 + 0.01).half()
    torch.testing.assert_close(kernel(op, (6, 16), dtype="f16").run(x), getattr(torch, op)(x), rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------- NaN
NAN_ROWS = torch.tensor([[math.nan, 1.0, -2.0, 3.0] * 4, [0.5, -1.0, 4.0, -math.inf] * 4,
                         [1.0, 2.0, 3.0, math.nan] * 4])


def same(out, expected):
    return torch.equal(out.isnan(), expected.isnan()) and torch.equal(out.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("op", ["maximum", "minimum"])
def test_maximum_minimum_propagate_nan(op):
    a, b = NAN_ROWS, NAN_ROWS.flip(1)
    assert same(kernel(op, (3, 16), (3, 16)).run(a, b), getattr(torch, op)(a, b))


def test_relu_and_clamp_propagate_nan():
    x = NAN_ROWS
    assert same(kernel("relu", (3, 16)).run(x), torch.relu(x))
    b = GraphBuilder()  # clamp(x, 0, 1) as the frontend lowers it: maximum, then minimum, with scalars
    v = b.input("x", TensorType((3, 16), "f32"))
    clamp = cpu.emit(b.build([b.op("minimum", b.op("maximum", v, scalar=0.0), scalar=1.0)]))
    assert same(clamp.run(x), torch.clamp(x, 0, 1))


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_rows_with_nan_are_nan(op):
    x = NAN_ROWS
    out = kernel(op, (3, 16), dim=-1).run(x)
    assert same(out, getattr(torch, op)(x, dim=-1)) and out[0].isnan().all() and not out[1].isnan().all()


@pytest.mark.parametrize("op", ["amax", "amin"])
def test_amax_amin_propagate_nan(op):
    assert same(kernel(op, (3, 16), dims=(-1,)).run(NAN_ROWS), getattr(torch, op)(NAN_ROWS, dim=-1))


@pytest.mark.parametrize("op", ["amax", "amin"])
@pytest.mark.parametrize("dims", [(0,), (), (0, 1)])
def test_amax_amin_over_outer_and_all_dims(op, dims):
    """NaN kept, a row of -inf (+inf for amin) its own extremum, over the outer dim and all."""
    x = torch.cat([NAN_ROWS, torch.full((1, 16), -math.inf if op == "amax" else math.inf), torch.randn(28, 16)])
    for rows in (x[3:], x):  # without NaN, then with
        out = kernel(op, tuple(rows.shape), dims=dims).run(rows)
        assert same(out, getattr(torch, op)(rows, dim=dims or None) if dims else getattr(torch, op)(rows)), (out,)


def test_amax_of_minus_inf_rows():
    x = torch.full((4, 32), -math.inf)
    assert torch.equal(kernel("amax", (4, 32), dims=(-1,)).run(x), torch.full((4,), -math.inf))


# ----------------------------------------------------------------------------- pow
def test_pow_accuracy_against_fp64():
    """x in [1e-30, 1e30], y in [-50, 50]: within 1 ulp of the fp64 result where it is a
    normal fp32 (log2 and exp2 in fp64, one rounding); negative x with integer y too."""
    n = 1 << 16
    generator = torch.Generator().manual_seed(1)
    x = torch.cat([magnitudes(1e-30, 1e30, n, signed=False), -magnitudes(1e-3, 1e3, n, signed=False)])
    y = torch.cat([torch.rand(n, generator=generator, dtype=torch.float64) * 100 - 50,
                   torch.randint(-12, 13, (n,), generator=generator).double()]).float()
    out = kernel("pow", (2 * n,), (2 * n,)).run(x, y).double()
    exact = torch.pow(x.double(), y.double())
    normal = (exact.abs() > 1.17549435e-38) & (exact.abs() < 3.4e38)
    error = ((out - exact).abs() / exact.abs())[normal]
    assert normal.sum() > n // 2 and error.max() < 2 ** -23, error.max().item()


def test_pow_special_values_as_torch():
    values = torch.tensor(SPECIAL + [0.5, -0.5, 3.0, -3.0, 2.5, -2.5, 1e10, -1e10, 100.0, -100.0, 16777217.0])
    x, y = (v.reshape(-1).contiguous() for v in torch.meshgrid(values, values, indexing="ij"))
    out, expected = kernel("pow", tuple(x.shape), tuple(y.shape)).run(x, y), torch.pow(x, y)
    assert torch.equal(out.isnan(), expected.isnan()) and torch.equal(out.signbit() | out.isnan(),
                                                                       expected.signbit() | expected.isnan())
    exact = expected.isinf() | (expected == 0) | (expected.abs() == 1)
    assert torch.equal(out[exact], expected[exact])
    torch.testing.assert_close(out, expected, rtol=2.4e-7, atol=0, equal_nan=True)


@pytest.mark.parametrize("exponent", [0.0, 1.0, 2.0, 3.0, 0.5, -0.5, -1.0, -2.0, 1.7])
def test_pow_scalar_exponents_as_torch(exponent):
    x = torch.cat([torch.tensor(SPECIAL), torch.randn(46, generator=torch.Generator().manual_seed(0)) * 10])
    out, expected = kernel("pow", tuple(x.shape), scalar=exponent).run(x), torch.pow(x, exponent)
    if exponent in (0.5, -0.5, 1.7):  # sqrt is exact; torch's may take its pow (each within an ulp)
        torch.testing.assert_close(out, expected, rtol=3.6e-7, atol=0, equal_nan=True)
    else:  # the same operations as torch's: bit for bit
        assert same(out, expected) and torch.equal(out.signbit() | out.isnan(), expected.signbit() | expected.isnan())


def test_pow_fused_with_other_fastmath_is_computed_in_a_block_of_its_own():
    """sigmoid(|x|^y * 2 + 1) - x^2: inlined into sigmoid's lets, pow's let chain made TVM's
    analyzer and LLVM codegen run for minutes (three on this machine); kept per row, the group
    builds in seconds and computes what torch does."""
    b = GraphBuilder()
    x, y = b.input("x", TensorType(("T", 33), "f32")), b.input("y", TensorType(("T", 33), "f32"))
    scaled = b.op("add", b.op("mul", b.op("pow", b.op("abs", x), y), scalar=2.0), scalar=1.0)
    group = b.build([b.op("sub", b.op("sigmoid", scaled), b.op("pow", x, scalar=2.0))])
    built = cpu.emit(group)
    assert len([line for line in built.source.splitlines() if "pow_" in line and "_kept" in line]) >= 1
    generator = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(9, 33, generator=generator), torch.rand(9, 33, generator=generator) * 3
    torch.testing.assert_close(built.run(xs, ys), torch.sigmoid(xs.abs().pow(ys) * 2 + 1) - xs.pow(2),
                               rtol=1e-6, atol=1e-6)
