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

import math
import re

import sympy
import torch
from tvm import te, tirx

from ...errors import UnsupportedKernelError
from ...ir.types import TensorType, dims_equal, dtype_of as ir_dtype_of
from . import fastmath
from .build import Dims, const, dtype_of, tir_dtype

LOWER: dict = {}


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
    return tir_dtype(ir_dtype_of(torch.result_type(a, b)))


# ----------------------------------------------------------------------------- elementwise
def _pow(a, b):
    if isinstance(b, tirx.FloatImm) and b.value == 2.0:
        return a * a
    if isinstance(b, tirx.FloatImm) and b.value == 0.5:
        return tirx.sqrt(a)
    return tirx.power(a, b)


_BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "pow": _pow,
    "maximum": tirx.max,
    "minimum": tirx.min,
    "eq": lambda a, b: a == b,
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "logical_and": lambda a, b: tirx.all(cast(a, "bool"), cast(b, "bool")),
    "logical_or": lambda a, b: tirx.any(cast(a, "bool"), cast(b, "bool")),
}


@lowers(*_BINARY)
def _binary(ctx: Lowering, node, args):
    # true division computes in the (float) result dtype; the others in torch's promoted one
    dtype = tir_dtype(node.type.dtype) if node.op == "div" else promoted_dtype(node)
    a_type = node.inputs[0].type
    if len(args) == 2:
        b_type = node.inputs[1].type
        operands = [lambda i: cast(broadcast_read(args[0], a_type, i), dtype),
                    lambda i: cast(broadcast_read(args[1], b_type, i), dtype)]
    else:
        scalar = scalar_const(node.attrs["scalar"], dtype, ctx.dims)
        operands = [lambda i: cast(broadcast_read(args[0], a_type, i), dtype), lambda i: scalar]
        if node.attrs.get("reverse", False):
            operands.reverse()
    fn = _BINARY[node.op]
    return ctx.compute(node, lambda *i: fn(operands[0](i), operands[1](i)))


_UNARY = {
    "neg": lambda a: -a,
    "abs": tirx.abs,
    "exp": fastmath.exp,
    "log": tirx.log,
    "sqrt": tirx.sqrt,
    "rsqrt": tirx.rsqrt,
    "reciprocal": lambda a: const(1.0, a) / a,
    "sin": tirx.sin,
    "cos": tirx.cos,
    "tanh": tirx.tanh,
    "erf": tirx.erf,
    "sigmoid": fastmath.sigmoid,
    "relu": lambda a: tirx.max(a, const(0, a)),
    "silu": fastmath.silu,
}


@lowers(*_UNARY)
def _unary(ctx: Lowering, node, args):
    dtype, fn = tir_dtype(node.type.dtype), _UNARY[node.op]
    return ctx.compute(node, lambda *i: fn(cast(args[0](*i), dtype)))


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
    rank = node.inputs[0].type.rank
    dims = node.attrs.get("dims", ())
    if not dims:  # torch reduces every dim for dims=[], the IR's type keeps the shape
        raise UnsupportedKernelError(f"{node.op} with dims=[] (the IR type and torch disagree on it)")
    return sorted({d % rank for d in dims})


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


_REDUCERS = {"sum": te.sum, "mean": te.sum, "amax": te.max, "amin": te.min}


@lowers(*_REDUCERS)
def _reduce(ctx: Lowering, node, args):
    x_type, dtype = node.inputs[0].type, tir_dtype(node.type.dtype)
    dims, keepdim = _reduced_dims(node), node.attrs.get("keepdim", False)
    axes = [te.reduce_axis((0, ctx.dims(x_type.shape[d])), name=f"r{d}") for d in dims]
    reducer = _REDUCERS[node.op]
    name = ctx.name(node.op)

    def value(*i):
        return reducer(cast(args[0](*_full_index(x_type.rank, dims, i, axes, keepdim)), dtype), axis=axes)

    total = te.compute(ctx.shape(node.type), value, name=name)
    if node.op != "mean":
        return total
    count = cast(ctx.dims(math.prod((x_type.shape[d] for d in dims), start=sympy.Integer(1))), dtype)
    return te.compute(total.shape, lambda *i: total(*i) / count, name=f"{name}_mean")


@lowers("softmax", "log_softmax")
def _softmax(ctx: Lowering, node, args):
    x_type, dtype = node.inputs[0].type, tir_dtype(node.type.dtype)
    dim = node.attrs["dim"] % x_type.rank
    shape = ctx.shape(x_type)
    rows = shape[:dim] + shape[dim + 1:]
    name = ctx.name(node.op)

    def at(i, j):  # x at row index i (without dim) and position j along dim
        return cast(args[0](*i[:dim], j, *i[dim:]), dtype)

    k = te.reduce_axis((0, shape[dim]), name="k")
    peak = te.compute(rows, lambda *i: te.max(at(i, k), axis=k), name=f"{name}_max")
    k2 = te.reduce_axis((0, shape[dim]), name="k")
    total = te.compute(rows, lambda *i: te.sum(fastmath.exp(at(i, k2) - peak(*i)), axis=k2), name=f"{name}_sum")

    def value(*i):
        row = i[:dim] + i[dim + 1:]
        shifted = at(row, i[dim]) - peak(*row)
        if node.op == "log_softmax":
            return shifted - tirx.log(total(*row))
        return fastmath.exp(shifted) / total(*row)

    return te.compute(shape, value, name=name)


# ----------------------------------------------------------------------------- gathers
@lowers("embedding")
def _embedding(ctx: Lowering, node, args):
    table, ids = args
    index = ctx.dims.index_dtype
    return ctx.compute(node, lambda *i: table(ids(*i[:-1]).astype(index), i[-1]))


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


# ----------------------------------------------------------------------------- views
def _linear(index, shape) -> tirx.PrimExpr:
    flat = 0
    for i, size in zip(index, shape):
        flat = flat * size + i
    return flat


def _unravel(flat, shape) -> list:
    index = []
    for size in reversed(shape):
        index.append(tirx.floormod(flat, size))
        flat = tirx.floordiv(flat, size)
    return index[::-1]


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
