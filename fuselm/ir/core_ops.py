"""The core ops: type inference and plain-torch reference semantics for each.

Conventions: a binary elementwise op takes two tensors, or one tensor and a `scalar`
attribute (`reverse=True` when the scalar is the left operand); shapes broadcast as in
torch. `gemm(x, w, ...)` is torch's linear (w is [N, K], or prepacked as its
`weight_layout` says) plus an epilogue. Fused forms are ordinary ops with attributes, so a
fused graph stays interpretable.
"""
from __future__ import annotations

import math

import sympy
import torch
import torch.nn.functional as F

from . import attention_reference
from .registry import IRTypeError, register
from .types import TensorType, as_dim, dims_equal, dtype_of, floordiv


# ----------------------------------------------------------------------------- helpers
def _is_one(dim) -> bool:
    return isinstance(dim, int) and dim == 1


def broadcast_shapes(*shapes) -> tuple:
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        wide = [d for d in dims if not _is_one(d)]
        if any(not dims_equal(d, wide[0]) for d in wide[1:]):
            raise IRTypeError(f"shapes {[list(map(str, s)) for s in shapes]} do not broadcast")
        out.append(wide[0] if wide else 1)
    return tuple(out)


def _meta(t: TensorType) -> torch.Tensor:
    return torch.empty((1,) * t.rank, dtype=t.torch_dtype, device="meta")


def _norm_dim(dim: int, rank: int) -> int:
    if not -max(rank, 1) <= dim < max(rank, 1):
        raise IRTypeError(f"dim {dim} out of range for rank {rank}")
    return dim % max(rank, 1)


def _same(types, attrs):
    return types[0]


def _prod(dims):
    return as_dim(math.prod(dims, start=sympy.Integer(1)))


# ----------------------------------------------------------------------------- elementwise
def _binary_infer(comparison: bool):
    def infer(types, attrs):
        if len(types) == 2:
            shape = broadcast_shapes(types[0].shape, types[1].shape)
            dtype = torch.result_type(_meta(types[0]), _meta(types[1]))
        else:
            if "scalar" not in attrs:
                raise IRTypeError("a one-input binary op needs a `scalar` attribute")
            shape = types[0].shape
            scalar = 1 if isinstance(attrs["scalar"], sympy.Expr) else attrs["scalar"]  # a size: an int
            dtype = torch.result_type(_meta(types[0]), scalar)
        return TensorType(shape, "bool" if comparison else dtype_of(dtype))

    return infer


def _binary_reference(fn):
    def reference(a, b=None, scalar=None, reverse=False):
        if b is None:  # a 0-dim tensor promotes as the scalar does, and torch takes it first
            b = torch.as_tensor(scalar, device=a.device) if reverse else scalar
        return fn(b, a) if reverse else fn(a, b)

    return reference


_BINARY_OPS = {
    "add": (torch.add, False),
    "sub": (torch.sub, False),
    "mul": (torch.mul, False),
    "pow": (torch.pow, False),
    "maximum": (lambda a, b: torch.maximum(torch.as_tensor(a), torch.as_tensor(b)), False),
    "minimum": (lambda a, b: torch.minimum(torch.as_tensor(a), torch.as_tensor(b)), False),
    "eq": (torch.eq, True),
    "ne": (torch.ne, True),
    "lt": (torch.lt, True),
    "le": (torch.le, True),
    "gt": (torch.gt, True),
    "ge": (torch.ge, True),
    "logical_and": (lambda a, b: torch.logical_and(torch.as_tensor(a), torch.as_tensor(b)), True),
    "logical_or": (lambda a, b: torch.logical_or(torch.as_tensor(a), torch.as_tensor(b)), True),
    "logical_xor": (lambda a, b: torch.logical_xor(torch.as_tensor(a), torch.as_tensor(b)), True),
    "remainder": (torch.remainder, False),  # Python's modulo: the sign of the divisor
    "floor_divide": (torch.floor_divide, False),
}
for _name, (_fn, _cmp) in _BINARY_OPS.items():
    register(_name, _binary_infer(_cmp), _binary_reference(_fn), inputs=(1, 2), pointwise=True)


