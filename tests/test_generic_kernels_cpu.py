"""A generated cpu (TVM) kernel for every IR op, against the reference interpreter.

Every op of the registry that is not a view, not a fallback and not one of the ops with
tests of their own (gemm, qgemm, norms, attention, cache ops, rope, embedding,
qembedding) has cases here: a group of that one op, built once with a symbolic dim T and
run at T = 1 and an odd size, serial and parallel (so `build_count` proves a new size
builds nothing), at odd static sizes, broadcast operands, negative dims, keepdim both
ways and the dtypes the op takes. matmul also runs on transposed, strided and broadcast
(expanded) operands and behind views. Each op shares its lowering with its siblings (the
unary, binary, comparison, reduction tables), so the dtype cases rotate over siblings to
keep builds few.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from fuselm import ir
from fuselm.codegen import tvm as cpu
from fuselm.codegen.tvm import elementwise, matmul
from fuselm.codegen.tvm.build import SERIAL_MAX
from fuselm.ir import GraphBuilder, TensorType, symbol
from fuselm.ir.registry import all_ops

T = symbol("T")
DEDICATED = {"gemm", "qgemm", "layer_norm", "rms_norm", "attention", "paged_attention", "kv_cache_write", "rope",
             "embedding", "qembedding", "pack", "unpack", "varlen_attention"}


@dataclass
class Case:
    inputs: tuple  # (shape, dtype) per input; "T" is the symbolic dim
    attrs: dict = field(default_factory=dict)
    domain: str = "any"  # "positive", "nonzero" (for the last input), "halves" (round's ties), "special"
    sizes: tuple = (1, 6)  # the values of T
    tol: float = 1e-5
    index: dict = field(default_factory=dict)  # {input position: (high,)} integer inputs in [0, high)

    def __str__(self):
        shapes = "_".join(f"{d}{'x'.join(map(str, s))}" for s, d in self.inputs)
        return f"{shapes}_{'_'.join(f'{k}{v}' for k, v in self.attrs.items())}"


def c(*inputs, **kw):
    attrs = {k: kw.pop(k) for k in list(kw) if k not in Case.__dataclass_fields__}
    return Case(tuple(inputs), attrs, **kw)


F, I, L, H, B = "f32", "i32", "i64", "f16", "bool"
BROADCAST = (((T, 1, 7), F), ((5, 1), F))  # [T, 1, 7] with [5, 1] -> [T, 5, 7]
CASES = {
    # binary arithmetic: broadcast across ranks, scalars both ways, ints, fp16
    "add": [c(*BROADCAST), c(((T, 9), H), ((T, 9), H), tol=1e-3), c(((T, 6), I), scalar=3, reverse=True)],
    "sub": [c(*BROADCAST), c(((T, 6), I), ((1, 6), L))],
    "mul": [c(*BROADCAST), c(((T, 6), I), scalar=2.5)],
    "pow": [c(((T, 7), F), ((7,), F), domain="positive"), c(((T, 7), F), scalar=2.0), c(((T, 5), I), scalar=3),
            c(((T, 5), L), ((5,), L), domain="positive")],
    "maximum": [c(*BROADCAST), c(((T, 6), I), scalar=1)],
    "minimum": [c(((T, 6), L), ((T, 1), L))],
    "div": [c(*BROADCAST, domain="nonzero"), c(((T, 6), L), ((T, 6), L), domain="nonzero"),
            c(((T, 6), F), scalar=2.0, reverse=True, domain="nonzero")],
    "remainder": [c(*BROADCAST, domain="nonzero"), c(((T, 6), L), ((1, 6), L), domain="nonzero"),
                  c(((T, 6), I), scalar=-3), c(((T, 6), F), scalar=2.5, reverse=True, domain="nonzero"),
                  c(((T, 5), H), ((T, 5), H), domain="nonzero", tol=1e-3)],
    "floor_divide": [c(*BROADCAST, domain="nonzero"), c(((T, 6), I), ((T, 6), I), domain="nonzero"),
                     c(((T, 6), L), scalar=-4), c(((T, 6), F), scalar=0.0)],
    # comparisons and logic: bool results
    "eq": [c(*BROADCAST, domain="halves")],
    "ne": [c(((T, 6), I), scalar=0), c(((T, 9), F), ((T, 9), F), domain="special")],
    "lt": [c(*BROADCAST)],
    "le": [c(((T, 6), I), ((1, 6), F), domain="halves")],
    "gt": [c(((T, 6), H), scalar=0.5)],
    "ge": [c(((T, 6), L), scalar=1)],
    "logical_and": [c(((T, 1, 7), B), ((5, 1), B))],
    "logical_or": [c(((T, 6), I), ((T, 6), B))],
    "logical_xor": [c(((T, 1, 7), B), ((5, 1), B)), c(((T, 6), F), scalar=0.0)],
    "logical_not": [c(((T, 6), B)), c(((T, 5), F))],
    "isnan": [c(((T, 9), F), domain="special"), c(((T, 4), I))],
    "isinf": [c(((T, 9), F), domain="special"), c(((T, 4), H), domain="special")],
    # unary, same dtype
    "neg": [c(((T, 5, 3), F)), c(((T, 6), I))],
    "abs": [c(((T, 5, 3), F)), c(((T, 6), L))],
    "relu": [c(((T, 5, 3), F)), c(((T, 6), I))],
    "sign": [c(((T, 9), F), domain="special"), c(((T, 6), I)), c(((T, 4), B))],
    "floor": [c(((T, 5, 3), F), domain="halves"), c(((T, 6), I))],
    "ceil": [c(((T, 5, 3), F), domain="halves"), c(((T, 6), L))],
    "round": [c(((T, 5, 3), F), domain="halves"), c(((T, 9), H), domain="halves"), c(((T, 6), I))],
    "trunc": [c(((T, 5, 3), F), domain="halves"), c(((T, 6), I))],
    "copy": [c(((T, 5, 3), F)), c(((T, 6), B))],
    # unary, float results (integers become f32)
    "exp": [c(((T, 5, 3), F)), c(((T, 6), I))],
    "log": [c(((T, 5, 3), F), domain="positive")],
    "sqrt": [c(((T, 5, 3), F), domain="positive"), c(((T, 6), L), domain="positive")],
    "rsqrt": [c(((T, 5, 3), F), domain="positive")],
    "reciprocal": [c(((T, 5, 3), F), domain="nonzero")],
    "sin": [c(((T, 5, 3), F))],
    "cos": [c(((T, 5, 3), H), tol=1e-3)],
    "tanh": [c(((T, 5, 3), F))],
    "erf": [c(((T, 5, 3), F))],
    "sigmoid": [c(((T, 5, 3), F))],
    "silu": [c(((T, 5, 3), F))],
    "gelu": [c(((T, 5, 3), F)), c(((T, 5, 3), F), approximate="tanh")],
    "log1p": [c(((T, 5, 3), F), domain="positive"), c(((T, 6), I), domain="positive")],
    "expm1": [c(((T, 5, 3), F)), c(((T, 6), H), tol=1e-3)],
    "tan": [c(((T, 5, 3), F))],
    "atan": [c(((T, 5, 3), F)), c(((T, 6), I))],
    "cast": [c(((T, 6), F), dtype="i32"), c(((T, 6), L), dtype="f16"), c(((T, 6), F), dtype="bool"),
             c(((T, 6), B), dtype="f32")],
    "where": [c(((T, 1, 7), B), ((5, 1), F), ((7,), F)), c(((T, 6), B), ((T, 6), I), ((1, 6), L))],
    "masked_fill": [c(((T, 5, 7), F), ((5, 1), B), value=-1.5), c(((T, 6), I), ((T, 6), B), value=3)],
    # reductions: negative dims, keepdim both ways, dims=() (all), integer sums in i64
    "sum": [c(((T, 5, 7), F), dims=(1,)), c(((T, 5, 7), I), dims=(-1, 0), keepdim=True), c(((T, 5, 7), F), dims=()),
            c(((T, 7), B), dims=(1,)), c(((T, 3, 48), F), dims=(), tol=1e-4), c(((T, 64), F), dims=(-1,))],
    "mean": [c(((T, 5, 7), F), dims=(-1,), keepdim=True), c(((T, 5, 7), H), dims=(0, 2), tol=1e-3),
             c(((T, 5, 7), F), dims=(), keepdim=True), c(((48,), F), dims=(0,), sizes=(None,)),
             c(((T, 48), F), dims=(0,))],
    "amax": [c(((T, 5, 7), F), dims=(0, -1)), c(((T, 5, 7), I), dims=())],
    "amin": [c(((T, 5, 7), F), dims=(1,), keepdim=True), c(((T, 5, 7), H), dims=(-1,))],
    "argmax": [c(((T, 5, 7), F), dim=-1, domain="halves"), c(((T, 5, 7), F), dim=1, keepdim=True, domain="special"),
               c(((T, 5, 7), I), dim=0)],
    "argmin": [c(((T, 5, 7), F), dim=0, domain="halves"), c(((T, 5, 7), L), dim=-2, keepdim=True),
               c(((64,), F), dim=0, sizes=(None,), domain="special"), c(((T, 64), F), dim=-1, domain="halves")],
    "var": [c(((T, 5, 7), F), dims=(1,)), c(((T, 5, 7), F), dims=(), keepdim=True, correction=0),
            c(((T, 5, 7), I), dims=(-1, 0), correction=2), c(((T, 1, 3), F), dims=(1,), sizes=(2,))],
    "softmax": [c(((T, 5, 7), F), dim=-1), c(((T, 5, 7), F), dim=1)],
    "log_softmax": [c(((T, 5, 7), F), dim=0), c(((T, 5, 19), H), dim=-1, tol=2e-3)],
    "cumsum": [c(((T, 5, 7), F), dim=1), c(((T, 5, 7), F), dim=-1), c(((T, 5, 16), I), dim=0),
               c(((T, 9), H), dim=-1, tol=2e-3), c(((T, 6), B), dim=1)],
    # shapes: triangles with symbolic sizes, gathers, concat, generators
    "tril": [c(((3, T, 6), F), diagonal=0), c(((T, 5, 4), L), diagonal=-2), c(((2, T, T), F), diagonal=1)],
    "triu": [c(((3, T, 6), F), diagonal=2), c(((T, 4, 7), I), diagonal=-1)],
    "gather": [c(((T, 5, 7), F), ((T, 3, 7), L), dim=1, index={1: 5}),
               c(((T, 5, 7), I), ((T, 4, 2), I), dim=-1, index={1: 7})],
    "index_select": [c(((T, 6), F), ((4,), L), dim=1, index={1: 6}), c(((5, T), I), ((3,), I), dim=0, index={1: 5})],
    "concat": [c(((T, 3), F), ((T, 5), F), dim=-1), c(((T, 4), L), ((2, 4), L), ((1, 4), L), dim=0)],
    "full": [c(shape=(3, 5), value=1.5, dtype=F, sizes=(None,)), c(shape=(7,), value=3, dtype=L, sizes=(None,))],
    "arange": [c(end=7, dtype=L, sizes=(None,)), c(start=2, end=19, step=3, dtype=F, sizes=(None,))],
    # matmul: batch dims broadcast (size 1, missing), M = 1 and 2 (b read in place), odd K and N, dtypes
    "matmul": [c(((2, T, 5, 37), F), ((T, 37, 19), F), tol=1e-4), c(((T, 1, 5, 7), F), ((3, 7, 9), F)),
               c(((T, 7), F), ((2, 3, 7, 40), F), sizes=(1, 13), tol=1e-4),
               c(((T, 16), F), ((16, T), F)), c(((3, 5, T), F), ((T, 33), F), sizes=(1, 70), tol=1e-4),
               c(((T, 5, 9), H), ((9, 18), H), tol=1e-3), c(((2, T, 11), "f64"), ((2, 11, 5), "f64")),
               c(((T, 4, 9), I), ((T, 9, 3), I)), c(((T, 6), L), ((6, 17), L)),
               c(((3, 1, 24), F), ((3, 24, 32), F), sizes=(None,)), c(((2, 24), F), ((T, 24, 48), F), tol=1e-4)],
}


def generic_ops() -> set:
    return {name for name, op in all_ops().items() if not (op.view or op.fallback or op.transient or name in DEDICATED)}


def test_every_generic_op_has_cases():
    assert generic_ops() == set(CASES), "ops without cases here (or cases of ops that are gone)"


# ----------------------------------------------------------------------------- inputs
def concrete(shape, size):
    return [size if d == T else d for d in shape]


def random_tensor(shape, dtype: str, domain: str, generator) -> torch.Tensor:
    torch_dtype = TensorType((), dtype).torch_dtype
    if dtype == "bool":
        return torch.rand(shape, generator=generator) > 0.5
    if not torch_dtype.is_floating_point:
        values = torch.randint(-9, 10, shape, generator=generator)
        if domain == "positive":
            values = values.abs()
        elif domain == "nonzero":
            values = torch.where(values == 0, 3, values)
        return values.to(torch_dtype)
    values = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    if domain == "positive":
        values = values.abs() + 0.1
    elif domain == "nonzero":
        values = torch.where(values.abs() < 0.1, 1.5, values)
    elif domain == "halves":  # x.5 ties and repeated values
        values = torch.round(values * 2) / 2
    elif domain == "special":
        flat = values.view(-1)
        for i, special in enumerate((math.nan, math.inf, -math.inf, 0.0, -0.0)[: flat.numel()]):
            flat[i * 3 % flat.numel()] = special
    return values.to(torch_dtype)


def make_inputs(case: Case, size, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    args = []
    for position, (shape, dtype) in enumerate(case.inputs):
        shape = concrete(shape, size)
        if position in case.index:
            args.append(torch.randint(0, case.index[position], shape, generator=generator).to(
                TensorType((), dtype).torch_dtype))
        else:
            domain = case.domain if position == len(case.inputs) - 1 or case.domain != "nonzero" else "any"
            args.append(random_tensor(shape, dtype, domain, generator))
    return args


def one_op_group(op: str, case: Case):
    b = GraphBuilder()
    inputs = [b.input(f"x{i}", TensorType(tuple(shape), dtype)) for i, (shape, dtype) in enumerate(case.inputs)]
    return b.build([b.op(op, *inputs, **case.attrs)])


# ----------------------------------------------------------------------------- the check
def check(group, case: Case, make=None):
    """Build once; at each size, the serial and the parallel forms against the interpreter."""
    kernel = cpu.emit(group)
    builds = cpu.build_count()
    for size in case.sizes:
        args = make(size) if make else make_inputs(case, size)
        expected = ir.interpret(group, *[a.clone() for a in args])
        for serial_max in (SERIAL_MAX, 0):  # 0: every kernel takes its parallel form
            with pytest.MonkeyPatch.context() as patch:
                for module in (elementwise, matmul):
                    patch.setattr(module, "SERIAL_MAX", serial_max)
                out = kernel.run(*[a.clone() for a in args])
            assert out.shape == expected.shape and out.dtype == expected.dtype, (out.shape, out.dtype, expected.dtype)
            torch.testing.assert_close(out, expected, rtol=case.tol, atol=case.tol, equal_nan=True)
    assert cpu.build_count() == builds, "a new size rebuilt the kernel"
    return kernel


@pytest.mark.filterwarnings("ignore:var\\(\\)")  # var of a single element: NaN, as torch warns
@pytest.mark.parametrize("op,case", [pytest.param(op, case, id=f"{op}-{case}") for op, cases in CASES.items()
                                     for case in cases])
def test_one_op_kernel(op, case):
    kernel = check(one_op_group(op, case), case)
    assert kernel.target == "cpu" and "T.prim_func" in kernel.source


# ----------------------------------------------------------------------------- exact semantics
def test_remainder_and_floor_divide_signs_exactly():
    """Every sign combination, exact zeros, ties, infinities and a zero divisor, bit for bit."""
    a = torch.tensor([-7.0, 7.0, -7.0, 7.0, -6.0, 6.0, -0.0, 0.0, 5.5, -5.5, math.inf, 3.0, 1e30, -1e-30, 2.0])
    b = torch.tensor([2.0, -2.0, -2.0, 2.0, 3.0, -3.0, 2.0, -2.0, 0.5, 0.5, 2.0, math.inf, 3.0, 7.0, 0.0])
    ints = (torch.tensor([-7, 7, -7, 7, -6, 6, 0, 5, -1, 9]), torch.tensor([2, -2, -2, 2, 3, -3, 4, -1, 5, 1]))
    for op in ("remainder", "floor_divide"):
        for x, y in ((a, b), ints):
            case = Case(((tuple(x.shape), "f32" if x.is_floating_point() else "i64"),) * 2, sizes=(None,))
            out = cpu.emit(one_op_group(op, case)).run(x, y)
            expected = getattr(torch, op)(x, y)
            assert torch.equal(out.isnan(), expected.isnan())
            same = ~expected.isnan()
            assert torch.equal(out[same], expected[same]) and torch.equal(out[same].signbit(), expected[same].signbit())


def test_argmax_ties_and_nan_take_the_first_index():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0], [math.nan, 1.0, math.nan, 5.0], [-math.inf] * 4, [2.0, 2.0, 2.0, 2.0],
                      [math.inf, 1.0, math.nan, math.inf], [-math.inf, -3.4028234663852886e38, 0.0, -1.0]])
    x = torch.cat([x, -x])
    for op in ("argmax", "argmin"):
        for dim in (1, 0):
            case = Case((((12, 4), "f32"),), {"dim": dim}, sizes=(None,))
            assert torch.equal(cpu.emit(one_op_group(op, case)).run(x), getattr(torch, op)(x, dim=dim))


def test_cumsum_along_a_long_symbolic_dim_is_a_scan():
    """A long dim (a quadratic form would crawl), fp32 summed as torch sums it (in fp64)."""
    case = Case((((2, T), "f32"),), {"dim": 1}, sizes=(100_003, 7))
    check(one_op_group("cumsum", case), case, make=lambda n: [torch.rand(2, n)])


# ----------------------------------------------------------------------------- matmul
def matmul_group(a_shape, b_shape, dtype="f32"):
    return one_op_group("matmul", Case(((a_shape, dtype), (b_shape, dtype))))


def test_matmul_reads_a_transposed_b_in_place_and_copies_other_strides():
    group = matmul_group((2, 3, T, 24), (2, 3, 24, 40))
    kernel = cpu.emit(group)
    a, b = torch.randn(2, 3, 9, 24), torch.randn(2, 3, 24, 40)
    expected = torch.matmul(a, b)
    variants = [
        b.mT.contiguous().mT,  # k^T of attention: the "nt" form reads it as it is
        b[..., :, :40],  # compact
        torch.randn(2, 3, 24, 80)[..., ::2].copy_(b),  # strided columns: copied
        b[:1].expand(2, 3, 24, 40),  # a broadcast (stride 0) batch: copied
    ]
    expected_variants = [expected, expected, expected, torch.matmul(a, b[:1].expand(2, 3, 24, 40))]
    for b_variant, want in zip(variants, expected_variants):
        torch.testing.assert_close(kernel.run(a, b_variant), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kernel.run(a.mT.contiguous().mT, b), expected, rtol=1e-4, atol=1e-4)


def test_matmul_behind_views_in_its_group():
    """q @ k^T with the transpose (a permute) and a reshape of the result in the group."""
    b = GraphBuilder()
    q = b.input("q", TensorType((2, 3, T, 16), "f32"))
    k = b.input("k", TensorType((2, 3, T, 16), "f32"))
    scores = b.op("matmul", q, b.op("permute", k, dims=(0, 1, 3, 2)))
    group = b.build([b.op("reshape", scores, shape=(6, T, T))])
    kernel = check(group, Case((), sizes=(1, 11)), make=lambda s: [torch.randn(2, 3, s, 16), torch.randn(2, 3, s, 16)])
    assert kernel.ops == ("permute", "matmul", "reshape")


def test_matmul_schedule_is_tiled_vectorized_parallel():
    kernel = cpu.emit(matmul_group((4, 64, 64), (4, 64, 64)))
    assert kernel.source.count("T.parallel") >= 2 and kernel.source.count("T.vectorized") >= 2
    assert "vfmadd" in kernel.extra_sources["s"]


@pytest.mark.parametrize("op", ["mean", "var", "sum"])
def test_row_reduction_to_a_single_symbolic_dim(op):
    """[T, 32] -> [T]: the output is cut into chunks of rows, and a reduction split by vector
    lanes inside a chunk failed to build (mean: `cannot make uint from negative value`)."""
    check(one_op_group(op, c(((T, 32), F), dims=(1,))), c(((T, 32), F), dims=(1,), sizes=(1, 5, 70)))


def test_comparison_with_the_scalar_first():
    """`1 >= x` (reverse=True): the reference once called torch.ge(int, Tensor), which torch refuses."""
    for dtype in (I, F):
        check(one_op_group("ge", c(((T, 6), dtype), scalar=1, reverse=True)), c(((T, 6), dtype), scalar=1, reverse=True))


@pytest.mark.parametrize("dtype", ["f16", "bf16", "f32", "f64"])
def test_isnan_and_ne_read_nan_from_the_bits_of_every_float_dtype(dtype):
    """isnan as a bit test (exponent all ones, mantissa not zero): NaNs of either sign and
    payload, not inf, not the largest finite values; `ne` true where either side is NaN."""
    torch_dtype = TensorType((), dtype).torch_dtype
    info = torch.finfo(torch_dtype)
    values = torch.tensor([0.0, -0.0, 1.0, math.inf, -math.inf, math.nan, -math.nan, info.max, -info.max,
                           info.tiny, info.smallest_normal / 4, 3.5], dtype=torch_dtype)
    values = torch.cat([values, -values.abs()[5:6].neg(), torch.randn(29).to(torch_dtype)])  # 42: not a multiple
    b = GraphBuilder()
    x = b.input("x", TensorType((values.numel(),), dtype))
    isnan = cpu.emit(b.build([b.op("isnan", x)]))
    assert torch.equal(isnan.run(values), values.isnan())
    b = GraphBuilder()
    x, y = (b.input(n, TensorType((values.numel(),), dtype)) for n in "xy")
    ne = cpu.emit(b.build([b.op("ne", x, y)]))
    other = values.roll(1)
    assert torch.equal(ne.run(values, other), values != other) and torch.equal(ne.run(values, values), values != values)
