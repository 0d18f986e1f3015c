"""The one table mapping ATen ops (after core decomposition) to IR ops.

Each entry is `aten overload -> handler(cv, *args, **kwargs)`; arguments arrive already
converted (tensors as IR values, SymInts as dimensions), and the handler returns the IR
value standing for the op's result (a tuple for multi-result ops, None for asserts).
Views, copies and no-op conversions map to their input.
"""
from __future__ import annotations

import math
import operator

import torch

from ..ir.types import as_dim, dtype_of

aten = torch.ops.aten
INT64_MAX = 2**63 - 1


# ----------------------------------------------------------------------------- factories
def unary(op: str, **fixed):
    return lambda cv, x, *rest, **kw: cv.op(op, x, **fixed)


def binary(op: str):
    """`op(a, b)` where either side may be a Python scalar (`alpha` as in add/sub)."""

    def handler(cv, a, b, alpha=1):
        if alpha != 1:
            b = cv.op("mul", b, scalar=alpha) if cv.is_value(b) else b * alpha
        if cv.is_value(a) and cv.is_value(b):
            return cv.op(op, a, b)
        if cv.is_value(a):
            return cv.op(op, a, scalar=b)
        return cv.op(op, b, scalar=a, reverse=True)

    return handler


def reverse_binary(op: str):
    return lambda cv, a, b, alpha=1: binary(op)(cv, b, a * alpha if alpha != 1 else a)


def identity(cv, x, *args, **kwargs):
    return x


def ignore(cv, *args, **kwargs):
    return None


def reduction(op: str):
    def handler(cv, x, dims=None, keepdim=False, dtype=None):
        dims = list(range(x.type.rank)) if dims is None or dims == [] else ([dims] if isinstance(dims, int) else dims)
        out = cv.op(op, x, dims=tuple(dims), keepdim=bool(keepdim))
        return cast_to(cv, out, dtype)

    return handler


def cast_to(cv, x, dtype):
    if dtype is None or dtype_of(dtype) == x.type.dtype:
        return x
    return cv.op("cast", x, dtype=dtype_of(dtype))


# ----------------------------------------------------------------------------- shapes
def reshape(cv, x, shape):
    return cv.op("reshape", x, shape=tuple(shape))


def unsqueeze(cv, x, dim):
    shape = list(x.type.shape)
    shape.insert(dim % (len(shape) + 1), 1)
    return cv.op("reshape", x, shape=tuple(shape))


def squeeze(cv, x, dims=None):
    rank = x.type.rank
    dims = range(rank) if dims is None else ([dims] if isinstance(dims, int) else dims)
    drop = {d % max(rank, 1) for d in dims if x.type.shape[d % max(rank, 1)] == 1}
    return cv.op("reshape", x, shape=tuple(s for i, s in enumerate(x.type.shape) if i not in drop))


def transpose(cv, x, dim0, dim1):
    dims = list(range(x.type.rank))
    dims[dim0], dims[dim1] = dims[dim1], dims[dim0]
    return cv.op("permute", x, dims=tuple(dims))


def permute(cv, x, dims):
    return cv.op("permute", x, dims=tuple(d % x.type.rank for d in dims))


def expand(cv, x, shape, implicit=False):
    return cv.op("expand", x, shape=tuple(shape))


def slice_(cv, x, dim=0, start=None, end=None, step=1):
    dim %= x.type.rank
    size = x.type.shape[dim]
    start = 0 if start is None else (as_dim(size + start) if isinstance(start, int) and start < 0 else start)
    if end is None or (isinstance(end, int) and end >= INT64_MAX) or (isinstance(size, int) and isinstance(end, int) and end >= size):
        end = None
    elif isinstance(end, int) and end < 0:
        end = as_dim(size + end)
    if start == 0 and end is None and step == 1:
        return x
    return cv.op("slice", x, dim=dim, start=start, end=end, step=step)


def split_with_sizes(cv, x, sizes, dim=0):
    dim %= x.type.rank
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return tuple(cv.op("slice", x, dim=dim, start=as_dim(s), end=as_dim(s + n), step=1) for s, n in zip(starts, sizes))


def split(cv, x, split_size, dim=0):
    size = x.type.shape[dim % x.type.rank]
    if not isinstance(size, int):
        return cv.unsupported("aten.split over a symbolic dimension")
    sizes = [min(split_size, size - s) for s in range(0, size, split_size)]
    return split_with_sizes(cv, x, sizes, dim)


