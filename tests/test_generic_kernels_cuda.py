"""A generated `cuda` kernel for every IR op, run in Triton's interpreter against `ir.interpret`.

Every op of the registry that is not a view, a fallback or one with dedicated tests
(test_codegen_triton.py: gemm, norms, attention, the cache ops, rope, embedding; and
test_qgemm_cuda.py, test_qembedding.py) gets one-op groups at odd shapes: size-1 dims,
sizes that do not divide the blocks, broadcast batch dims, negative dims, keepdim both
ways, f32 and f16, integers and bools where the op takes them. Multi-op groups come from
`partition` of small graphs (a manual softmax, a manual layer norm, a masked_fill before
softmax) and run through the executor.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from fuselm import ir  # noqa: E402
from fuselm.codegen import triton as triton_codegen  # noqa: E402
from fuselm.ir import GraphBuilder, TensorType  # noqa: E402
from fuselm.ir.registry import all_ops  # noqa: E402

# masked-off lanes hold placeholder values (log(0), 0/0) that the interpreter warns about
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")

DEDICATED = {"gemm", "qgemm", "layer_norm", "rms_norm", "attention", "paged_attention", "kv_cache_write", "rope",
             "embedding", "qembedding", "pack", "unpack", "varlen_attention"}
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 2e-2}


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("generic_kernels")


def one_op(op, *types, **attrs):
    """A group of one `op` node over inputs of `types` ((shape, dtype) pairs)."""
    b = GraphBuilder()
    inputs = [b.input(f"x{i}", TensorType(shape, dtype)) for i, (shape, dtype) in enumerate(types)]
    return b.build([b.op(op, *inputs, **attrs)])


def check(group, args, kernel_dir, tol=None):
    """Emit `group`, run it on `args`, compare with the reference interpreter."""
    kernel = triton_codegen.emit(group, kernel_dir)
    expected = ir.interpret(group, *[a.clone() for a in args])
    got = kernel.run(*args)
    assert got.dtype == expected.dtype and got.shape == expected.shape, (got.dtype, got.shape, expected.dtype, expected.shape)
    dtype = group.outputs[0].type.dtype
    tol = tol if tol is not None else TOLERANCE.get(dtype, 0)
    torch.testing.assert_close(got.double(), expected.double(), atol=tol, rtol=tol, equal_nan=True)
    return kernel


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def randint(*shape, low=-9, high=10, dtype=torch.int32, seed=0):
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def mask(*shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.5


def test_every_op_has_a_case():
    """A newly registered op fails here until it has a kernel and a case below."""
    ops = {op for op, d in all_ops().items() if not (d.view or d.fallback or d.transient) and op not in DEDICATED}
    covered = set(FLOAT_UNARY) | set(INTEGER_UNARY) | set(BINARY_OPS) | set(COVERED_ELSEWHERE)
    assert ops <= covered, f"ops without a cuda kernel test: {sorted(ops - covered)}"


# ----------------------------------------------------------------------------- pointwise
def special_values(dtype=torch.float32):
    """x[T=3, 7] with halves (for round), signed zeros, big values, inf and nan."""
    values = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -0.0],
                           [1e-7, -3e-6, 3.7, -8.2, 1e6 + 0.5, 2.0 ** 24 + 2, 0.0],
                           [float("inf"), float("-inf"), float("nan"), 0.3, -0.7, 1.25, -1.75]])
    return values.to(dtype)


FLOAT_UNARY = {  # op -> the inputs it is defined on
    "exp": lambda s, d: randn(*s, dtype=d), "log": lambda s, d: randn(*s).abs().to(d) + 0.1,
    "sqrt": lambda s, d: randn(*s).abs().to(d), "rsqrt": lambda s, d: randn(*s).abs().to(d) + 0.1,
    "reciprocal": lambda s, d: randn(*s, dtype=d), "sin": lambda s, d: randn(*s, dtype=d, scale=3),
    "cos": lambda s, d: randn(*s, dtype=d, scale=3), "tanh": lambda s, d: randn(*s, dtype=d, scale=3),
    "erf": lambda s, d: randn(*s, dtype=d), "sigmoid": lambda s, d: randn(*s, dtype=d, scale=4),
    "silu": lambda s, d: randn(*s, dtype=d, scale=3), "gelu": lambda s, d: randn(*s, dtype=d, scale=3),
    "log1p": lambda s, d: torch.cat([randn(*s).abs() * 3 - 0.9, torch.full(s, 1e-6)]).to(d),
    "expm1": lambda s, d: torch.cat([randn(*s, scale=3), torch.full(s, -2e-6)]).to(d),
    "tan": lambda s, d: randn(*s, dtype=d), "atan": lambda s, d: randn(*s, dtype=d, scale=5),
}
INTEGER_UNARY = ("neg", "abs", "relu", "sign", "floor", "ceil", "round", "trunc", "copy", "logical_not", "isnan", "isinf")


@pytest.mark.parametrize("op", sorted(FLOAT_UNARY))
def test_float_unary(op, kernel_dir):
    for shape, dtype in (((3, 7), "f32"), ((2, 1, 5), "f16")):
        group = one_op(op, (("T",) + shape[1:], dtype))
        x = FLOAT_UNARY[op](shape, TensorType((), dtype).torch_dtype)
        check(group, [x], kernel_dir, tol={"f32": 2e-6, "f16": 2e-3}[dtype])


@pytest.mark.parametrize("op", INTEGER_UNARY + ("gelu", "exp"))
def test_unary_of_integers_bools_and_special_values(op, kernel_dir):
    """Whole-number ops on halves, zeros, infs, nans; integer inputs (float results for exp)."""
    if op not in ("gelu", "exp"):
        check(one_op(op, (("T", 7), "f32")), [special_values()], kernel_dir)
        check(one_op(op, ((3, 7), "f16")), [special_values(torch.float16)], kernel_dir)
    if op == "gelu":
        check(one_op(op, (("T", 7), "f32"), approximate="tanh"), [randn(5, 7, scale=3)], kernel_dir)
        return
    if op in ("logical_not", "copy", "sign"):
        check(one_op(op, ((4, "T"), "bool")), [mask(4, 3)], kernel_dir)
    check(one_op(op, (("T", 1, 6), "i32")), [randint(3, 1, 6)], kernel_dir)


BINARY_OPS = ("add", "sub", "mul", "div", "maximum", "minimum", "pow", "eq", "ne", "lt", "le", "gt", "ge",
              "logical_and", "logical_or", "logical_xor", "remainder", "floor_divide")
LOGICAL = ("logical_and", "logical_or", "logical_xor")


def nonzero(x):
    return torch.where(x == 0, torch.ones_like(x), x)


@pytest.mark.parametrize("op", BINARY_OPS)
def test_binary_broadcast_scalars_and_dtypes(op, kernel_dir):
    """[T, 4, 5] op [4, 1] in f32 and f16, a scalar on either side, and integer operands."""
    base = (lambda x: x.abs() + 0.5) if op == "pow" else (lambda x: x)
    divisor = nonzero if op in ("div", "remainder", "floor_divide") else (lambda x: x)
    a32, b32 = base(randn(3, 4, 5, scale=4)), divisor(randn(4, 1, seed=1, scale=3))
    group = one_op(op, (("T", 4, 5), "f32"), ((4, 1), "f32"))
    check(group, [a32, b32], kernel_dir, tol=1e-5)
    group = one_op(op, ((3, 4, 5), "f16"), ((4, 1), "f16"))
    check(group, [a32.half(), b32.half()], kernel_dir)
    if op not in LOGICAL:
        for scalar, reverse in ((3, False), (-2.5, True)):
            if reverse and op in ("pow", "eq", "ne", "lt", "le", "gt", "ge"):
                continue  # the reference takes the scalar on the right only
            group = one_op(op, (("T", 5), "f32"), scalar=scalar, reverse=reverse)
            check(group, [divisor(base(randn(2, 5, scale=4)))], kernel_dir, tol=1e-5)
    if op != "pow":
        ints = (randint(3, 1, 6), divisor(randint(5, 6, seed=1)))
        check(one_op(op, (("T", 1, 6), "i32"), ((5, 6), "i32")), list(ints), kernel_dir)
        if op not in LOGICAL:
            check(one_op(op, (("T", 6), "i64"), scalar=-4), [randint(4, 6, dtype=torch.int64)], kernel_dir)
    if op in LOGICAL + ("eq", "ne"):
        check(one_op(op, ((3, "T"), "bool"), ((1, "T"), "bool")), [mask(3, 5), mask(1, 5, seed=1)], kernel_dir)


def test_pow_of_negative_bases_special_values_and_integers(kernel_dir):
    """torch.pow's sign for odd whole exponents, NaN for fractional ones, C99's special
    values (0, +-inf, NaN, -0, (-1)^inf), tensor and literal exponents, and integers."""
    inf, nan = math.inf, math.nan
    bases = torch.tensor([-2.0, -2.0, -3.0, -0.5, 2.0, -0.0, -0.0, 0.0, -inf, -inf, -1.0, 1.0, nan, nan, -2.0, 7.0])
    exponents = torch.tensor([3.0, 2.0, -3.0, 0.5, -1.5, 3.0, -1.0, -2.0, 3.0, 0.5, inf, nan, 0.0, 2.0, 11.0, 9.0])
    check(one_op("pow", ((16,), "f32"), ((16,), "f32")), [bases, exponents], kernel_dir, tol=1e-5)
    for exponent in (5, -6, 2.5, 0.5, -0.5):  # literal exponents beside the products of 1..4
        check(one_op("pow", (("T",), "f32"), scalar=exponent), [bases], kernel_dir, tol=1e-5)
    ints = randint(3, 1, 6)
    powers = randint(5, 6, low=-3, high=12, seed=1)
    check(one_op("pow", (("T", 1, 6), "i32"), ((5, 6), "i32")), [ints, powers], kernel_dir)
    check(one_op("pow", (("T", 6), "i64"), scalar=7), [randint(4, 6, dtype=torch.int64)], kernel_dir)


COVERED_ELSEWHERE = ("cast", "where", "masked_fill", "concat", "index_select", "full", "arange", "gather",
                     "tril", "triu", "sum", "mean", "amax", "amin", "argmax", "argmin", "var", "softmax",
                     "log_softmax", "cumsum", "matmul")


def test_cast_where_masked_fill(kernel_dir):
    for src, dst, x in (("f32", "i32", randn(3, 5, scale=9)), ("f32", "f16", randn(3, 5)), ("f32", "bool", special_values()),
                        ("i64", "f32", randint(3, 5, dtype=torch.int64)), ("bool", "f32", mask(3, 5)), ("f16", "bf16", randn(3, 5).half())):
        check(one_op("cast", (("T", x.shape[1]), src), dtype=dst), [x], kernel_dir)
    group = one_op("where", ((1, "T"), "bool"), ((4, "T"), "f32"), ((4, 1), "f16"))
    check(group, [mask(1, 7), randn(4, 7), randn(4, 1).half()], kernel_dir)
    group = one_op("masked_fill", ((2, "T", 5), "f16"), (("T", 1), "bool"), value=-math.inf)
    check(group, [randn(2, 3, 5).half(), mask(3, 1)], kernel_dir)


def test_element_moves(kernel_dir):
    """concat, index_select, gather, tril/triu; full and arange (no inputs of their own) beside an input."""
    group = one_op("concat", (("T", 2, 3), "f32"), (("T", 1, 3), "f16"), (("T", 4, 3), "f32"), dim=-2)
    check(group, [randn(3, 2, 3), randn(3, 1, 3).half(), randn(3, 4, 3)], kernel_dir)
    group = one_op("index_select", ((4, "T"), "i32"), ((6,), "i64"), dim=-1)
    check(group, [randint(4, 5), torch.tensor([4, 0, 0, 3, 1, 4])], kernel_dir)
    for dim in (0, -1):
        group = one_op("gather", ((5, "T"), "f32"), ((3, "T"), "i64"), dim=dim)
        index = randint(3, 6, low=0, high=5 if dim == 0 else 6, dtype=torch.int64)
        check(group, [randn(5, 6), index], kernel_dir)
    group = one_op("gather", ((4, 7), "f16"), ((4, 2), "i32"), dim=1)
    check(group, [randn(4, 7).half(), randint(4, 2, low=0, high=7)], kernel_dir)
    for op in ("tril", "triu"):
        for diagonal, (shape, dtype) in ((0, (("B", 1, 5, 7), "f32")), (-1, ((3, 6), "i32")), (2, ((2, 4, 4), "bool"))):
            group = one_op(op, (shape, dtype), diagonal=diagonal)
            x = {"f32": randn(2, 1, 5, 7), "i32": randint(3, 6), "bool": torch.ones(2, 4, 4, dtype=torch.bool)}[dtype]
            check(group, [x], kernel_dir)
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 5), "f32"))
    ramp = b.op("arange", end=5, start=0, step=1, dtype="i64")
    group = b.build([b.op("mul", b.op("add", x, ramp), b.op("full", shape=(1, 5), value=-1.5, dtype="f32"))])
    check(group, [randn(3, 5)], kernel_dir)


# ----------------------------------------------------------------------------- reductions
@pytest.mark.parametrize("op", ["sum", "mean", "amax", "amin", "var"])
def test_reductions_over_any_dims(op, kernel_dir):
    """Last dim, two dims apart, all dims (dims=()), keepdim both ways; a row longer than a block."""
    attrs = {"correction": 1} if op == "var" else {}
    x = randn(3, 4, 5, scale=3)
    for dims, keepdim in (((-1,), True), ((0, 2), False), ((), False), ((1,), False)):
        check(one_op(op, (("T", 4, 5), "f32"), dims=dims, keepdim=keepdim, **attrs), [x], kernel_dir, tol=1e-5)
    check(one_op(op, ((2, "T"), "f32"), dims=(1,), keepdim=True, **attrs), [randn(2, 1500)], kernel_dir, tol=1e-5)
    check(one_op(op, ((3, 1, 6), "f16"), dims=(-3, 1), keepdim=True, **attrs), [randn(3, 1, 6, scale=3).half()], kernel_dir)
    if op in ("sum", "amax", "amin"):
        check(one_op(op, (("T", 6), "i32"), dims=(0,), keepdim=False), [randint(5, 6)], kernel_dir)
        check(one_op(op, ((4, "T"), "bool"), dims=(-1,), keepdim=True), [mask(4, 3)], kernel_dir)
    if op in ("amax", "amin"):
        x = randn(3, 4)
        x[1, 2] = float("nan")  # NaN propagates, as torch does
        check(one_op(op, (("T", 4), "f32"), dims=(1,)), [x], kernel_dir)
    if op == "var":
        for correction in (0, 2):
            check(one_op(op, (("T", 5), "f32"), dims=(-1,), correction=correction), [randn(4, 5)], kernel_dir)
        check(one_op(op, ((3, "T"), "i32"), dims=(0,), correction=1), [randint(3, 4)], kernel_dir)
        check(one_op(op, (("T", 1), "f32"), dims=(1,), correction=1), [randn(3, 1)], kernel_dir)  # 0 / 0: nan


@pytest.mark.parametrize("op", ["argmax", "argmin"])
def test_arg_reductions_first_index_on_ties_and_nan(op, kernel_dir):
    ties = randint(3, 7, low=-2, high=3)
    for dim, keepdim in ((-1, False), (0, True)):
        check(one_op(op, (("T", 7), "i32"), dim=dim, keepdim=keepdim), [ties], kernel_dir)
    x = randn(4, 1100)
    x[1, 5] = x[1, 1030] = 1e9 if op == "argmax" else -1e9  # ties in different lanes and chunks
    x[2, 7] = x[2, 900] = float("nan")
    check(one_op(op, (("T", 1100), "f32"), dim=1), [x], kernel_dir)
    check(one_op(op, ((2, "T", 3), "f16"), dim=-2, keepdim=True), [randn(2, 5, 3).half()], kernel_dir)
    check(one_op(op, (("T", 4), "u8"), dim=1), [randint(3, 4, low=0, high=3, dtype=torch.uint8)], kernel_dir)
    check(one_op(op, (("T", 4), "f32"), dim=1), [torch.full((2, 4), -math.inf)], kernel_dir)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_on_any_dim(op, kernel_dir):
    x = randn(3, 6, 5, scale=3)
    x[0, 2, :] = -math.inf  # a fully masked line along dim 2: nan, as torch
    x[1, :, 3] = -math.inf  # ... and along dim 1
    for dim in (-1, 0, 1):
        check(one_op(op, (("T", 6, 5), "f32"), dim=dim), [x], kernel_dir)
    check(one_op(op, ((2, "T"), "f16"), dim=-1), [randn(2, 1500, scale=4).half()], kernel_dir)
    check(one_op(op, (("T", 1), "f32"), dim=1), [randn(3, 1)], kernel_dir)


def test_cumsum_on_any_dim(kernel_dir):
    check(one_op("cumsum", (("T", 4, 5), "f32"), dim=1), [randn(3, 4, 5)], kernel_dir)
    check(one_op("cumsum", ((2, "T"), "f32"), dim=-1), [randn(2, 1300)], kernel_dir, tol=1e-4)
    check(one_op("cumsum", (("T", 6), "i32"), dim=0), [randint(5, 6)], kernel_dir)
    check(one_op("cumsum", ((4, "T"), "bool"), dim=-1), [mask(4, 9)], kernel_dir)
    check(one_op("cumsum", ((3, "T"), "f16"), dim=1), [randn(3, 7).half()], kernel_dir)


def test_row_kernels_read_their_prologue_through_views(kernel_dir):
    """exp -> reshape -> slice -> sum, then a pointwise use of the sum beside a softmax of it."""
    T_ = ir.symbol("T")
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 12), "f32"))
    y = b.input("y", TensorType((1, 3), "f16"))
    pieces = b.op("slice", b.op("reshape", b.op("exp", x), shape=(T_, 3, 4)), dim=2, start=1, end=4)  # [T, 3, 3]
    sums = b.op("sum", pieces, dims=(-1,))  # [T, 3]
    group = b.build([b.op("mul", b.op("softmax", b.op("mul", sums, y), dim=0), sums)])
    kernel = check(group, [randn(5, 12), randn(1, 3).half()], kernel_dir)
    assert kernel.source.count("@triton.jit") == 3  # sum, softmax, the final multiply


def test_unsupported_dtypes_are_clear_errors(kernel_dir):
    from fuselm.errors import UnsupportedKernelError

    for group in (one_op("sum", ((3, "T"), "c64"), dims=()), one_op("matmul", ((2, 3), "bool"), ((3, 2), "bool"))):
        with pytest.raises(UnsupportedKernelError):
            triton_codegen.emit(group, kernel_dir)


# ----------------------------------------------------------------------------- matmul
@pytest.mark.parametrize("a_shape, b_shape, sizes", [
    (("M", 20), (20, 9), {"M": 1}),  # one row
    (("M", 70), (70, 33), {"M": 37}),  # K and N across several tiles, M over the small-M tile
    (("B", 2, "M", 8), ("B", 2, 8, 5), {"B": 3, "M": 5}),  # batched, no broadcast
    (("M", 6), ("B", 6, 3), {"B": 2, "M": 4}),  # a missing batch dim
    (("B", 1, "M", 8), (3, 8, 5), {"B": 2, "M": 3}),  # size-1 and missing batch dims on either side
])
def test_matmul_broadcast_batch_dims(a_shape, b_shape, sizes, kernel_dir):
    group = one_op("matmul", (a_shape, "f32"), (b_shape, "f32"))
    shape = lambda s: [sizes.get(d, d) for d in s]  # noqa: E731
    check(group, [randn(*shape(a_shape)), randn(*shape(b_shape), seed=1)], kernel_dir, tol=1e-4)


def test_matmul_transposed_operand_is_read_through_strides(kernel_dir):
    """b = w^T of an [N, K] input: the kernel gets the permuted view, not a copy."""
    b = GraphBuilder()
    x = b.input("x", TensorType((2, "M", 12), "f16"))
    w = b.input("w", TensorType((2, 7, 12), "f16"))
    group = b.build([b.op("matmul", x, b.op("permute", w, dims=(0, 2, 1)))])
    kernel = check(group, [randn(2, 5, 12).half(), randn(2, 7, 12, seed=1).half()], kernel_dir)
    assert ".permute(0, 2, 1)" in kernel.source and ".contiguous()" not in kernel.source


@pytest.mark.parametrize("dtype, tol", [("bf16", 2e-2), ("i32", 0), ("i64", 0)])
def test_matmul_other_dtypes(dtype, tol, kernel_dir):
    group = one_op("matmul", ((3, "M", 10), dtype), ((10, 6), dtype))
    torch_dtype = TensorType((), dtype).torch_dtype
    if tol == 0:  # integers: a multiply-and-sum in int64
        a, b = randint(3, 17, 10, low=-5, high=6), randint(10, 6, low=-5, high=6, seed=1)
    else:
        a, b = randn(3, 17, 10), randn(10, 6, seed=1)
    check(group, [a.to(torch_dtype), b.to(torch_dtype)], kernel_dir, tol=tol)


# ----------------------------------------------------------------------------- partitioned graphs
def run_partitioned(graph, kernel_dir, *args):
    """Every group of `partition(graph)` emitted for cuda and run by the executor."""
    from fuselm.passes.partition import KernelGroup, partition
    from fuselm.runtime.executor import Executor

    steps = partition(graph)
    groups = [step.graph.op_counts() for step in steps if isinstance(step, KernelGroup)]
    out = Executor(graph, steps, lambda step: triton_codegen.emit(step.graph, kernel_dir).run)(*args)
    expected = ir.interpret(graph, *args)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, equal_nan=True)
    return groups


def test_manual_softmax(kernel_dir):
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 11), "f32"))
    shifted = b.op("exp", b.op("sub", x, b.op("amax", x, dims=(-1,), keepdim=True)))
    graph = b.build([b.op("div", shifted, b.op("sum", shifted, dims=(-1,), keepdim=True))])
    groups = run_partitioned(graph, kernel_dir, randn(5, 11, scale=4))
    assert {"amax": 1, "sub": 1, "exp": 1} in groups and {"sum": 1, "div": 1} in groups


def test_manual_layer_norm_with_mean_and_var(kernel_dir):
    b = GraphBuilder()
    x = b.input("x", TensorType(("T", 24), "f32"))
    weight, bias = b.input("weight", TensorType((24,), "f32")), b.input("bias", TensorType((24,), "f32"))
    centered = b.op("sub", x, b.op("mean", x, dims=(-1,), keepdim=True))
    rstd = b.op("rsqrt", b.op("add", b.op("var", x, dims=(-1,), keepdim=True, correction=0), scalar=1e-5))
    graph = b.build([b.op("add", b.op("mul", b.op("mul", centered, rstd), weight), bias)])
    args = [randn(7, 24, scale=2) + 3, randn(24, seed=1), randn(24, seed=2)]
    groups = run_partitioned(graph, kernel_dir, *args)
    assert any("mean" in g and "var" in g for g in groups)  # two reductions and their epilogue in one group
    expected = torch.nn.functional.layer_norm(args[0], (24,), args[1], args[2], 1e-5)
    torch.testing.assert_close(ir.interpret(graph, *args), expected, atol=1e-5, rtol=1e-5)


def test_variance_through_a_reduction_in_the_prologue(kernel_dir):
    """mean((x - mean(x))^2) over a transposed view: the outer mean reads the inner one's buffer."""
    b = GraphBuilder()
    x = b.input("x", TensorType((6, "T"), "f32"))
    xt = b.op("permute", x, dims=(1, 0))
    deviation = b.op("sub", xt, b.op("mean", xt, dims=(1,), keepdim=True))
    graph = b.build([b.op("rsqrt", b.op("add", b.op("mean", b.op("pow", deviation, scalar=2), dims=(1,)), scalar=1e-6))])
    groups = run_partitioned(graph, kernel_dir, randn(6, 9))
    assert groups == [{"mean": 2, "sub": 1, "pow": 1, "add": 1, "rsqrt": 1}]  # the permute is a free view


