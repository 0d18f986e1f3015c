"""IR op -> TE: one `te.compute` (or a few) per node, with the IR's semantics.

`lower(group)` turns a group into TE tensors: an input becomes a placeholder, each
node becomes the compute its table entry builds from the computes of its inputs.
Attributes mean exactly what `ir/core_ops.py` says (`scalar` and `reverse`, `dims`,
`keepdim`, `shape` with -1, ...); types promote as torch promotes them; symbolic sizes
are TIR variables (`build.Dims`). Views (reshape, permute, expand, slice, select) are
index maps, so once inlined they cost nothing. Each entry is a small function of
(node, its input tensors, the lowering context).
"""
from __future__ import annotations

import functools
import math
import re

import sympy
import torch
from tvm import te, tirx
from tvm.s_tir.schedule import ScheduleError

from ...errors import UnsupportedKernelError
from ...ir.types import TensorType, dims_equal, dtype_of as ir_dtype_of
from . import fastmath
from .build import Dims, as_expr, const, dtype_of, tir_dtype, vector_lanes
from .qgemm import weight_code

LOWER: dict = {}
_REDUCE = 2  # IterVar.CommReduce
KEEP = "_kept"  # a compute so named is materialized, not inlined (elementwise.py's schedule)


def lowers(*ops):
    def register(fn):
        for op in ops:
            LOWER[op] = fn
        return fn

    return register


class Lowering:
    """The context of one group's lowering: its dimension variables and names.

    An op may leave `refinements`: functions of the schedule, run after the generic
    schedule, that tune the blocks it named (attention's vector dot products).
    """

    def __init__(self, dims: Dims):
        self.dims = dims
        self.count = 0
        self.refinements: list = []

    def name(self, op: str) -> str:
        self.count += 1
        return f"{op}_{self.count}"

    def shape(self, ir_type: TensorType) -> list:
        return self.dims.shape(ir_type.shape)

    def compute(self, node, fn, name: str | None = None) -> te.Tensor:
        """A compute over the node's output shape, cast to the node's dtype."""
        dtype = tir_dtype(node.type.dtype)
        return te.compute(self.shape(node.type), lambda *i: cast(fn(*i), dtype), name=name or self.name(node.op))


def placeholder(ir_type: TensorType, name: str, dims: Dims) -> te.Tensor:
    return te.placeholder(dims.shape(ir_type.shape), tir_dtype(ir_type.dtype), name=re.sub(r"\W", "_", name))


def cast(value, dtype: str):
    """`value` in `dtype`; to bool means != 0, as torch casts."""
    if isinstance(value, (int, float)):
        return tirx.const(value, dtype)
    if hasattr(value, "asobject"):
        value = value.asobject()
    if dtype == "bool" and dtype_of(value) != "bool":
        return value != const(0, value)
    return value if dtype_of(value) == dtype else value.astype(dtype)


def scalar_const(value, dtype: str, dims: Dims):
    if isinstance(value, sympy.Expr):
        return cast(dims(value), dtype)
    return tirx.const(bool(value) if dtype == "bool" else value, dtype)


def broadcast_read(tensor: te.Tensor, ir_type: TensorType, index: tuple):
    """tensor at `index` of a wider output, broadcasting its size-1 dims as torch does."""
    offset = len(index) - ir_type.rank
    return tensor(*(0 if d == 1 else index[offset + j] for j, d in enumerate(ir_type.shape)))


def _meta(t: TensorType) -> torch.Tensor:
    return torch.empty((1,) * t.rank, dtype=t.torch_dtype, device="meta")


def promoted_dtype(node) -> str:
    """The dtype torch computes a binary op in (before a comparison turns it to bool)."""
    a = _meta(node.inputs[0].type)
    b = _meta(node.inputs[1].type) if len(node.inputs) > 1 else node.attrs["scalar"]
    b = 1 if isinstance(b, sympy.Expr) else b  # a size: an int
    return tir_dtype(ir_dtype_of(torch.result_type(a, b)))


# ----------------------------------------------------------------------------- elementwise
# x ** scalar as torch's cpu kernels compute these exponents (exact products, sqrt, division)
_POW_BY = {
    0.0: lambda a: const(1.0, a),
    1.0: lambda a: a,
    2.0: lambda a: a * a,
    3.0: lambda a: a * a * a,
    0.5: tirx.sqrt,
    -0.5: lambda a: const(1.0, a) / tirx.sqrt(a),
    -1.0: lambda a: const(1.0, a) / a,
    -2.0: lambda a: const(1.0, a) / (a * a),
}


def _pow(a, b):
    """Floats: torch's forms of the common scalar exponents, else fastmath's pow (in fp32
    for fp16 / bf16; libm's for fp64); integers by squaring."""
    if not dtype_of(a).startswith(("float", "bfloat")):
        return _int_pow(a, b)
    if isinstance(b, tirx.FloatImm) and b.value in _POW_BY:
        return _POW_BY[b.value](a)
    if dtype_of(a) in _NARROW:
        return fastmath.pow(cast(a, "float32"), cast(b, "float32")).astype(dtype_of(a))
    return fastmath.pow(a, b)


_POW_BITS = 6  # exponent bits squared through (TVM inlines lets: the tree doubles per bit)


def _int_pow(a, b, k: int = 0):
    """a ** b for integers by squaring, wrapping as torch's: exact for exponents < 64 and
    for bases -1, 0, 1 and even ones beyond (which wrap to 0); a static exponent exactly."""
    static = isinstance(b, tirx.IntImm)
    if static and b.value >> k == 0:
        return const(1, a)
    if not static and k == _POW_BITS:
        large = b >= const(1 << _POW_BITS, b)
        parity = tirx.Select(tirx.bitwise_and(b, const(1, b)) == const(0, b), const(1, a), const(-1, a))
        beyond = tirx.Select(a == const(1, a), a, tirx.Select(a == const(-1, a), parity, const(0, a)))
        return tirx.Select(large, beyond, const(1, a))
    rest = _int_pow(a * a, b, k + 1)
    if static:
        return a * rest if b.value >> k & 1 else rest
    bit = tirx.bitwise_and(tirx.shift_right(b, const(k, b)), const(1, b)) != const(0, b)
    return rest * tirx.Select(bit, a, const(1, a))


_NARROW = ("float16", "bfloat16")


def _is_float(value) -> bool:
    return dtype_of(value).startswith(("float", "bfloat"))


def true_divide(a, b):
    """a / b for floats; by a constant zero as IEEE says (TVM's constant folding refuses it)."""
    if isinstance(b, tirx.FloatImm) and b.value == 0:
        return a * const(math.copysign(math.inf, b.value), a)
    return a / b


def _not_equal(a, b):
    """a != b, true when either is NaN (as torch): TVM's float != is LLVM's ordered
    `one`, false for NaN, and TVM simplifies not(a == b) back to it."""
    return tirx.any(a != b, _isnan(a), _isnan(b)) if _is_float(a) else a != b


def _differ(p, q):
    """p xor q for bools (LLVM takes TVM's bool != for a float compare)."""
    return tirx.any(tirx.all(p, tirx.Not(q)), tirx.all(tirx.Not(p), q))


_FAST_FMOD_QUOTIENT = float(1 << 27)  # |a / b| below (in fp32): the fp64 form of fmod is exact