def select(cv, x, dim, index):
    dim %= x.type.rank
    size = x.type.shape[dim]
    return cv.op("select", x, dim=dim, index=as_dim(size + index) if isinstance(index, int) and index < 0 else index)


def concat(cv, tensors, dim=0):
    # torch skips 1-d empty tensors of any other rank (Hugging Face's DynamicCache starts
    # each layer's keys as torch.tensor([]) and concatenates the first keys onto it)
    kept = [t for t in tensors if not (t.type.rank == 1 and t.type.shape[0] == 0)] or list(tensors)
    if len(kept) == 1:
        return kept[0]
    return cv.op("concat", *kept, dim=dim % kept[0].type.rank)


def index_tensor(cv, x, indices):
    """x[..., i0, i1, ..., ...] (advanced indexing) with integer index tensors on
    consecutive dims: those dims flatten into one, the indices (broadcast together,
    negatives wrapped) into one linear index, and an index_select reads it; the result
    has the broadcast index shape where the indexed dims were, as in torch."""
    used = [d for d, i in enumerate(indices) if i is not None]
    if used != list(range(used[0], used[-1] + 1)):
        return cv.unsupported("aten.index on dims that are not consecutive")
    if any(indices[d].type.dtype not in ("i64", "i32") for d in used):
        return cv.unsupported("aten.index with a boolean mask")
    shape, first, last = x.type.shape, used[0], used[-1]
    linear = None
    for d in used:
        size = shape[d]
        index = cast_to(cv, indices[d], torch.int64)
        index = cv.op("where", cv.op("lt", index, scalar=0), cv.op("add", index, scalar=size), index)
        linear = index if linear is None else cv.op("add", cv.op("mul", linear, scalar=size), index)
    rows = as_dim(math.prod(shape[first:last + 1], start=1))
    flat = cv.op("reshape", x, shape=tuple(shape[:first]) + (rows,) + tuple(shape[last + 1:]))
    picked = cv.op("index_select", flat, cv.op("reshape", linear, shape=(linear.type.numel(),)), dim=first)
    return cv.op("reshape", picked, shape=tuple(shape[:first]) + linear.type.shape + tuple(shape[last + 1:]))


# ----------------------------------------------------------------------------- the heavy ops
def linear(cv, x, weight, bias=None):
    if bias is None:
        return cv.op("gemm", x, weight)
    return cv.op("gemm", x, weight, bias, epilogue=("bias",))


def matmul(cv, a, b):
    return cv.op("matmul", a, b)


def addmm(cv, bias, x, weight_t, beta=1, alpha=1):
    if beta != 1 or alpha != 1:
        return cv.unsupported("aten.addmm with beta or alpha other than 1")
    return cv.op("add", cv.op("matmul", x, weight_t), bias)