def _div_infer(types, attrs):
    result = _binary_infer(False)(types, attrs)
    return result if result.is_float or result.is_complex else result.with_dtype("f32")  # true division


register("div", _div_infer, _binary_reference(torch.div), inputs=(1, 2), pointwise=True)

# the binary ops that also take one tensor and a `scalar` attribute
SCALAR_FORM_OPS = frozenset(_BINARY_OPS) | {"div"}

def _float_result(types, attrs):
    """Float functions of integers give f32, as in torch."""
    return types[0] if types[0].is_float or types[0].is_complex else types[0].with_dtype("f32")


_UNARY_OPS = {
    "neg": torch.neg,
    "abs": torch.abs,
    "relu": torch.relu,
    "sign": torch.sign,
    "floor": torch.floor,
    "ceil": torch.ceil,
    "round": torch.round,  # half to even, as torch
    "trunc": torch.trunc,
    "copy": torch.clone,  # a compact copy of a view (what `.contiguous()` makes)
}
_FLOAT_UNARY_OPS = {
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "reciprocal": torch.reciprocal,
    "sin": torch.sin,
    "cos": torch.cos,
    "tanh": torch.tanh,
    "erf": torch.erf,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "log1p": torch.log1p,
    "expm1": torch.expm1,
    "tan": torch.tan,
    "atan": torch.atan,
}
for _name, _fn in _UNARY_OPS.items():
    register(_name, _same, _fn, pointwise=True)
for _name, _fn in _FLOAT_UNARY_OPS.items():
    register(_name, _float_result, _fn, pointwise=True)

register("logical_not", lambda t, a: t[0].with_dtype("bool"), torch.logical_not, pointwise=True)
register("isnan", lambda t, a: t[0].with_dtype("bool"), torch.isnan, pointwise=True)
register("isinf", lambda t, a: t[0].with_dtype("bool"), torch.isinf, pointwise=True)
register("gelu", _float_result, lambda x, approximate="none": F.gelu(x, approximate=approximate), pointwise=True)
register("cast", lambda t, a: t[0].with_dtype(a["dtype"]), lambda x, dtype: x.to(TensorType((), dtype).torch_dtype),
         pointwise=True)


def _where_infer(types, attrs):
    if types[0].dtype != "bool":
        raise IRTypeError(f"where's condition must be bool, got {types[0].dtype}")
    return TensorType(broadcast_shapes(*(t.shape for t in types)), dtype_of(torch.result_type(_meta(types[1]), _meta(types[2]))))


register("where", _where_infer, torch.where, inputs=3, pointwise=True)


def _masked_fill_infer(types, attrs):
    if types[1].dtype != "bool":
        raise IRTypeError(f"masked_fill's mask must be bool, got {types[1].dtype}")
    broadcast_shapes(types[0].shape, types[1].shape)
    return types[0]


register("masked_fill", _masked_fill_infer, lambda x, mask, value: x.masked_fill(mask, value), inputs=2,
         pointwise=True)


# ----------------------------------------------------------------------------- reductions
def _reduce_infer(types, attrs, dtype=None):
    """Reduce over `dims` (all of them when empty, as torch does)."""
    shape = list(types[0].shape)
    dims = sorted(_norm_dim(d, len(shape)) for d in attrs["dims"]) or list(range(len(shape)))
    for d in reversed(dims):
        if attrs.get("keepdim", False):
            shape[d] = 1
        else:
            shape.pop(d)
    return TensorType(tuple(shape), dtype or types[0].dtype)


def _sum_infer(types, attrs):
    integer = not (types[0].is_float or types[0].is_complex)
    return _reduce_infer(types, attrs, "i64" if integer else None)  # torch sums integers in i64