def _fmod_fast(a, b):
    """C's fmod of fp32 values while |a / b| < 2^27 (see _modulo), vectorizable: in fp64
    a - trunc(a / b) * b is exact (a quotient below 2^28 times a 24-bit b fits 53 bits;
    the remainder lies on the grid of the smaller ulp); the rounded quotient may be one
    off, then one b more or less. Written without lets (see `_inlined`)."""
    x, y = a.astype("float64"), b.astype("float64")
    sign = tirx.copysign(const(1.0, x), x)
    step = tirx.abs(y) * sign  # |r| < |step|, r with x's sign
    r = x - tirx.trunc(true_divide(x, y)) * y
    r = r + tirx.Select(r * sign < const(0.0, r), step, const(0.0, r))
    r = r - tirx.Select(r * sign >= step * sign, step, const(0.0, r))
    # x mod inf is x (the quotient made it NaN); a zero keeps x's sign
    return tirx.Select(tirx.all(tirx.isinf(y), tirx.isfinite(x)), x, tirx.copysign(r, x)).astype("float32")


def _fmod_libm(a, b):
    """C's fmod from libm (exact; a call per element: LLVM has no fmod intrinsic)."""
    return tirx.call_pure_extern(dtype_of(a), "fmod" if dtype_of(a) == "float64" else "fmodf", a, b)


def _safe_divisor(a, b):
    """b with 0 and -1 made harmless: integer division by 0 and MIN / -1 trap on x86
    (torch raises for the first; the callers handle b = -1 themselves)."""
    return tirx.Select(tirx.any(b == const(0, b), b == const(-1, b)), const(1, b), b)


def _needs_libm(a, b):
    """Whether fp32 a mod b may be beyond _fmod_fast's exact range (b = 0 too). A product,
    not a / b: a quotient would be shared with the op's own and TVM's CSE then misplaces it."""
    a, b = cast(a, "float32"), cast(b, "float32")
    return tirx.abs(a) >= tirx.abs(b) * const(_FAST_FMOD_QUOTIENT, b)


def _in_f32(fn):
    """fn(a, b, fmod, bind) computed in fp32 for fp16/bf16 operands (as torch's cpu kernels)."""
    def wide(a, b, fmod=_fmod_libm, bind=fastmath.let):
        dtype = dtype_of(a)
        if dtype not in _NARROW:
            return fn(a, b, fmod, bind)
        return fn(cast(a, "float32"), cast(b, "float32"), fmod, bind).astype(dtype)

    return wide


def _inlined(value, body, name=None):
    """What `fastmath.let` binds, written out instead (TVM's CSE shares it): TVM's CSE
    misplaces what it hoists out of lets of two blocks under one loop."""
    return body(value)


@_in_f32
def _remainder(a, b, fmod, bind):
    """Python's modulo (the sign of the divisor), as torch.remainder: fmod, then + b."""
    if not _is_float(a):
        return tirx.Select(b == const(-1, b), const(0, a), tirx.floormod(a, _safe_divisor(a, b)))
    zero = const(0.0, a)
    return bind(fmod(a, b), lambda mod: tirx.Select(tirx.all(mod != zero, _differ(b < zero, mod < zero)), mod + b, mod),
                "mod")


@_in_f32
def _floor_divide(a, b, fmod, bind):
    """torch.floor_divide: Python's floor division; for floats torch's div_floor (from
    fmod, so that a - b * (a // b) is exact), with a signed zero and a / 0 for b = 0."""
    if not _is_float(a):
        return tirx.Select(b == const(-1, b), -a, tirx.floordiv(a, _safe_divisor(a, b)))
    zero, one = const(0.0, a), const(1.0, a)

    def from_mod(mod):
        div = true_divide(a - mod, b)
        return bind(tirx.Select(tirx.all(mod != zero, _differ(b < zero, mod < zero)), div - one, div), rounded, "div")

    def rounded(div):
        floor = bind(tirx.floor(div), lambda f: tirx.Select(div - f > const(0.5, a), f + one, f), "f")
        quotient = tirx.Select(div == zero, tirx.copysign(zero, true_divide(a, b)), floor)  # (== is false for NaN)
        return tirx.Select(b == zero, true_divide(a, b), quotient)

    return bind(fmod(a, b), from_mod, "mod")


_MODULO = {"remainder": _remainder, "floor_divide": _floor_divide}


def _nan_max(a, b):
    """max(a, b), NaN if either is NaN (as torch.maximum; tirx.max drops a NaN a): LLVM's
    `maximum` (IEEE 754-2019), a few vector instructions, where TVM vectorizes no isnan."""
    return tirx.call_llvm_pure_intrin(dtype_of(a), "llvm.maximum", a, b) if _is_float(a) else tirx.max(a, b)


def _nan_min(a, b):
    return tirx.call_llvm_pure_intrin(dtype_of(a), "llvm.minimum", a, b) if _is_float(a) else tirx.min(a, b)


_BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: true_divide(a, b),
    "pow": _pow,
    "maximum": lambda a, b: _nan_max(a, b),
    "minimum": lambda a, b: _nan_min(a, b),
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: _not_equal(a, b),
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "logical_and": lambda a, b: tirx.all(cast(a, "bool"), cast(b, "bool")),
    "logical_or": lambda a, b: tirx.any(cast(a, "bool"), cast(b, "bool")),
    "logical_xor": lambda a, b: _differ(cast(a, "bool"), cast(b, "bool")),
}


@lowers(*_BINARY, *_MODULO)
def _binary(ctx: Lowering, node, args):
    # true division computes in the (float) result dtype; the others in torch's promoted one
    dtype = tir_dtype(node.type.dtype) if node.op == "div" else promoted_dtype(node)
    a_type = node.inputs[0].type
    exponent = None  # pow's, when a scalar
    if len(args) == 2:
        b_type = node.inputs[1].type
        operands = [lambda i: cast(broadcast_read(args[0], a_type, i), dtype),
                    lambda i: cast(broadcast_read(args[1], b_type, i), dtype)]
    else:
        scalar = scalar_const(node.attrs["scalar"], dtype, ctx.dims)
        operands = [lambda i: cast(broadcast_read(args[0], a_type, i), dtype), lambda i: scalar]
        if node.attrs.get("reverse", False):
            operands.reverse()
        else:
            exponent = scalar
    if node.op in _MODULO:
        return _modulo(ctx, node, dtype, lambda i: (operands[0](i), operands[1](i)))
    fn = _BINARY[node.op]
    if node.op == "pow" and _pow_is_expansive(dtype, exponent):
        # an expression of many lets inlined into another op's lets makes TVM's passes and
        # LLVM codegen bind each let's value with the lets before it substituted (minutes of
        # build for a fused group): a block of its own between them cuts that
        return _kept(ctx, ctx.compute(node, lambda *i: fn(operands[0](i), operands[1](i)),
                                      name=ctx.name(node.op) + KEEP))
    return ctx.compute(node, lambda *i: fn(operands[0](i), operands[1](i)))


def _pow_is_expansive(dtype: str, exponent) -> bool:
    """Whether pow is fastmath's (log2 and exp2 polynomials in fp64 behind lets)."""
    return dtype.startswith(("float", "bfloat")) and dtype != "float64" and not (
        isinstance(exponent, tirx.FloatImm) and exponent.value in _POW_BY)


def _kept(ctx: Lowering, kept: te.Tensor) -> te.Tensor:
    """A compute named `..._kept` (computed in a block of its own, per row: what reads it
    loads it), its innermost loop vectorized."""
    ctx.refinements.append(lambda sch: _vectorize_innermost(sch, kept.op.name))
    return kept