def embedding(cv, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    return cv.op("embedding", weight, indices)


def layer_norm(cv, x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    if len(normalized_shape) != 1:
        return cv.unsupported("layer_norm over more than the last dimension")
    if bias is not None and weight is None:
        return cv.unsupported("layer_norm with a bias but no weight")
    return cv.op("layer_norm", x, *[t for t in (weight, bias) if t is not None], eps=float(eps))


def rms_norm(cv, x, normalized_shape, weight=None, eps=None):
    if len(normalized_shape) != 1:
        return cv.unsupported("rms_norm over more than the last dimension")
    eps = torch.finfo(x.type.torch_dtype).eps if eps is None else eps
    return cv.op("rms_norm", x, *([weight] if weight is not None else []), eps=float(eps))


def sdpa(cv, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    scale = q.type.shape[-1] ** -0.5 if scale is None else scale
    inputs = [q, k, v] + ([attn_mask] if attn_mask is not None else [])
    return cv.op("attention", *inputs, causal=bool(is_causal), scale=float(scale), gqa=bool(enable_gqa))


def softmax(cv, x, dim, half_or_dtype=None):
    out = cv.op("softmax", x, dim=dim % x.type.rank)
    return cast_to(cv, out, half_or_dtype if isinstance(half_or_dtype, torch.dtype) else None)


def log_softmax(cv, x, dim, half_or_dtype=None):
    return cv.op("log_softmax", x, dim=dim % x.type.rank)


def gelu(cv, x, approximate="none"):
    return cv.op("gelu", x, approximate=approximate)


def to_copy(cv, x, dtype=None, **kwargs):
    return cast_to(cv, x, dtype)


def to_dtype(cv, x, dtype, non_blocking=False, copy=False, memory_format=None):
    return cast_to(cv, x, dtype)


def chunk(cv, x, chunks, dim=0):
    size = x.type.shape[dim % x.type.rank]
    if not isinstance(size, int):
        return cv.unsupported("aten.chunk over a symbolic dimension")
    return split(cv, x, -(-size // chunks), dim)


def flatten(cv, x, start_dim=0, end_dim=-1):
    rank = x.type.rank
    start, end = start_dim % max(rank, 1), end_dim % max(rank, 1)
    shape = x.type.shape
    merged = as_dim(math.prod(shape[start : end + 1], start=1))
    return cv.op("reshape", x, shape=tuple(shape[:start]) + (merged,) + tuple(shape[end + 1 :]))


def masked_fill(cv, x, mask, value):
    return cv.op("masked_fill", x, mask, value=float(value) if x.type.is_float else int(value))


def where(cv, cond, a, b):
    dtype = (a if cv.is_value(a) else b).type.dtype
    a, b = (t if cv.is_value(t) else cv.op("full", shape=(), value=t, dtype=dtype) for t in (a, b))
    return cv.op("where", cond, a, b)


def pow_(cv, x, exponent):
    return binary("pow")(cv, x, exponent)


def full(cv, size, fill_value, dtype=None, **kwargs):
    dtype = dtype or (torch.float32 if isinstance(fill_value, float) else torch.int64)
    return cv.op("full", shape=tuple(size), value=fill_value, dtype=dtype_of(dtype))


def full_like(cv, x, fill_value, dtype=None, **kwargs):
    return full(cv, x.type.shape, fill_value, dtype or x.type.torch_dtype)


def scalar_tensor(cv, value, dtype=None, **kwargs):
    return full(cv, (), value, dtype or torch.float32)


def arange(cv, start, end=None, step=1, dtype=None, **kwargs):
    if end is None:
        start, end = 0, start
    return cv.op("arange", start=start, end=end, step=step, dtype=dtype_of(dtype or torch.int64))


def clamp(cv, x, min=None, max=None):
    if min is not None:
        x = cv.op("maximum", x, scalar=min)
    if max is not None:
        x = cv.op("minimum", x, scalar=max)
    return x


def var(cv, x, dims=None, correction=None, keepdim=False):
    dims = list(range(x.type.rank)) if dims is None or dims == [] else ([dims] if isinstance(dims, int) else dims)
    correction = 1 if correction is None else correction
    return cv.op("var", x, dims=tuple(d % x.type.rank for d in dims), keepdim=bool(keepdim), correction=correction)


def var_dim(cv, x, dims, unbiased=True, keepdim=False):
    return var(cv, x, dims, 1 if unbiased else 0, keepdim)


def cumsum(cv, x, dim, dtype=None):
    return cast_to(cv, cv.op("cumsum", x, dim=dim % x.type.rank), dtype)


def arg_reduction(op: str):
    def handler(cv, x, dim=None, keepdim=False):
        if dim is None:  # over the flattened tensor
            x, dim, keepdim = cv.op("reshape", x, shape=(x.type.numel(),)), 0, False
        return cv.op(op, x, dim=dim % x.type.rank, keepdim=bool(keepdim))

    return handler


def reduce_with_index(values_op: str, index_op: str):
    """max.dim / min.dim: (values, indices)."""

    def handler(cv, x, dim, keepdim=False):
        dim %= x.type.rank
        return (cv.op(values_op, x, dims=(dim,), keepdim=bool(keepdim)),
                cv.op(index_op, x, dim=dim, keepdim=bool(keepdim)))

    return handler


def triangle(op: str):
    return lambda cv, x, diagonal=0: cv.op(op, x, diagonal=diagonal)


def gather(cv, x, dim, index, sparse_grad=False):
    return cv.op("gather", x, index, dim=dim % x.type.rank)


def filled(value):
    """ones / zeros: full with a fixed value."""
    return lambda cv, size, dtype=None, **kwargs: full(cv, size, value, dtype or torch.float32)


def filled_like(value):
    return lambda cv, x, dtype=None, **kwargs: full(cv, x.type.shape, value, dtype or x.type.torch_dtype)


def new_filled(value):
    return lambda cv, x, size, dtype=None, **kwargs: full(cv, size, value, dtype or x.type.torch_dtype)


def sym_size(cv, x, dim):
    return x.type.shape[dim]


def paged_attention(cv, query, kv_cache, block_tables, context_lens, cu_seqlens_q, layer, scale):
    return cv.op("paged_attention", query, kv_cache, block_tables, context_lens, cu_seqlens_q, layer=layer, scale=float(scale))


def auto_functionalized(cv, op, **kwargs):
    """A mutating custom op; results are (op result, updated bases...)."""
    if op is not torch.ops.fuselm.kv_cache_write.default:
        return cv.unsupported(f"in-place custom op {op}")
    cache = kwargs["_all_bases"][kwargs["_kv_cache_base_index"]] if "_all_bases" in kwargs else kwargs["kv_cache"]
    updated = cv.op("kv_cache_write", cache, kwargs["key"], kwargs["value"], kwargs["slot_mapping"], layer=kwargs["layer"])
    return (None, updated)


def getitem(cv, values, index):
    return values[index]


def symbolic_arith(fn):
    return lambda cv, a, b: as_dim(fn(a, b))


ATEN_TABLE = {
    # heavy ops kept whole by the decomposition
    aten.linear.default: linear,
    aten.embedding.default: embedding,
    aten.layer_norm.default: layer_norm,
    aten.rms_norm.default: rms_norm,
    aten.scaled_dot_product_attention.default: sdpa,
    aten._softmax.default: softmax,
    aten.softmax.int: softmax,
    aten._log_softmax.default: log_softmax,
    aten.mm.default: matmul,
    aten.bmm.default: matmul,
    aten.matmul.default: matmul,
    aten.addmm.default: addmm,
    # elementwise
    aten.add.Tensor: binary("add"),
    aten.add.Scalar: binary("add"),
    aten.sub.Tensor: binary("sub"),
    aten.sub.Scalar: binary("sub"),
    aten.rsub.Scalar: reverse_binary("sub"),
    aten.rsub.Tensor: reverse_binary("sub"),
    aten.mul.Tensor: binary("mul"),
    aten.mul.Scalar: binary("mul"),
    aten.div.Tensor: binary("div"),
    aten.div.Scalar: binary("div"),
    aten.pow.Tensor_Scalar: pow_,
    aten.pow.Tensor_Tensor: pow_,
    aten.maximum.default: binary("maximum"),
    aten.minimum.default: binary("minimum"),
    aten.eq.Tensor: binary("eq"),
    aten.eq.Scalar: binary("eq"),
    aten.ne.Tensor: binary("ne"),
    aten.ne.Scalar: binary("ne"),
    aten.lt.Tensor: binary("lt"),
    aten.lt.Scalar: binary("lt"),
    aten.le.Tensor: binary("le"),
    aten.le.Scalar: binary("le"),
    aten.gt.Tensor: binary("gt"),
    aten.gt.Scalar: binary("gt"),
    aten.ge.Tensor: binary("ge"),
    aten.ge.Scalar: binary("ge"),
    aten.logical_and.default: binary("logical_and"),
    aten.logical_or.default: binary("logical_or"),
    aten.bitwise_and.Tensor: binary("logical_and"),
    aten.bitwise_or.Tensor: binary("logical_or"),
    aten.logical_not.default: unary("logical_not"),
    aten.bitwise_not.default: unary("logical_not"),
    aten.logical_xor.default: binary("logical_xor"),
    aten.remainder.Tensor: binary("remainder"),
    aten.remainder.Scalar: binary("remainder"),
    aten.floor_divide.default: binary("floor_divide"),
    aten.isnan.default: unary("isnan"),
    aten.isinf.default: unary("isinf"),
    aten.sign.default: unary("sign"),
    aten.floor.default: unary("floor"),
    aten.ceil.default: unary("ceil"),
    aten.round.default: unary("round"),
    aten.trunc.default: unary("trunc"),
    aten.log1p.default: unary("log1p"),
    aten.expm1.default: unary("expm1"),
    aten.tan.default: unary("tan"),
    aten.atan.default: unary("atan"),
    aten.clamp_min.default: lambda cv, x, min: clamp(cv, x, min=min),
    aten.clamp_max.default: lambda cv, x, max: clamp(cv, x, max=max),
    aten.neg.default: unary("neg"),
    aten.abs.default: unary("abs"),
    aten.exp.default: unary("exp"),
    aten.log.default: unary("log"),
    aten.sqrt.default: unary("sqrt"),
    aten.rsqrt.default: unary("rsqrt"),
    aten.reciprocal.default: unary("reciprocal"),
    aten.sin.default: unary("sin"),
    aten.cos.default: unary("cos"),
    aten.tanh.default: unary("tanh"),
    aten.erf.default: unary("erf"),
    aten.sigmoid.default: unary("sigmoid"),
    aten.relu.default: unary("relu"),
    aten.silu.default: unary("silu"),
    aten.gelu.default: gelu,
    aten.clamp.default: clamp,
    aten.where.self: where,
    aten.masked_fill.Scalar: masked_fill,
    # reductions
    aten.sum.dim_IntList: reduction("sum"),
    aten.mean.dim: reduction("mean"),
    aten.amax.default: reduction("amax"),
    aten.amin.default: reduction("amin"),
    aten.argmax.default: arg_reduction("argmax"),
    aten.argmin.default: arg_reduction("argmin"),
    aten.max.dim: reduce_with_index("amax", "argmax"),
    aten.min.dim: reduce_with_index("amin", "argmin"),
    aten.var.correction: var,
    aten.var.dim: var_dim,
    aten.cumsum.default: cumsum,
    aten.tril.default: triangle("tril"),
    aten.triu.default: triangle("triu"),
    aten.gather.default: gather,
    # shapes and views
    aten.view.default: reshape,
    aten.reshape.default: reshape,
    aten._unsafe_view.default: reshape,
    aten.unsqueeze.default: unsqueeze,
    aten.squeeze.dim: squeeze,
    aten.squeeze.dims: squeeze,
    aten.squeeze.default: squeeze,
    aten.permute.default: permute,
    aten.transpose.int: transpose,
    aten.t.default: lambda cv, x: transpose(cv, x, 0, 1),
    aten.expand.default: expand,
    aten.slice.Tensor: slice_,
    aten.select.int: select,
    aten.cat.default: concat,
    aten.split_with_sizes.default: split_with_sizes,
    aten.split.Tensor: split,
    aten.index_select.default: lambda cv, x, dim, index: cv.op("index_select", x, index, dim=dim % x.type.rank),
    aten.index.Tensor: index_tensor,
    # conversions, copies and no-ops
    aten._to_copy.default: to_copy,
    aten.to.dtype: to_dtype,
    aten.chunk.default: chunk,
    aten.flatten.using_ints: flatten,
    aten.clone.default: identity,
    aten.alias.default: identity,
    aten.detach.default: identity,
    aten.lift_fresh_copy.default: identity,
    aten.contiguous.default: identity,
    aten._assert_tensor_metadata.default: ignore,
    aten._assert_scalar.default: ignore,
    aten.sym_constrain_range_for_size.default: ignore,
    # generators
    aten.full.default: full,
    aten.full_like.default: full_like,
    aten.ones.default: filled(1),
    aten.zeros.default: filled(0),
    aten.ones_like.default: filled_like(1),
    aten.zeros_like.default: filled_like(0),
    aten.new_ones.default: new_filled(1),
    aten.new_zeros.default: new_filled(0),
    aten.scalar_tensor.default: scalar_tensor,
    aten.arange.default: arange,
    aten.arange.start: arange,
    aten.arange.start_step: arange,
    # symbolic sizes
    aten.sym_size.int: sym_size,
    operator.getitem: getitem,
    operator.add: symbolic_arith(operator.add),
    operator.sub: symbolic_arith(operator.sub),
    operator.mul: symbolic_arith(operator.mul),
    operator.floordiv: symbolic_arith(lambda a, b: a // b),
    # fuselm's attention ops
    torch.ops.higher_order.auto_functionalized_v2: auto_functionalized,
    torch.ops.higher_order.auto_functionalized: auto_functionalized,
}


def kv_cache_write_in_place(cv, kv_cache, key, value, slot_mapping, layer):
    """The mutating op itself (graphs exported without functionalization): the cache's
    graph value becomes the write's result, for every later reader and the outputs."""
    updated = cv.op("kv_cache_write", kv_cache, key, value, slot_mapping, layer=layer)
    cv.mutate(cv.fx_node.args[0], updated)
    return None


def register_attention_ops() -> None:
    """fuselm's custom ops exist once fuselm.models.attention is imported."""
    from ..models import attention  # noqa: F401

    ATEN_TABLE[torch.ops.fuselm.kv_cache_write.default] = kv_cache_write_in_place

    ATEN_TABLE[torch.ops.fuselm.paged_attention.default] = paged_attention


# Decomposition must keep these whole: each is one IR op (and one fused kernel later).
PRESERVED_OPS = (
    aten.linear.default,
    aten.layer_norm.default,
    aten.rms_norm.default,
    aten.scaled_dot_product_attention.default,
    aten.gelu.default,
    aten.silu.default,
    aten.softmax.int,
    aten._softmax.default,
    aten.embedding.default,
)