register("sum", _sum_infer, lambda x, dims, keepdim=False: torch.sum(x, dim=list(dims), keepdim=keepdim))
register("mean", _reduce_infer, lambda x, dims, keepdim=False: torch.mean(x, dim=list(dims), keepdim=keepdim))
register("amax", _reduce_infer, lambda x, dims, keepdim=False: torch.amax(x, dim=list(dims), keepdim=keepdim))
register("amin", _reduce_infer, lambda x, dims, keepdim=False: torch.amin(x, dim=list(dims), keepdim=keepdim))
register(
    "argmax",
    lambda t, a: _reduce_infer(t, {"dims": (a["dim"],), "keepdim": a.get("keepdim", False)}, "i64"),
    lambda x, dim, keepdim=False: torch.argmax(x, dim=dim, keepdim=keepdim),
)
register(
    "argmin",
    lambda t, a: _reduce_infer(t, {"dims": (a["dim"],), "keepdim": a.get("keepdim", False)}, "i64"),
    lambda x, dim, keepdim=False: torch.argmin(x, dim=dim, keepdim=keepdim),
)
# var {dims, keepdim, correction}: the sum of squared deviations / (count - correction).
register("var", lambda t, a: _float_result([_reduce_infer(t, a)], a),
         lambda x, dims, keepdim=False, correction=1: torch.var(x.float() if not x.is_floating_point() else x,
                                                                dim=list(dims), keepdim=keepdim, correction=correction))
register("softmax", _same, lambda x, dim: torch.softmax(x, dim=dim))
register("log_softmax", _same, lambda x, dim: torch.log_softmax(x, dim=dim))


def _cumsum_infer(types, attrs):
    _norm_dim(attrs["dim"], types[0].rank)
    return types[0] if types[0].is_float else types[0].with_dtype("i64")  # torch sums integers in i64


register("cumsum", _cumsum_infer, lambda x, dim: torch.cumsum(x, dim=dim))


# tril/triu {diagonal}: keep the lower/upper triangle of the last two dims, zero the rest.
def _triangle_infer(types, attrs):
    if types[0].rank < 2:
        raise IRTypeError(f"tril/triu take a tensor of rank >= 2, got {types[0]}")
    return types[0]


register("tril", _triangle_infer, lambda x, diagonal=0: torch.tril(x, diagonal))
register("triu", _triangle_infer, lambda x, diagonal=0: torch.triu(x, diagonal))


# ----------------------------------------------------------------------------- linear algebra
# gemm(x, w, *extras) {epilogue=[...]}: y = x @ w.T, then each epilogue step in order.
# "bias" and "residual" read the next extra input ([N] and [..., N]); "gated_silu"
# splits the columns in halves [gate | up] and yields silu(gate) * up (N -> N/2).
ACTIVATIONS = {
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "silu": F.silu,
}
EPILOGUE_INPUTS = {"bias": 1, "residual": 1}

# How gemm's weight is stored ({weight_layout=..., n=N}; absent: torch's [N, K]).
# "k16": panels [P, K, 16], panel p holding 16 of the N columns for every k, so a kernel
# reads one [K, 16] panel contiguously. With gated_silu each panel holds 8 gate columns
# then the 8 up columns of the same outputs (both halves of 8 outputs). Each half is
# padded with zero columns to whole panels; `n` keeps the unpadded N.
PANEL = 16
WEIGHT_LAYOUTS = ("k16",)


def weight_halves(epilogue) -> int:
    """2 when a gated_silu pairs the halves [gate | up] of w's columns, else 1."""
    return 2 if "gated_silu" in tuple(epilogue) else 1