def _modulo(ctx: Lowering, node, dtype: str, operands):
    """remainder / floor_divide. Floats below fp64 are exact and vectorized in two passes:
    a vectorized one with the fp64 fmod (exact for |a / b| < 2^27, nearly always), kept per
    row, then the output, which takes libm's fmod only where that one is not exact (the
    branch scalarizes this pass, a select and a copy per element)."""
    fn = _MODULO[node.op]
    if not dtype.startswith(("float", "bfloat")) or dtype == "float64":
        return ctx.compute(node, lambda *i: fn(*operands(i)))
    fast = _kept(ctx, ctx.compute(node, lambda *i: fn(*operands(i), fmod=_fmod_fast), name=ctx.name(node.op) + KEEP))

    def value(*i):
        a, b = operands(i)
        exact = cast(fn(a, b, bind=_inlined), tir_dtype(node.type.dtype))
        return tirx.if_then_else(_needs_libm(a, b), exact, fast(*i))

    return ctx.compute(node, value)


def _vectorize_innermost(sch, name: str) -> None:
    """Vectorize a kept block's innermost loop (the generic schedule leaves it serial)."""
    loop = sch.get_loops(sch.get_sblock(name))[-1]
    lanes = vector_lanes()
    try:
        if _static(sch.get(loop).extent, above=lanes - 1) and sch.get(loop).extent.value % lanes == 0:
            _, loop = sch.split(loop, [None, lanes])
            sch.vectorize(loop)
    except ScheduleError:
        pass  # stays serial


_UNARY = {
    "neg": lambda a: -a,
    "abs": tirx.abs,
    "exp": fastmath.exp,
    "log": fastmath.log,
    "sqrt": tirx.sqrt,
    "rsqrt": lambda a: const(1.0, a) / tirx.sqrt(a),  # vectorizes (tirx.rsqrt is a scalar call)
    "reciprocal": lambda a: const(1.0, a) / a,
    "sin": fastmath.sin,
    "cos": fastmath.cos,
    "tanh": fastmath.tanh,
    "erf": fastmath.erf,
    "sigmoid": fastmath.sigmoid,
    "relu": lambda a: tirx.Select(a < const(0, a), const(0, a), a),  # NaN stays (one maxps)
    "silu": fastmath.silu,
    "copy": lambda a: a,
    "sign": lambda a: tirx.Select(a > const(0, a), const(1, a),
                                  tirx.Select(a < const(0, a), const(-1, a), const(0, a))),
    "log1p": fastmath.log1p,
    "tan": fastmath.tan,
    "atan": fastmath.atan,
    "expm1": lambda a: _expm1(a),
}


def _expm1(x):
    """e^x - 1: for fp32 Taylor's series to x^9 below |x| = 0.35 (error < 1e-11 |x|), else
    the vectorized exp minus 1 (then |e^x - 1| > 0.29: no cancellation); libm for fp64."""
    if dtype_of(x) != "float32":
        return tirx.call_pure_extern(dtype_of(x), "expm1", x)

    def value(x):
        series = const(1.0 / math.factorial(9), x)
        for n in range(8, 0, -1):
            series = series * x + const(1.0 / math.factorial(n), x)
        return tirx.Select(tirx.abs(x) < const(0.35, x), series * x, fastmath.exp(x) - const(1.0, x))

    return fastmath.let(x, value, "x")


_ROUNDING = {"floor": tirx.floor, "ceil": tirx.ceil, "round": fastmath.round_even, "trunc": tirx.trunc}
# fastmath's fp32 forms and libm's: fp16 / bf16 go through fp32 (as torch's cpu kernels)
_IN_F32 = ("log", "sin", "cos", "tanh", "log1p", "tan", "atan", "expm1")


@lowers(*_UNARY, *_ROUNDING)
def _unary(ctx: Lowering, node, args):
    dtype = tir_dtype(node.type.dtype)
    fn = _UNARY.get(node.op) or (_ROUNDING[node.op] if dtype.startswith(("float", "bfloat")) else (lambda a: a))
    work = "float32" if node.op in _IN_F32 and dtype in _NARROW else dtype
    if node.op == "sign" and dtype == "bool":
        fn = _UNARY["copy"]
    if node.op in _TRIG and work == "float32":
        return _trig(ctx, node, lambda *i: cast(args[0](*i), work))
    return ctx.compute(node, lambda *i: fn(cast(args[0](*i), work)))


_TRIG = ("sin", "cos", "tan")


def _trig(ctx: Lowering, node, read):
    """sin / cos / tan of fp32: fastmath's reduction is exact below TRIG_MAX, libm's beyond,
    only in rows (the last dim) that hold such an |x|: a flag per row, reduced in a vectorized
    pass over the row, so that rows without one never call libm (see fastmath._trig)."""
    fn, shape = _UNARY[node.op], ctx.shape(node.type)
    if not shape:
        return ctx.compute(node, lambda: fn(read()))
    k = te.reduce_axis((0, shape[-1]), name="k")
    limit = tirx.const(fastmath.TRIG_MAX, "float32")
    beyond = te.compute(shape[:-1], lambda *i: te.max((tirx.abs(read(*i, k)) > limit).astype("int8"), axis=k),
                        name=ctx.name(f"{node.op}_beyond"))
    return ctx.compute(node, lambda *i: fn(read(*i), beyond(*i[:-1]) != tirx.const(0, "int8")))


@lowers("isnan", "isinf")
def _float_class(ctx: Lowering, node, args):
    """isnan / isinf: False for integers; for floats, read as they are."""
    test = _isnan if node.op == "isnan" else tirx.isinf
    if not node.inputs[0].type.is_float:
        return ctx.compute(node, lambda *i: tirx.const(False, "bool"))
    return ctx.compute(node, lambda *i: test(args[0](*i)))


@lowers("gelu")
def _gelu(ctx: Lowering, node, args):
    fn = fastmath.gelu_tanh if node.attrs.get("approximate", "none") == "tanh" else fastmath.gelu
    return ctx.compute(node, lambda *i: fn(cast(args[0](*i), tir_dtype(node.type.dtype))))


@lowers("logical_not")
def _logical_not(ctx: Lowering, node, args):
    return ctx.compute(node, lambda *i: tirx.Not(cast(args[0](*i), "bool")))


@lowers("cast")
def _cast(ctx: Lowering, node, args):
    return ctx.compute(node, lambda *i: args[0](*i))  # ctx.compute casts to the node's dtype


@lowers("where")
def _where(ctx: Lowering, node, args):
    dtype = tir_dtype(node.type.dtype)
    types = [v.type for v in node.inputs]

    def value(*i):
        cond, a, b = (broadcast_read(t, ty, i) for t, ty in zip(args, types))
        return tirx.Select(cast(cond, "bool"), cast(a, dtype), cast(b, dtype))

    return ctx.compute(node, value)


@lowers("masked_fill")
def _masked_fill(ctx: Lowering, node, args):
    dtype = tir_dtype(node.type.dtype)
    fill = scalar_const(node.attrs["value"], dtype, ctx.dims)
    mask_type = node.inputs[1].type
    return ctx.compute(node, lambda *i: tirx.Select(cast(broadcast_read(args[1], mask_type, i), "bool"), fill, args[0](*i)))


# ----------------------------------------------------------------------------- reductions
def _reduced_dims(node) -> list:
    """The reduced dims, sorted; `dims=()` (or absent) means all of them, as in torch."""
    rank = node.inputs[0].type.rank
    dims = node.attrs.get("dims", ())
    return sorted({d % rank for d in dims}) or list(range(rank))