def test_masked_fill_before_softmax_between_matmuls(kernel_dir):
    b = GraphBuilder()
    q = b.input("q", TensorType(("B", 2, "S", 8), "f32"))
    k = b.input("k", TensorType(("B", 2, "S", 8), "f32"))
    v = b.input("v", TensorType(("B", 2, "S", 8), "f32"))
    padding = b.input("padding", TensorType(("B", 1, 1, "S"), "bool"))
    scores = b.op("mul", b.op("matmul", q, b.op("permute", k, dims=(0, 1, 3, 2))), scalar=8 ** -0.5)
    probs = b.op("softmax", b.op("masked_fill", scores, padding, value=-math.inf), dim=-1)
    graph = b.build([b.op("matmul", probs, v)])
    pad = torch.zeros(2, 1, 1, 6, dtype=torch.bool)
    pad[1, ..., 4:] = True
    groups = run_partitioned(graph, kernel_dir, randn(2, 2, 6, 8), randn(2, 2, 6, 8, seed=1), randn(2, 2, 6, 8, seed=2), pad)
    assert {"mul": 1, "masked_fill": 1, "softmax": 1} in groups


# ----------------------------------------------------------------------------- found by the model zoo
class PartialRope(torch.nn.Module):
    """GPT-NeoX / Phi / StableLM rotary on the first `rotary` features; phi3's rotates all of
    them, leaving an empty pass-through part to concatenate."""

    def __init__(self, rotary: int):
        super().__init__()
        self.rotary = rotary

    def forward(self, q, cos, sin):
        rot, keep = q[..., : self.rotary], q[..., self.rotary:]
        x1, x2 = rot[..., : self.rotary // 2], rot[..., self.rotary // 2:]
        return torch.cat((rot * cos + torch.cat((-x2, x1), -1) * sin, keep), -1)


@pytest.mark.parametrize("rotary", [8, 16])
def test_views_of_several_inputs_and_empty_concat_parts(rotary, tmp_path):
    """Two run() arguments once got the same name (a SyntaxError), and an empty concat part
    was read at index -1 (a segfault in the interpreter)."""
    import fuselm

    model = PartialRope(rotary)
    q, cos, sin = torch.randn(2, 2, 8, 16), torch.randn(8, rotary), torch.randn(8, rotary)
    compiled = fuselm.compile(model, target="cuda", strict=True, cache_dir=str(tmp_path))
    torch.testing.assert_close(compiled(q, cos, sin), model(q, cos, sin))