def packed_weight_shape(n: int, k, halves: int) -> tuple:
    """The "k16" shape of an [n, k] weight: [panels, k, 16]."""
    columns = PANEL // halves  # of each half, per panel
    return (-(-(n // halves) // columns), k, PANEL)


def pack_weight(w: torch.Tensor, halves: int) -> torch.Tensor:
    """[N, K] -> "k16" panels: packed[p, k, h*c + i] = w[h*N/halves + p*c + i, k], c = 16/halves."""
    n, k = w.shape
    panels, _, _ = packed_weight_shape(n, k, halves)
    columns, half = PANEL // halves, n // halves
    parts = F.pad(w.reshape(halves, half, k), (0, 0, 0, panels * columns - half))
    return parts.reshape(halves, panels, columns, k).permute(1, 3, 0, 2).reshape(panels, k, PANEL).contiguous()


def unpack_weight(packed: torch.Tensor, n: int, halves: int) -> torch.Tensor:
    """The inverse of `pack_weight`: the [n, K] weight back."""
    panels, k, _ = packed.shape
    columns = PANEL // halves
    parts = packed.reshape(panels, k, halves, columns).permute(2, 0, 3, 1).reshape(halves, panels * columns, k)
    return parts[:, : n // halves].reshape(n, k)


def _gemm_weight_n(x: TensorType, w: TensorType, attrs: dict):
    """N, the weight's logical row count, checked against x's K and the layout."""
    layout = attrs.get("weight_layout")
    if layout is None:
        if w.rank != 2 or not dims_equal(x.shape[-1], w.shape[1]):
            raise IRTypeError(f"gemm: x {x} and weight {w} disagree on K (weight is [N, K])")
        return w.shape[0]
    n, halves = attrs.get("n"), weight_halves(attrs.get("epilogue", ()))
    if layout not in WEIGHT_LAYOUTS or not isinstance(n, int) or n % halves:
        raise IRTypeError(f"gemm: weight_layout={layout!r} with n={n!r} (layouts: {WEIGHT_LAYOUTS}, n an int)")
    expected = packed_weight_shape(n, x.shape[-1], halves)
    if w.rank != 3 or not all(dims_equal(a, b) for a, b in zip(w.shape, expected)):
        raise IRTypeError(f"gemm: a {layout} weight of n={n} for x {x} is [{', '.join(map(str, expected))}], got {w}")
    return n


def _gemm_infer(types, attrs):
    x, w, extras = types[0], types[1], list(types[2:])
    n = _gemm_weight_n(x, w, attrs)
    for step in attrs.get("epilogue", ()):
        if step in EPILOGUE_INPUTS:
            if not extras:
                raise IRTypeError(f"gemm: epilogue step {step!r} has no input left")
            extra = extras.pop(0)
            if not dims_equal(extra.shape[-1], n) or (step == "bias" and extra.rank != 1) or extra.dtype != x.dtype:
                raise IRTypeError(f"gemm: {step} {extra} does not match N={n} and dtype {x.dtype}")
        elif step == "gated_silu":
            n = floordiv(n, 2)
        elif step not in ACTIVATIONS:
            raise IRTypeError(f"gemm: unknown epilogue step {step!r}")
    if extras:
        raise IRTypeError(f"gemm: {len(extras)} inputs beyond what the epilogue {list(attrs.get('epilogue', ()))} reads")
    return TensorType(x.shape[:-1] + (n,), x.dtype)


def gemm_reference(x, w, *extras, epilogue=(), weight_layout=None, n=None):
    if weight_layout is not None:
        w = unpack_weight(w, n, weight_halves(epilogue))
    y, extras = F.linear(x, w), list(extras)
    for step in epilogue:
        if step == "bias":
            y = y + extras.pop(0)
        elif step == "residual":
            y = y + extras.pop(0)
        elif step == "gated_silu":
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        else:
            y = ACTIVATIONS[step](y)
    return y


register("gemm", _gemm_infer, gemm_reference, inputs=(2, None), heavy=True)


def _matmul_infer(types, attrs):
    a, b = types
    if a.rank < 2 or b.rank < 2 or not dims_equal(a.shape[-1], b.shape[-2]):
        raise IRTypeError(f"matmul: {a} @ {b} do not agree")
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return TensorType(batch + (a.shape[-2], b.shape[-1]), a.dtype)


register("matmul", _matmul_infer, torch.matmul, inputs=2, heavy=True)


def _embedding_infer(types, attrs):
    table, ids = types
    if ids.dtype not in ("i64", "i32"):
        raise IRTypeError(f"embedding ids must be integers, got {ids.dtype}")
    return TensorType(ids.shape + (table.shape[1],), table.dtype)


register("embedding", _embedding_infer, lambda table, ids: F.embedding(ids, table), inputs=2)


# ----------------------------------------------------------------------------- normalization
# layer_norm(x[, w[, b]][, residual]) / rms_norm(x[, w][, residual]) {eps, residual=false}
# normalize the last dimension. With residual=true the last input is added first and the
# result stacks both outputs: out[0] = norm(x + residual), out[1] = x + residual (the
# new residual stream), so one kernel yields both and one node keeps one result.
def _norm_infer(types, attrs):
    x, params = types[0], list(types[1:])
    if attrs.get("residual", False):
        if not params or not params[-1].same_as(x):
            raise IRTypeError(f"norm: the residual input must have x's type {x}")
        params.pop()
    for t in params:
        if t.rank != 1 or not dims_equal(t.shape[0], x.shape[-1]):
            raise IRTypeError(f"norm parameter {t} does not match the last dim of {x}")
    return x.with_shape((2,) + x.shape) if attrs.get("residual", False) else x


def _with_residual(norm):
    def reference(x, *params, eps=None, residual=False):
        if not residual:
            return norm(x, *params, eps=eps)
        total = x + params[-1]
        return torch.stack([norm(total, *params[:-1], eps=eps), total])

    return reference


def _layer_norm(x, weight=None, bias=None, eps=None):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, 1e-5 if eps is None else eps)


def _rms_norm(x, weight=None, eps=None):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


register("layer_norm", _norm_infer, _with_residual(_layer_norm), inputs=(1, 4), heavy=True)
register("rms_norm", _norm_infer, _with_residual(_rms_norm), inputs=(1, 3), heavy=True)


# ----------------------------------------------------------------------------- attention
def _attention_infer(types, attrs):
    q, k, v = types[:3]
    if q.rank != 4 or k.rank != 4 or v.rank != 4:
        raise IRTypeError(f"attention takes [B, H, S, D] tensors, got {q}, {k}, {v}")
    return q.with_shape(q.shape[:-1] + (v.shape[-1],))


def _attention(q, k, v, mask=None, causal=False, scale=None, gqa=False):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)


register("attention", _attention_infer, _attention, inputs=(3, 4), heavy=True)
# rope(x[T,H,D], cos[T,D], sin[T,D]): rotary embedding, rotate-half convention.
def _rope_infer(types, attrs):
    x, cos, sin = types
    if x.rank != 3 or not cos.same_as(sin) or cos.rank != 2 or not dims_equal(cos.shape[-1], x.shape[-1]):
        raise IRTypeError(f"rope takes x [T,H,D] and cos/sin [T,D], got {x}, {cos}, {sin}")
    return x


register("rope", _rope_infer, attention_reference.rope, inputs=3)


# The cache ops may apply rope themselves (attr rope=true, cos and sin as the last two
# inputs): rope on the keys as they are written, on the queries as they are read.
def _with_rope(op):
    def reference(*inputs, rope=False, **attrs):
        if rope:
            *inputs, cos, sin = inputs
            rotated = 1 if op is attention_reference.kv_cache_write else 0
            inputs[rotated] = attention_reference.rope(inputs[rotated], cos, sin)
        return op(*inputs, **attrs)

    return reference


register("paged_attention", _same, _with_rope(attention_reference.paged_attention), inputs=(5, 7), heavy=True)
register("kv_cache_write", _same, _with_rope(attention_reference.kv_cache_write), inputs=(4, 6), aliases_input=0, heavy=True)


# ----------------------------------------------------------------------------- shapes and views
def _reshape_infer(types, attrs):
    x, shape = types[0], list(attrs["shape"])
    if sum(1 for d in shape if isinstance(d, int) and d == -1) > 1:
        raise IRTypeError(f"reshape: more than one -1 in {shape}")
    if -1 in shape:
        known = _prod([d for d in shape if not (isinstance(d, int) and d == -1)])
        shape[shape.index(-1)] = as_dim(sympy.sympify(x.numel()) / known)
    if not dims_equal(_prod(shape), x.numel()):
        raise IRTypeError(f"reshape: {x} has {x.numel()} elements, shape {shape} has {_prod(shape)}")
    return x.with_shape(shape)


register("reshape", _reshape_infer, lambda x, shape: x.reshape(list(shape)), view=True)


def _permute_infer(types, attrs):
    x, dims = types[0], attrs["dims"]
    if sorted(_norm_dim(d, x.rank) for d in dims) != list(range(x.rank)):
        raise IRTypeError(f"permute: {list(dims)} is not a permutation of rank {x.rank}")
    return x.with_shape(x.shape[d] for d in dims)


register("permute", _permute_infer, lambda x, dims: x.permute(list(dims)), view=True)


def _expand_infer(types, attrs):
    x, shape = types[0], list(attrs["shape"])
    offset = len(shape) - x.rank
    out = [x.shape[i - offset] if isinstance(d, int) and d == -1 else d for i, d in enumerate(shape)]
    broadcast_shapes(x.shape, out)
    return x.with_shape(out)


register("expand", _expand_infer, lambda x, shape: x.expand(list(shape)), view=True)


def _slice_infer(types, attrs):
    x = types[0]
    dim = _norm_dim(attrs["dim"], x.rank)
    start, end, step = attrs.get("start", 0), attrs.get("end"), attrs.get("step", 1)
    if any(isinstance(v, int) and v < 0 for v in (start, end) if v is not None) or step < 1:
        raise IRTypeError(f"slice takes non-negative start/end and a positive step, got {start}:{end}:{step}")
    size = x.shape[dim]
    end = size if end is None else end
    if isinstance(end, int) and isinstance(size, int):
        end = min(end, size)
    length = floordiv(as_dim(end - start + step - 1), step)
    shape = list(x.shape)
    shape[dim] = length
    return x.with_shape(shape)


def _slice(x, dim, start=0, end=None, step=1):
    index = [slice(None)] * x.dim()
    index[dim] = slice(start, end, step)
    return x[tuple(index)]


register("slice", _slice_infer, _slice, view=True)


def _select_infer(types, attrs):
    x = types[0]
    dim = _norm_dim(attrs["dim"], x.rank)
    return x.with_shape(x.shape[:dim] + x.shape[dim + 1 :])


register("select", _select_infer, lambda x, dim, index: x.select(dim, index), view=True)


def _concat_infer(types, attrs):
    first = types[0]
    dim = _norm_dim(attrs["dim"], first.rank)
    for t in types[1:]:
        if t.rank != first.rank or any(not dims_equal(a, b) for i, (a, b) in enumerate(zip(t.shape, first.shape)) if i != dim):
            raise IRTypeError(f"concat: {t} does not match {first} outside dim {dim}")
    shape = list(first.shape)
    shape[dim] = as_dim(sum((sympy.sympify(t.shape[dim]) for t in types), sympy.Integer(0)))
    return first.with_shape(shape)


register("concat", _concat_infer, lambda *xs, dim: torch.cat(xs, dim=dim), inputs=(1, None))


def _index_select_infer(types, attrs):
    x, index = types
    dim = _norm_dim(attrs["dim"], x.rank)
    if index.rank != 1 or index.dtype not in ("i64", "i32"):
        raise IRTypeError(f"index_select takes a 1-d integer index, got {index}")
    shape = list(x.shape)
    shape[dim] = index.shape[0]
    return x.with_shape(shape)


register("index_select", _index_select_infer, lambda x, index, dim: x.index_select(dim, index), inputs=2)


def _gather_infer(types, attrs):
    x, index = types
    _norm_dim(attrs["dim"], x.rank)
    if index.rank != x.rank or index.dtype not in ("i64", "i32"):
        raise IRTypeError(f"gather takes an integer index of x's rank {x.rank}, got {index}")
    return x.with_shape(index.shape)


# gather {dim}: out[i][j][k] = x[index[i][j][k]][j][k] for dim=0 (torch.gather).
register("gather", _gather_infer, lambda x, index, dim: torch.gather(x, dim, index.long()), inputs=2)


# ----------------------------------------------------------------------------- generators
register(
    "full",
    lambda t, a: TensorType(tuple(a["shape"]), a["dtype"]),
    lambda shape, value, dtype: torch.full(list(shape), value, dtype=TensorType((), dtype).torch_dtype),
    inputs=0,
)


def _arange_infer(types, attrs):
    start, end, step = attrs.get("start", 0), attrs["end"], attrs.get("step", 1)
    return TensorType((floordiv(as_dim(end - start + step - 1), step),), attrs["dtype"])


register(
    "arange",
    _arange_infer,
    lambda end, dtype, start=0, step=1: torch.arange(start, end, step, dtype=TensorType((), dtype).torch_dtype),
    inputs=0,
)
from . import aten_op  # noqa: E402,F401  (the fallback op `aten`)