def _full_index(rank: int, dims: list, out_index: tuple, axes: list, keepdim: bool) -> list:
    """The input index of a reduction: reduce axes at `dims`, output indices elsewhere."""
    out, red, index = iter(out_index), iter(axes), []
    for d in range(rank):
        if d in dims:
            index.append(next(red))
            if keepdim:
                next(out)
        else:
            index.append(next(out))
    return index


def accumulator(dtype: str) -> str:
    """The dtype a sum of `dtype` values runs in: fp32 for fp16 / bf16, as torch's cpu."""
    return "float32" if dtype in _NARROW else dtype


def _reduce_over(ctx: Lowering, node, dims: list, read, reducer, dtype: str, name: str,
                 by_rows: bool = False) -> te.Tensor:
    """reducer over `dims` of the node's input, `read(index)` giving each element in
    `dtype`; shaped as the node's output (keepdim as its attrs say). `by_rows`: an outer
    dim's reduction gets a unit reduce axis innermost, which keeps the generic schedule's
    lane split (a gather of a column per lane) off it, so `_read_rows` applies. A
    reduction to one value takes two stages (`_reduce_all`)."""
    x_type, keepdim = node.inputs[0].type, node.attrs.get("keepdim", False)
    if all(isinstance(d, int) and d == 1 for d in node.type.shape):
        return _reduce_all(ctx, node, dims, read, reducer, dtype, name)
    axes = [te.reduce_axis((0, ctx.dims(x_type.shape[d])), name=f"r{d}") for d in dims]
    over = list(axes)
    if by_rows and len(dims) == 1 and dims[0] != x_type.rank - 1:
        over.append(te.reduce_axis((0, 1), name="unit"))

    def value(*i):
        return reducer(cast(read(_full_index(x_type.rank, dims, i, axes, keepdim)), dtype), axis=over)

    total = te.compute(ctx.shape(node.type), value, name=name)
    if len(dims) == 1 and dims[0] != x_type.rank - 1:
        _read_rows(ctx, name)
    return total


_CHUNKS = 16  # a reduction to one value first reduces about this many chunks (a few per thread)


def _chunking(extent) -> tuple:
    """(chunks, extent of a chunk, whether the last chunk is short) for a dim of `extent`."""
    if not isinstance(extent, int):
        return _CHUNKS, tirx.floordiv(extent + _CHUNKS - 1, _CHUNKS), True
    if extent <= _CHUNKS:
        return extent, 1, False
    exact = max(d for d in range(1, _CHUNKS + 1) if extent % d == 0)
    if exact >= _CHUNKS // 2:
        return exact, extent // exact, False
    size = -(-extent // _CHUNKS)
    return -(-extent // size), size, True


def _reduce_all(ctx: Lowering, node, dims: list, read, reducer, dtype: str, name: str) -> te.Tensor:
    """A reduction to one value in two stages: partial results of chunks of one dim (the
    largest; parallel over chunks), each a vector of `width` partials along the last dim
    when it is a static multiple of the vector width (several vector accumulators, the
    input read in order), then the reduction of the partials (a few hundred values).
    Dims that are not reduced have size 1. The chunked dim may be the last dim's quotient
    by `width`; when its chunks are uneven, the short chunk's missing elements are the
    reducer's identity (te's `where` does not survive create_prim_func), read only inside."""
    x_type = node.inputs[0].type
    extents = [x_type.shape[d] for d in dims]
    lanes, last = vector_lanes(), extents[-1]
    width = next((w for w in (4 * lanes, 2 * lanes, lanes) if isinstance(last, int) and last % w == 0), 1)
    outer = extents[:-1] + [last // width if width > 1 else last]  # the reduced loops outside the lanes
    # the chunked one: the largest, a symbolic one first (a sequence length)
    k = max(range(len(outer)), key=lambda j: (True, 0) if not isinstance(outer[j], int) else (False, outer[j]))
    extent_k = ctx.dims(outer[k])
    chunks, size, short = _chunking(outer[k] if isinstance(outer[k], int) else extent_k)
    axes = [te.reduce_axis((0, size if j == k else ctx.dims(e)), name=f"r{j}") for j, e in enumerate(outer)]
    unit = te.reduce_axis((0, 1), name="unit")  # keeps the generic schedule's lane split off

    def partial(p, lane):
        at = list(axes)
        at[k] = p * size + axes[k]
        inside = at[k] < extent_k
        if width > 1:
            at[-1] = at[-1] * width + lane
        index = [0] * x_type.rank
        for d, j in zip(dims, at):
            index[d] = j
        element = cast(read(index), dtype)
        if short:
            identity = reducer(element, axis=[*axes, unit]).combiner.identity_element[0]
            element = tirx.if_then_else(inside, element, identity)  # (reads nothing past the end)
        return reducer(element, axis=[*axes, unit])

    chunk_name = f"{name}_chunks"
    parts = te.compute((chunks, width), partial, name=chunk_name)
    q, lane, unit2 = (te.reduce_axis((0, chunks), name="q"), te.reduce_axis((0, width), name="lane"),
                      te.reduce_axis((0, 1), name="unit"))
    total = te.compute(ctx.shape(node.type), lambda *i: reducer(parts[q, lane], axis=[q, lane, unit2]), name=name)
    ctx.refinements.append(functools.partial(_vectorize_chunks, name=chunk_name, width=width))
    return total


def _vectorize_chunks(sch, name: str, width: int) -> None:
    """`_reduce_all`'s first stage: per chunk, the reduced loops outside the lanes, which
    are vectorized (several vectors: unrolled, independent accumulators)."""
    block = sch.get_sblock(name)
    own = sch.get_loops(block)[-len(sch.get(block).iter_vars):]
    lane, reduced = own[1], own[2:]
    lanes = vector_lanes()
    try:
        if width > 1:
            sch.reorder(*reduced, lane)
            vectors = None
            if width > lanes:
                vectors, lane = sch.split(lane, [None, lanes])
            sch.vectorize(lane)
            if vectors is not None:
                sch.unroll(vectors)
        init = sch.decompose_reduction(block, reduced[0])
        if width > 1:
            sch.vectorize(sch.get_loops(init)[-1])
    except ScheduleError:
        pass  # each step keeps the nest correct: what applied stays


def _off_the_output(total: te.Tensor, dims: list, dtype: str, name: str) -> te.Tensor:
    """A copy after a reduction of one dim: the generic schedule vectorizes (lane by lane)
    and places per row only reductions that are not the output. (Not with several dims:
    TVM's rfactor fails on such blocks.)"""
    if len(dims) != 1 or (len(total.shape) == 1 and not isinstance(total.shape[0], tirx.IntImm)):
        return total  # (nor for a single symbolic dim: the generic schedule then fails in TVM)
    return te.compute(total.shape, lambda *i: cast(total(*i), dtype), name=name)


def _count(ctx: Lowering, node, dims: list, dtype: str):
    """How many elements each output of a reduction over `dims` reduces, in `dtype`."""
    shape = node.inputs[0].type.shape
    return cast(ctx.dims(math.prod((shape[d] for d in dims), start=sympy.Integer(1))), dtype)


_REDUCERS = {"sum": te.sum, "mean": te.sum, "amax": te.max, "amin": te.min}


_ROW_VECTORS = (4, 2)  # vectors of outputs `_read_rows` accumulates at once (the most that divide)


def _read_rows(ctx: Lowering, name: str) -> None:
    """A reduction over an outer dim (the last one kept) reads one strided column per
    output in the generic schedule. This refinement takes a vector of outputs at a time
    instead (the loop just outside the reduced one, split by the vector width), with the
    reduced loop moved outside it: the input is read by rows, into vector accumulators
    (up to 4 vectors of adjacent outputs, unrolled: independent chains of adds)."""
    def refine(sch):
        block = sch.get_sblock(name)
        loops, reduced = sch.get_loops(block), sum(iv.iter_type == _REDUCE for iv in sch.get(block).iter_vars)
        if len(loops) <= reduced or not _static(sch.get(loops[-reduced - 1]).extent, above=1):
            return
        spatial, inner_loops = loops[-reduced - 1], loops[-reduced:]
        lanes = vector_lanes()
        extent = sch.get(spatial).extent
        vectors = next((v for v in _ROW_VECTORS if _static(extent) and extent.value % (v * lanes) == 0), 1)
        try:
            if _static(extent, above=lanes):
                was_parallel = sch.get(spatial).kind == tirx.ForKind.PARALLEL
                outer, *split = sch.split(spatial, [None, vectors, lanes] if vectors > 1 else [None, lanes])
                if was_parallel:
                    sch.parallel(outer)
                *vectors_loop, spatial = split
            else:
                vectors_loop = []
            sch.reorder(*inner_loops, *vectors_loop, spatial)
            sch.vectorize(spatial)  # before the init is split off: the update alone is no reduction block
            for loop in vectors_loop:  # independent vector accumulators
                sch.unroll(loop)
            init = sch.decompose_reduction(block, inner_loops[0])
            sch.vectorize(sch.get_loops(init)[-1])
        except ScheduleError:
            pass  # each step keeps the nest correct: what applied stays

    ctx.refinements.append(refine)


def _static(extent, above: int = 0) -> bool:
    return isinstance(extent, tirx.IntImm) and extent.value > above


def _order_key(x, nan_first: bool):
    """A float as a signed integer of its width that orders as the float does (-0 just
    below +0; negative floats have their magnitude bits flipped), NaN above all (below
    all with `nan_first`): te.max / te.min of keys keep a NaN (as torch.amax / amin), start
    from below -inf (te's float identity is the lowest finite value) and still vectorize
    and rfactor (a NaN-keeping float reducer is none of TVM's)."""
    bits = tirx.reinterpret(dtype_of(x).replace("float", "int"), x)
    width = int(dtype_of(bits)[3:])
    magnitude, top = const((1 << (width - 1)) - 1, bits), tirx.max_value(dtype_of(bits))
    key = tirx.bitwise_xor(bits, tirx.bitwise_and(tirx.shift_right(bits, const(width - 1, bits)), magnitude))
    nan = tirx.bitwise_and(bits, magnitude) > tirx.reinterpret(dtype_of(bits), const(math.inf, x))
    return tirx.Select(nan, tirx.min_value(dtype_of(bits)) if nan_first else top, key)


def _isnan(x):
    """isnan by the bits (|x| above inf's), which vectorizes (TVM scalarizes a loop with isnan:
    `ne` and `isnan` ran at 0.4-0.7x torch with it). bf16 in fp32 (the cast keeps a NaN)."""
    if dtype_of(x) == "bfloat16":
        x = cast(x, "float32")
    bits = tirx.reinterpret(dtype_of(x).replace("float", "int"), x)
    magnitude = const((1 << (int(dtype_of(bits)[3:]) - 1)) - 1, bits)
    return tirx.bitwise_and(bits, magnitude) > tirx.reinterpret(dtype_of(bits), const(math.inf, x))


def _from_order_key(key, dtype: str):
    """The float of an `_order_key` (flipping is its own inverse; the NaN keys are NaNs)."""
    magnitude = const((1 << (int(dtype[5:]) - 1)) - 1, key)
    return tirx.reinterpret(dtype, tirx.Select(key < const(0, key), tirx.bitwise_xor(key, magnitude), key))


@lowers("amax", "amin")
def _extremum(ctx: Lowering, node, args):
    """amax / amin; of floats by their `_order_key`s (fp16 / bf16 in fp32)."""
    dtype, dims = tir_dtype(node.type.dtype), _reduced_dims(node)
    reducer, name = _REDUCERS[node.op], ctx.name(node.op)
    if not node.type.is_float:
        return _off_the_output(_reduce_over(ctx, node, dims, lambda i: args[0](*i), reducer, dtype, name), dims,
                               dtype, f"{name}_{node.op}")
    work = accumulator(dtype)
    keys = work.replace("float", "int")

    def key(index):
        return _order_key(cast(args[0](*index), work), node.op == "amin")

    total = _reduce_over(ctx, node, dims, key, reducer, keys, name, by_rows=True)
    return te.compute(total.shape, lambda *i: cast(_from_order_key(total(*i), work), dtype), name=f"{name}_{node.op}")


@lowers("sum", "mean")
def _reduce(ctx: Lowering, node, args):
    dtype, dims = tir_dtype(node.type.dtype), _reduced_dims(node)
    work = accumulator(dtype) if node.op in ("sum", "mean") else dtype
    name = ctx.name(node.op)
    total = _reduce_over(ctx, node, dims, lambda index: args[0](*index), _REDUCERS[node.op], work, name,
                         by_rows=True)
    if node.op != "mean" and work == dtype:
        return _off_the_output(total, dims, dtype, f"{name}_{node.op}")
    count = _count(ctx, node, dims, work) if node.op == "mean" else tirx.const(1, work)
    return te.compute(total.shape, lambda *i: cast(total(*i) / count if node.op == "mean" else total(*i), dtype),
                      name=f"{name}_{node.op}")


@lowers("var")
def _var(ctx: Lowering, node, args):
    """Two passes, as robust as Welford here: the mean, then the sum of squared
    deviations over (count - correction), in fp32 (fp64 for fp64)."""
    dtype, dims = tir_dtype(node.type.dtype), _reduced_dims(node)
    work, name = accumulator(dtype), ctx.name("var")
    count = _count(ctx, node, dims, work)
    kept = node.attrs.get("keepdim", False)
    total = _reduce_over(ctx, node, dims, lambda index: args[0](*index), te.sum, work, f"{name}_sum")

    def deviation(index):  # x - mean, the mean read at the output index of `index`
        out = [0 if d in dims else j for d, j in enumerate(index) if kept or d not in dims]
        return cast(args[0](*index), work) - total(*out) / count

    squares = _reduce_over(ctx, node, dims, lambda index: fastmath.let(deviation(index), lambda d: d * d, "d"),
                           te.sum, work, f"{name}_m2")
    correction = node.attrs.get("correction", 1)
    divisor = tirx.max(count - scalar_const(correction, work, ctx.dims), const(0.0, count))
    return te.compute(squares.shape, lambda *i: cast(true_divide(squares(*i), divisor), dtype), name=name)


@lowers("argmax", "argmin")
def _argmax(ctx: Lowering, node, args):
    """The first index of the largest (smallest) value, NaN above all (as torch), in
    plain reductions that vectorize (a reducer of (index, value) pairs does not): the
    best value (of floats by `_order_key`s, NaN the best, so a row of -inf has its
    argmax), then the first index holding that value (NaN when it is the best)."""
    x_type, keepdim = node.inputs[0].type, node.attrs.get("keepdim", False)
    dim, dtype = node.attrs["dim"] % x_type.rank, tir_dtype(x_type.dtype)
    name, floats = ctx.name(node.op), node.inputs[0].type.is_float
    best = te.max if node.op == "argmax" else te.min

    def x(index):
        return as_expr(args[0](*index))

    def reduce(body, reducer, dtype: str, suffix: str) -> te.Tensor:
        return _reduce_over(ctx, node, [dim], lambda index: body(index), reducer, dtype, f"{name}_{suffix}",
                            by_rows=True)

    def at_output(tensor, index):  # `tensor` (output-shaped) at the output index of an input index
        return tensor(*[0 if d == dim else j for d, j in enumerate(index) if keepdim or d != dim])

    if floats:  # the best by `_order_key`s, NaN above all: the best is NaN's key when the row holds one
        work = accumulator(dtype)
        keys = work.replace("float", "int")
        nan_first = node.op == "argmin"
        best_key = reduce(lambda i: _order_key(cast(x(i), work), nan_first), best, keys, "value")

        def hit(index):  # (as floats: -0 == +0, the first counts; NaN only where the best is NaN's key)
            value = cast(_from_order_key(at_output(best_key, index), work), dtype)
            hit = tirx.any(x(index) == value, tirx.all(_isnan(value), _isnan(x(index))))
            return tirx.Select(hit, index[dim].astype("int64"), tirx.max_value("int64"))
    else:
        value = reduce(x, best, dtype, "value")

        def hit(index):
            return tirx.Select(x(index) == at_output(value, index), index[dim].astype("int64"),
                               tirx.max_value("int64"))

    return _off_the_output(reduce(hit, te.min, "int64", "index"), [dim], "int64", name)


@lowers("softmax", "log_softmax")
def _softmax(ctx: Lowering, node, args):
    """In fp32 for fp16 / bf16 (as torch's cpu kernel; fp16 vectors also build slowly): the
    row max, the sum of exp(x - max), then x - max - log(sum), or for softmax exp(x - max)
    (kept per row, so that exp runs once per element) times 1 / sum (as torch's cpu kernel).
    Over the last dim, the max and the sum take `_row_reduce`'s vector lanes. Over an outer
    dim (a later dim not 1: the reduced values lie in columns), they read the input by
    rows into vectors of adjacent results (`_read_rows`), and log(sum) or 1 / sum is kept
    per result (kept): the output's vectors run along the results, so inline
    it would be a log or a division per element. The max (te's, tirx.max) drops a NaN,
    but exp(NaN - max) is NaN, so the row's sum, so the whole row (as torch); a row of
    -inf has max -FLT_MAX (te's identity), sum 0, so NaN (as torch)."""
    x_type, out_dtype = node.inputs[0].type, tir_dtype(node.type.dtype)
    dtype = accumulator(out_dtype)
    dim = node.attrs["dim"] % x_type.rank
    shape = ctx.shape(x_type)
    rows = shape[:dim] + shape[dim + 1:]
    name = ctx.name(node.op)

    def at(i, j):  # x at row index i (without dim) and position j along dim
        return cast(args[0](*i[:dim], j, *i[dim:]), dtype)

    lanes = dim == x_type.rank - 1 and any(d != 1 for d in x_type.shape[:dim])  # rows apart from the row loop
    columns = any(d != 1 for d in x_type.shape[dim + 1:])

    def reduce(read, reducer, suffix):
        if lanes:
            return _row_reduce(ctx, rows, shape[dim], read, reducer, f"{name}_{suffix}")
        k = te.reduce_axis((0, shape[dim]), name="k")
        over = [k, te.reduce_axis((0, 1), name="unit")] if columns else [k]  # `_reduce_over`'s by_rows
        if columns:
            _read_rows(ctx, f"{name}_{suffix}")
        return te.compute(rows, lambda *i: reducer(read(i, k), axis=over), name=f"{name}_{suffix}")

    def per_result(fn, suffix):  # fn of a result index: kept over an outer dim, else inline (once per row)
        return _kept(ctx, te.compute(rows, fn, name=f"{name}_{suffix}{KEEP}")) if columns else fn

    peak = reduce(at, te.max, "max")
    if node.op == "log_softmax":
        total = reduce(lambda i, j: fastmath.exp(at(i, j) - peak(*i)), te.sum, "sum")
        log = fastmath.log if columns else tirx.log  # kept, a vector loop: libm's log is one call per lane
        logs = per_result(lambda *i: log(total(*i)), "log")
        return te.compute(shape, lambda *i: cast(at(_row(i, dim), i[dim]) - peak(*_row(i, dim))
                                                 - logs(*_row(i, dim)), out_dtype), name=name)
    exps = _kept(ctx, te.compute(shape, lambda *i: fastmath.exp(at(_row(i, dim), i[dim]) - peak(*_row(i, dim))),
                                 name=f"{name}_exp{KEEP}"))
    total = reduce(lambda i, j: exps(*i[:dim], j, *i[dim:]), te.sum, "sum")
    one = tirx.const(1.0, dtype)
    scale = per_result(lambda *i: one / total(*i), "scale")
    return te.compute(shape, lambda *i: cast(exps(*i) * scale(*_row(i, dim)), out_dtype), name=name)


def _row(index, dim: int) -> tuple:
    return tuple(index[:dim]) + tuple(index[dim + 1:])


def _row_reduce(ctx: Lowering, rows: list, extent, read, reducer, name: str) -> te.Tensor:
    """reducer over the last dim (`read(row index, j)`, the reducer's dtype): one vector
    of partial results per row (`{name}_lanes`: lane l reduces elements l, l + lanes, ...,
    read in order; a unit reduce axis keeps the generic schedule's own lane split off),
    the elements past the last whole vector (`{name}_tail`: a short serial loop, for a
    static extent that is no multiple of the vector width or a symbolic one), then a tree
    of the lanes (kept per row): log2(lanes) steps, not a serial chain of lanes."""
    lanes = vector_lanes()
    static = isinstance(extent, int) or isinstance(extent, tirx.IntImm)
    size = int(extent) if static else None
    vectors = size // lanes if static else tirx.floordiv(extent, lanes)
    has_tail = not static or size % lanes
    parts = tail = None
    if not static or vectors > 0:
        k, unit = te.reduce_axis((0, vectors), name="k"), te.reduce_axis((0, 1), name="unit")
        parts = te.compute(list(rows) + [lanes], lambda *i: reducer(read(i[:-1], k * lanes + i[-1]), axis=[k, unit]),
                           name=f"{name}_lanes")
        ctx.refinements.append(functools.partial(_vectorize_lanes_of_rows, name=parts.op.name))
    if has_tail:
        r = te.reduce_axis((0, extent - vectors * lanes), name="r")
        tail = te.compute(rows, lambda *i: reducer(read(i, vectors * lanes + r), axis=r), name=f"{name}_tail")
        ctx.refinements.append(functools.partial(_init_apart, name=tail.op.name))
    if parts is None:
        return tail
    combine = _COMBINE[reducer]

    def tree(*i):
        values = [parts(*i, lane) for lane in range(lanes)]
        while len(values) > 1:
            half = len(values) // 2
            values = [combine(values[j], values[j + half]) for j in range(half)]
        return combine(values[0], tail(*i)) if tail is not None else values[0]

    return te.compute(rows, tree, name=f"{name}{KEEP}")


def _init_apart(sch, name: str) -> None:
    """A reduction's init as a block of its own, before its loop: the init inside runs
    at the loop's first step, so never where the loop is empty (a tail of 0 elements)."""
    block = sch.get_sblock(name)
    sch.decompose_reduction(block, sch.get_loops(block)[-1])


_COMBINE = {te.max: tirx.max, te.min: tirx.min, te.sum: lambda a, b: a + b}  # as te's reducers combine


def _vectorize_lanes_of_rows(sch, name: str) -> None:
    """`_row_reduce`'s lanes block: its reduced loops outside the lane loop, which is
    vectorized, the init split off (vectorized too)."""
    block = sch.get_sblock(name)
    lane, k, unit = sch.get_loops(block)[-3:]
    try:
        sch.reorder(k, unit, lane)
        sch.vectorize(lane)
        init = sch.decompose_reduction(block, k)
        sch.vectorize(sch.get_loops(init)[-1])
    except ScheduleError:
        pass  # each step keeps the nest correct: what applied stays


# ----------------------------------------------------------------------------- gathers
@lowers("embedding")
def _embedding(ctx: Lowering, node, args):
    table, ids = args
    index = ctx.dims.index_dtype
    return ctx.compute(node, lambda *i: table(ids(*i[:-1]).astype(index), i[-1]))


@lowers("qembedding")
def _qembedding(ctx: Lowering, node, args):
    """embedding over a quantized table (ir/quant_ops.py): each output element reads its
    row's code (qgemm.py's `weight_code`: q, a nibble or an nf4 level) and its group's
    scale (and int4's offset), in f32. Only the gathered rows are read."""
    ids, q, scale, *offset = args
    fmt, group_size = node.attrs["format"], node.attrs["group_size"]
    index = ctx.dims.index_dtype

    def value(*i):
        row, column = ids(*i[:-1]).astype(index), i[-1]
        group = tirx.floordiv(column, group_size)
        w = weight_code(q, fmt, row, column) * cast(scale[row, group], "float32")
        return w + cast(offset[0][row, group], "float32") if offset else w

    return ctx.compute(node, value)


@lowers("index_select")
def _index_select(ctx: Lowering, node, args):
    x, index = args
    dim = node.attrs["dim"] % node.type.rank

    def value(*i):
        return x(*i[:dim], index(i[dim]).astype(ctx.dims.index_dtype), *i[dim + 1:])

    return ctx.compute(node, value)


@lowers("rope")
def _rope(ctx: Lowering, node, args):
    """x * cos + rotate_half(x) * sin, rotate_half(x) = [-x[half:], x[:half]]."""
    x, cos, sin = args
    D = node.inputs[0].type.shape[-1]
    size = ctx.dims(D)
    half = tirx.floordiv(size, 2) if not isinstance(D, int) else D // 2

    def value(t, h, d):
        # rotate_half(x)[d] = -x[d + half] below half, x[d - half] above: one in-bounds
        # read at (d + half) mod D (a Select of two reads would read past the row)
        rotated = x(t, h, tirx.floormod(d + half, size))
        sign = tirx.Select(d < half, const(-1.0, rotated), const(1.0, rotated))
        return x(t, h, d) * cos(t, d) + sign * rotated * sin(t, d)

    return ctx.compute(node, value)


@lowers("gather")
def _gather(ctx: Lowering, node, args):
    """out[i] = x[i with i[dim] = index[i]] (torch.gather; the index may be smaller than x)."""
    x, index = args
    dim = node.attrs["dim"] % node.type.rank
    return ctx.compute(node, lambda *i: x(*i[:dim], index(*i).astype(ctx.dims.index_dtype), *i[dim + 1:]))


@lowers("tril", "triu")
def _triangle(ctx: Lowering, node, args):
    """Keep x[..., i, j] where j - i <= diagonal (tril) or >= diagonal (triu), else 0."""
    diagonal = node.attrs.get("diagonal", 0)

    def value(*i):
        offset = i[-1] - i[-2]
        keep = offset <= diagonal if node.op == "tril" else offset >= diagonal
        x = args[0](*i)
        return tirx.Select(keep, x, const(0, x))

    return ctx.compute(node, value)


@lowers("cumsum")
def _cumsum(ctx: Lowering, node, args):
    """A sequential scan along `dim` (TE has no recurrence, so a TIR loop nest in an
    extern block): parallel over the dims before `dim`, the running sums in torch's
    accumulator dtype (fp64 for fp32, as its cpu kernel), in the extern's second output.
    Along the last dim, a row of `_SCAN_BLOCKS` or more elements (or of a symbolic
    length) is scanned in blocks (`_blocked_scan`: independent chains of adds, not one
    serial chain); along another dim, vectorized over the dims after it. A copy follows,
    so that the scan is never the function's only block (which would become its root)."""
    dim, dtype = node.attrs["dim"] % node.type.rank, tir_dtype(node.type.dtype)
    work = {"float32": "float64", "float16": "float32", "bfloat16": "float32"}.get(dtype, dtype)
    shape = ctx.shape(node.type)
    length, inner = shape[dim], _product(shape[dim + 1:])
    blocked = _static_value(inner) == 1 and (_static_value(length) or _SCAN_BLOCKS) >= _SCAN_BLOCKS
    sums_shape = (_product(shape[:dim]), _SCAN_BLOCKS if blocked else inner)
    scan = functools.partial(_blocked_scan if blocked else _scan, dim=dim)
    name = ctx.name("cumsum")
    out, _ = te.extern([shape, sums_shape], [args[0]], lambda ins, outs: scan(ins[0], *outs),
                       name=f"{name}_scan", dtype=[dtype, work], attrs={_DETECT_ACCESS: tirx.IntImm("int32", 3)})
    return out


_DETECT_ACCESS = "tirx.script_parsing_detect_access"  # 3: infer the block's reads and writes
_SCAN_BLOCKS = 8  # blocks of a row `_blocked_scan` scans at once (chains of adds in flight)


def _static_value(extent):
    """An extent's int value, None when symbolic."""
    if isinstance(extent, int):
        return extent
    return extent.value if isinstance(extent, tirx.IntImm) else None


def _scan(x, out, sums, dim: int):
    """for o (parallel): sums[o] = 0; for t along dim: for j: sums[o, j] += x; out = sums[o, j]."""
    shape = list(out.shape)
    outer, length, inner = sums.shape[0], shape[dim], sums.shape[1]
    o, t, j, j0 = (tirx.Var(n, "int32") for n in ("o", "t", "j", "j0"))
    index = [*_unravel(o, shape[:dim]), t, *_unravel(j, shape[dim + 1:])]
    add = tirx.BufferStore(sums, tirx.BufferLoad(sums, [o, j]) + tirx.BufferLoad(x, index).astype(sums.dtype), [o, j])
    write = tirx.BufferStore(out, tirx.BufferLoad(sums, [o, j]).astype(out.dtype), index)
    vector = isinstance(inner, tirx.IntImm) and inner.value > 1 and inner.value % 4 == 0
    kind = tirx.ForKind.VECTORIZED if vector else tirx.ForKind.SERIAL
    along = tirx.For(j, 0, inner, kind, tirx.SeqStmt([add, write]))
    scan = tirx.For(t, 0, length, tirx.ForKind.SERIAL, along)
    zero = tirx.For(j0, 0, inner, tirx.ForKind.SERIAL, tirx.BufferStore(sums, tirx.const(0, sums.dtype), [o, j0]))
    return tirx.For(o, 0, outer, _rows_kind(outer), tirx.SeqStmt([zero, scan]))


def _rows_kind(outer):
    return tirx.ForKind.SERIAL if isinstance(outer, tirx.IntImm) and outer.value < 2 else tirx.ForKind.PARALLEL


def _blocked_scan(x, out, sums, dim: int):
    """A scan of each row (the last dim, trailing dims of size 1 aside) in B blocks of
    n // B elements, the rest a tail: the sums of blocks 0 .. B-2 (B chains of adds, one
    element of each block per step), each block's offset (the sum of those before it),
    then each block scanned from its offset (B chains again), the tail from the last
    block's end. sums[o, b] holds block b's running sum. The order of the adds differs from
    a serial scan's only by the accumulator's rounding (none for integers)."""
    shape = list(out.shape)
    blocks, outer, length = sums.shape[1].value, sums.shape[0], shape[dim]
    size = tirx.floordiv(length, blocks)
    o = tirx.Var("o", "int32")
    row, ones = _unravel(o, shape[:dim]), [0] * (len(shape) - dim - 1)

    def element(p):
        return tirx.BufferLoad(x, [*row, p, *ones]).astype(sums.dtype)

    def acc(k):
        return tirx.BufferLoad(sums, [o, k])

    def step(k, p, write: bool):  # sums[o, k] += x at p (and out at p = sums[o, k])
        add = tirx.BufferStore(sums, acc(k) + element(p), [o, k])
        store = tirx.BufferStore(out, acc(k).astype(out.dtype), [*row, p, *ones])
        return tirx.SeqStmt([add, store]) if write else add

    def loop(extent, body, kind=tirx.ForKind.UNROLLED, start=0):  # body(its var)
        var = tirx.Var("i", "int32")
        return tirx.For(var, start, extent, kind, body(var))

    serial = tirx.ForKind.SERIAL
    zero = loop(blocks, lambda b: tirx.BufferStore(sums, tirx.const(0, sums.dtype), [o, b]))
    block_sums = loop(size, lambda t: loop(blocks - 1, lambda b: step(b + 1, b * size + t, False)), serial)
    offsets = loop(blocks - 1, lambda b: tirx.BufferStore(sums, acc(b) + acc(b - 1), [o, b]), start=1)
    scan = loop(size, lambda t: loop(blocks, lambda b: step(b, b * size + t, True)), serial)
    tail = loop(length - blocks * size, lambda t: step(blocks - 1, t, True), serial, start=blocks * size)
    return tirx.For(o, 0, outer, _rows_kind(outer), tirx.SeqStmt([zero, block_sums, offsets, scan, tail]))


def _product(dims):
    return functools.reduce(lambda a, b: a * b, dims, 1)


# ----------------------------------------------------------------------------- views
def _linear(index, shape) -> tirx.PrimExpr:
    flat = 0
    for i, size in zip(index, shape):
        flat = flat * size + i
    return flat


def _unravel(flat, shape) -> list:
    """The index of `flat` (< the shape's size) in `shape`; the outermost needs no modulo."""
    if not shape:
        return []
    index = []
    for size in reversed(shape[1:]):
        index.append(tirx.floormod(flat, size))
        flat = tirx.floordiv(flat, size)
    return [flat] + index[::-1]


@lowers("reshape")
def _reshape(ctx: Lowering, node, args):
    """Leading and trailing dims that a reshape keeps map straight; the rest via a flat index."""
    src, dst = node.inputs[0].type.shape, node.type.shape
    head = 0
    while head < min(len(src), len(dst)) and dims_equal(src[head], dst[head]):
        head += 1
    tail = 0
    while tail < min(len(src), len(dst)) - head and dims_equal(src[-1 - tail], dst[-1 - tail]):
        tail += 1
    src_mid, dst_mid = ctx.dims.shape(src[head:len(src) - tail]), ctx.dims.shape(dst[head:len(dst) - tail])

    def value(*i):
        mid = i[head:len(i) - tail]
        mapped = _unravel(_linear(mid, dst_mid), src_mid) if src_mid else []
        return args[0](*i[:head], *mapped, *i[len(i) - tail:])

    return ctx.compute(node, value)


@lowers("permute")
def _permute(ctx: Lowering, node, args):
    dims = [d % node.type.rank for d in node.attrs["dims"]]

    def value(*i):
        index = [None] * len(dims)
        for out_axis, in_axis in enumerate(dims):
            index[in_axis] = i[out_axis]
        return args[0](*index)

    return ctx.compute(node, value)


@lowers("expand")
def _expand(ctx: Lowering, node, args):
    return ctx.compute(node, lambda *i: broadcast_read(args[0], node.inputs[0].type, i))


@lowers("slice")
def _slice(ctx: Lowering, node, args):
    x_type = node.inputs[0].type
    dim = node.attrs["dim"] % x_type.rank
    start, step = node.attrs.get("start", 0), node.attrs.get("step", 1)
    if isinstance(start, int) and start < 0:  # the IR types it as if start were positive
        raise UnsupportedKernelError(f"slice with a negative start ({start}): its IR type is not torch's")
    begin = ctx.dims(start)
    return ctx.compute(node, lambda *i: args[0](*i[:dim], begin + i[dim] * step, *i[dim + 1:]))


@lowers("select")
def _select(ctx: Lowering, node, args):
    x_type = node.inputs[0].type
    dim, index = node.attrs["dim"] % x_type.rank, node.attrs["index"]
    if isinstance(index, int) and index < 0:
        index = x_type.shape[dim] + index
    at = ctx.dims(index)
    return ctx.compute(node, lambda *i: args[0](*i[:dim], at, *i[dim:]))


@lowers("concat")
def _concat(ctx: Lowering, node, args):
    dim = node.attrs["dim"] % node.type.rank
    sizes = [ctx.dims(v.type.shape[dim]) for v in node.inputs]

    offsets = [sum(sizes[:p], 0) for p in range(len(sizes))]
    dtype = tir_dtype(node.type.dtype)

    def value(*i):
        # if_then_else evaluates only the branch taken: TVM simplifies each Select branch
        # under its condition (dropping clamps), and both branches of a Select are read
        result = None
        for piece, offset, size in reversed(list(zip(args, offsets, sizes))):
            read = cast(piece(*i[:dim], i[dim] - offset, *i[dim + 1:]), dtype)
            result = read if result is None else tirx.if_then_else(i[dim] < offset + size, read, result)
        return result

    return ctx.compute(node, value)


# ----------------------------------------------------------------------------- generators
@lowers("full")
def _full(ctx: Lowering, node, args):
    value = scalar_const(node.attrs["value"], tir_dtype(node.type.dtype), ctx.dims)
    return ctx.compute(node, lambda *i: value)


@lowers("arange")
def _arange(ctx: Lowering, node, args):
    start, step = node.attrs.get("start", 0), node.attrs.get("step", 1)
    exact = all(isinstance(v, (int, sympy.Expr)) for v in (start, step))
    work = ctx.dims.index_dtype if exact else "float64"

    def value(i):
        return scalar_const(start, work, ctx.dims) + cast(i, work) * scalar_const(step, work, ctx.dims)

    return ctx.compute(node, value)


# ----------------------------------------------------------------------------- the group
def lower(group, dims: Dims):
    """(placeholders in input order, the output tensor, the context) for a group."""
    ctx = Lowering(dims)
    env = {v: placeholder(v.type, v.name, dims) for v in group.inputs}
    for node in group.nodes:
        if node.op not in LOWER:
            raise UnsupportedKernelError(f"no cpu lowering for op {node.op}")
        env[node] = LOWER[node.op](ctx, node, [env[v] for v in node.inputs])
    placeholders = [env[v] for v in group.inputs]
    out = env[group.outputs[0]]
    if any(out.same_as(p) for p in placeholders):  # the group returns an input: copy it
        source = out
        out = te.compute(source.shape, lambda *i: source(*i), name="copy")
    return placeholders, out, ctx
