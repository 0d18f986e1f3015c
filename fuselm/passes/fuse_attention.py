"""Recognize attention and rotary embeddings, and fold rope into the paged cache ops.

Rules, in the order they matter:
1. batched matmul: torch.export lowers a 4-d `torch.matmul` to reshapes around a 3-d
   matmul; put the 4-d matmul back (re-splitting the batch dims of its operands) so the
   attention patterns see it.
2. attention: softmax(mask((q @ kᵀ) · scale)) @ v becomes `attention(q, k, v[, mask])`:
   the scale a multiply or divide by a scalar on the scores, on q or on k (or absent);
   kᵀ any permute of k's last two dims; the mask added (a float mask), or a masked_fill
   or where with -inf (a bool mask) or finfo.min (an additive mask). Keys and values
   repeated per query head (Hugging Face's repeat_kv) are read as grouped-query.
   An attention whose mask is, by value, torch's is_causal pattern (S_q == S_k) drops
   it for `causal=true`, whatever built the mask (a folded constant, tril/triu of
   `full`, arange comparisons; see 2b), SDPA's attn_mask too. Other masks stay the op's
   mask input, but one made of generators alone with a symbolic shape stays unfused (a
   kernel with no inputs cannot size it). The probabilities may be guarded as ONNX
   exports of SDPA do, where(isnan(p), 0, p): fully masked rows give zeros, as the
   attention op does.
3. rope: x·cos + rotate_half(x)·sin, rotate_half written as cat(-x[..., h:], x[..., :h]),
   becomes `rope(x, cos, sin)`.
4. rope into the cache ops: the keys a `kv_cache_write` stores and the queries a
   `paged_attention` reads get rotated inside those ops (`rope=true`), so no kernel
   runs for rope alone.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..ir.graph import Constant, Node
from ..ir.types import FLOAT_DTYPES, dims_equal, floordiv
from .base import counters
from .patterns import Any, Op, Rule, rewrite

# ----------------------------------------------------------------------------- 1. matmul
def _batched_matmul(builder, m):
    """Only where the reshapes split the batch dim alone: a reshape that also moves rows
    or columns (einsum's unsqueezed size-1 dims) is not a batched matmul of the sources."""
    out = m.old("out")
    if out.type.rank < 4 or not _same_dims(out.type.shape[-2:], out.inputs[0].type.shape[-2:]):
        return None
    a, b = (_unflattened(builder, m, name, out) for name in ("a3", "b3"))
    if a is None or b is None:
        return None
    candidate = builder.op("matmul", a, b, source=out.source)
    return candidate if candidate.type.same_as(out.type) else None


def _same_dims(a, b) -> bool:
    return len(a) == len(b) and all(dims_equal(x, y) for x, y in zip(a, b))


def _unflattened(builder, m, name: str, out):
    """The matmul operand with out's batch dims, from the source of its 3-d reshape
    (None when the source holds other elements than that shape)."""
    flat = m.old(name)
    source = m._mapped(flat.inputs[0])
    shape = out.type.shape[:-2] + flat.type.shape[-2:]
    if _same_dims(source.type.shape, shape):
        return source
    if not dims_equal(source.type.numel, out.type.with_shape(shape).numel):
        return None
    return builder.op("reshape", source, shape=shape, source=flat.source)


# ----------------------------------------------------------------------------- 2. attention
def _unrepeated(value):
    """k0 when value is repeat_kv(k0): reshape(expand(reshape(k0, [B,Hkv,1,S,D]))), else None."""
    if not (isinstance(value, Node) and value.op == "reshape" and value.type.rank == 4):
        return None
    expanded = value.inputs[0]
    if not (isinstance(expanded, Node) and expanded.op == "expand" and expanded.type.rank == 5):
        return None
    inner = expanded.inputs[0]
    if not (isinstance(inner, Node) and inner.op == "reshape" and inner.type.shape[2] == 1):
        return None
    return inner.inputs[0]


def _attention(builder, m):
    q, out = m.old("q"), m.old("out")
    if q.type.rank != 4 or m.old("kt").type.rank != 4:
        return None
    scale, mask = _scale(builder, m), _mask_input(builder, m)
    if scale is None or mask is None or not _zero_guard(builder, m):
        return None
    k, v, gqa = _keys(builder, m), m.v, False
    k0, v0 = _unrepeated(m.old("k")), _unrepeated(m.old("v"))
    if k is m.k and k0 is not None and v0 is not None:
        k, v, gqa = m._mapped(k0), m._mapped(v0), True
    causal = bool(mask) and is_causal_mask(mask[0], q.type, k.type, _constant_tensors(builder))
    if not causal and mask and mask[0].type.symbols and not _reads_an_input(mask[0]):
        return None  # a kernel with no inputs could not size this mask: leave it unfused
    _count(m, causal)
    return builder.op("attention", m.q, k, v, *(() if causal else mask), causal=causal, scale=float(scale), gqa=gqa,
                      source=out.source)


def _zero_guard(builder, m) -> bool:
    """Whether the probabilities' NaN guard, if any, writes 0 (what attention gives a
    fully masked row) and keeps their type."""
    if "guard" not in m._bindings:
        return True
    return _scalar_value(builder, m.old("nan_fill")) == 0 and m.old("guard").type.same_as(m.old("probs").type)


def _count(m, causal: bool) -> None:
    """The sub-rules of a fused attention, beside the rule's own count."""
    if any(name in m._bindings for name in ("q_scale", "k_scale", "kt_scale")):
        counters["fuse_attention.scaled_operand"] += 1
    if "masked" in m._bindings and m.old("masked").op != "add":
        counters["fuse_attention.fill_mask"] += 1
    if causal:
        counters["fuse_attention.causal_mask"] += 1
    if "guard" in m._bindings:
        counters["fuse_attention.nan_guard"] += 1


def _reads_an_input(value) -> bool:
    """Whether any graph input flows into value (else only generators and constants do)."""
    seen, stack = set(), [value]
    while stack:
        v = stack.pop()
        if isinstance(v, Node) and v not in seen:
            seen.add(v)
            stack.extend(v.inputs)
        elif not isinstance(v, (Node, Constant)):
            return True
    return False


def _constant_tensors(builder) -> Callable:
    return lambda c: builder.constants[builder.adopt(c).name]


def _keys(builder, m):
    """k [B, H, S, D] from kt, the permute that made the scores' right operand [B, H, D, S]."""
    dims = tuple(m.old("kt").attrs["dims"])
    unswapped = dims[:2] + (dims[3], dims[2])
    return m.k if unswapped == (0, 1, 2, 3) else builder.op("permute", m.k, dims=unswapped, source=m.old("kt").source)


def _scale(builder, m):
    """The product of the scalar factors on the scores, q and k (1 when none)."""
    scale = 1.0
    for name in ("logits", "q_scale", "k_scale", "kt_scale"):
        node = m._bindings.get(name)
        if node is not None and node.op != "matmul":
            factor = _scale_factor(builder, node)
            if factor is None:
                return None
            scale *= factor
    return scale


def _scale_factor(builder, node):
    """What a mul/div by a scalar (attribute or one-element constant) multiplies by, else None."""
    if len(node.inputs) == 1:
        if "scalar" not in node.attrs or (node.op == "div" and node.attrs.get("reverse")):
            return None
        value = node.attrs["scalar"]
    else:
        tensor, other = node.inputs
        if node.op == "mul" and _scalar_value(builder, tensor) is not None:
            tensor, other = other, tensor
        value = _scalar_value(builder, other)
        if value is None or not node.type.same_as(tensor.type):
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (node.op == "div" and value == 0):
        return None
    return float(value) if node.op == "mul" else 1.0 / value


def _scalar_value(builder, value):
    """The number a one-element constant (or `full`) holds, else None."""
    if isinstance(value, Constant) and value.type.numel() == 1:
        return builder.constants[builder.adopt(value).name].item()
    if isinstance(value, Node) and value.op == "full" and value.type.numel() == 1:
        return value.attrs["value"]
    return None


def _mask_input(builder, m):
    """The attention op's mask operand for the masking node, () without one, None when
    the node is not a mask: an added float mask stays as it is; a fill with -inf becomes
    a bool mask (True attends), a fill with finfo.min an additive one."""
    if "masked" not in m._bindings:
        return ()
    node, logits = m.old("masked"), m.old("logits")
    if not node.type.same_as(logits.type):
        return None
    if node.op == "add":
        mask = node.inputs[1] if node.inputs[0] is logits else node.inputs[0]
        if not mask.type.is_float:
            return None
        return _selected_bool_mask(builder, m, mask) or (m._mapped(mask),)
    if node.op == "masked_fill":
        cond, fill, keeps = node.inputs[1], node.attrs["value"], False
    else:  # where(keep, logits, fill) or where(hide, fill, logits)
        cond, keeps = node.inputs[0], node.inputs[1] is logits
        fill = _scalar_value(builder, node.inputs[2] if keeps else node.inputs[1])
    if cond.type.dtype != "bool" or not _hides(fill, logits.type):
        return None
    if fill == -math.inf:
        return (m._mapped(cond) if keeps else _negated(builder, m, cond),)
    base = builder.op("full", shape=cond.type.shape, value=float(fill) if keeps else 0.0, dtype=logits.type.dtype)
    return (builder.op("masked_fill", base, m._mapped(cond), value=0.0 if keeps else float(fill)),)


def _selected_bool_mask(builder, m, mask):
    """An added where(keep, 0, -inf) (or where(hide, -inf, 0)) as the bool mask it
    selects by, as ONNX exports spell SDPA's bool mask; None for other masks."""
    if not (isinstance(mask, Node) and mask.op == "where"):
        return None
    cond, (on_true, on_false) = mask.inputs[0], (_scalar_value(builder, v) for v in mask.inputs[1:])
    if (on_true, on_false) == (0, -math.inf):
        return (m._mapped(cond),)
    if (on_true, on_false) == (-math.inf, 0):
        return (_negated(builder, m, cond),)
    return None


def _hides(value, scores_type) -> bool:
    """True for a score that softmax turns into exactly 0: -inf, or finfo.min (or below)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return value == -math.inf or value <= torch.finfo(scores_type.torch_dtype).min


def _negated(builder, m, cond):
    if isinstance(cond, Node) and cond.op == "logical_not":
        return m._mapped(cond.inputs[0])
    return builder.op("logical_not", m._mapped(cond), source=getattr(cond, "source", None))


def _scaled(pattern, name: str) -> list:
    """pattern times (or over) a scalar, that node bound as `name`, then pattern alone
    (first: a bare Any would take the scaled operand whole)."""
    return [Op(("mul", "div"), pattern, bind=name, commutative=True, exact_arity=False), pattern]


def _attention_patterns() -> list:
    """softmax(mask(scale · q kᵀ)) @ v in the spellings users write: the scale on the
    scores, q or k (or none), kᵀ any permute of k's last two dims, and the mask added,
    a masked_fill, a where (either way round) or absent."""
    keys = [Op(("mul", "div"), Op("permute", Any("k"), bind="kt"), bind="kt_scale", commutative=True, exact_arity=False)]
    keys += [Op("permute", k, bind="kt") for k in _scaled(Any("k"), "k_scale")]
    scores = [Op("matmul", q, kt) for q in _scaled(Any("q"), "q_scale") for kt in keys]
    logits = [Op("matmul", *s.inputs, bind="logits") for s in scores]
    logits += [Op(("mul", "div"), s, bind="logits", commutative=True, exact_arity=False) for s in scores]
    masked = []
    for lg in logits:
        masked += [
            lg,
            Op("add", lg, Any("mask"), commutative=True, bind="masked"),
            Op("masked_fill", lg, Any("mask"), bind="masked"),
            Op("where", Any("mask"), lg, Any("fill"), bind="masked"),
            Op("where", Any("mask"), Any("fill"), lg, bind="masked"),
        ]
    probs = [Op("softmax", s, dim=3, bind="probs") for s in masked]
    # ONNX exports of SDPA guard fully masked rows: where(isnan(p), 0, p), SDPA's own zeros
    guarded = [Op("where", Op("isnan", Any("probs")), Any("nan_fill"), p, bind="guard") for p in probs]
    return [Op("matmul", p, Any("v"), bind="out") for p in probs + guarded]


# ----------------------------------------------------------------------------- 2b. causal masks
# A mask is causal when its VALUE is torch's is_causal pattern (key j visible from query
# i iff j <= i), however the model built it. The mask is read as a function of where a
# score sits: `Positions` are integer tensors row·i + col·j + offset (arange and
# arithmetic on it); a `Diagonal` is a tensor whose value depends only on d = j - i,
# constant between its edges (edge e: value(e) may differ from value(e-1)) and known on
# `domain` (a constant's diagonals; None: every d). Comparing positions, tril/triu and
# constants whose diagonals are constant give Diagonals; elementwise ops combine them.
# The check samples both sides of every edge, so it holds for every sequence length.
@dataclass(frozen=True)
class Positions:
    row: int
    col: int
    offset: object  # an int (a float where a float was added)


@dataclass(frozen=True)
class Diagonal:
    value: Callable  # d -> a Python scalar
    edges: frozenset = frozenset()
    domain: Optional[tuple] = None

    def samples(self) -> list:
        lo, hi = self.domain or (-math.inf, math.inf)
        edges = set(self.edges) | {1} | ({lo, hi + 1} if self.domain else set())
        return sorted({d for e in edges for d in (e - 1, e) if lo <= d <= hi})

    def shifted(self, by: int) -> "Diagonal":
        """value(d - by): the same tensor with its rows (by > 0) or columns (by < 0) sliced off."""
        domain = (self.domain[0] + by, self.domain[1] + by) if self.domain else None
        return Diagonal(lambda d: self.value(d - by), frozenset(e + by for e in self.edges), domain)


def _uniform(value) -> Diagonal:
    """The same value on every diagonal."""
    return Diagonal(lambda d: value)


def _is_constant(form) -> bool:
    return isinstance(form, Diagonal) and not form.edges or isinstance(form, Positions) and form.row == form.col == 0


def _constant_value(form):
    if isinstance(form, Positions):
        return form.offset
    return form.value(form.domain[0] if form.domain else 0)


def _pointwise(fn, *forms):
    """fn of Diagonals, elementwise (constant Positions read as Diagonals), else None."""
    forms = [_uniform(f.offset) if isinstance(f, Positions) and _is_constant(f) else f for f in forms]
    if not all(isinstance(f, Diagonal) for f in forms):
        return None
    domains = [f.domain for f in forms if f.domain]
    domain = (max(d[0] for d in domains), min(d[1] for d in domains)) if domains else None
    return Diagonal(lambda d: fn(*(f.value(d) for f in forms)), frozenset().union(*(f.edges for f in forms)), domain)


def _as_positions(form):
    if isinstance(form, Positions):
        return form
    if _is_constant(form) and isinstance(_constant_value(form), (int, float)):
        return Positions(0, 0, _constant_value(form))
    return None


def _linear(fn):
    """add/sub of positions, mul by a number; other operands go elementwise."""
    def combine(a, b):
        pa, pb = _as_positions(a), _as_positions(b)
        if isinstance(a, Positions) or isinstance(b, Positions):
            if pa is None or pb is None:
                return None
            if fn is operator.mul:
                if not (_is_constant(pa) or _is_constant(pb)):
                    return None
                factor, p = (pa.offset, pb) if _is_constant(pa) else (pb.offset, pa)
                return Positions(p.row * factor, p.col * factor, p.offset * factor)
            return Positions(fn(pa.row, pb.row), fn(pa.col, pb.col), fn(pa.offset, pb.offset))
        return _pointwise(fn, a, b)
    return combine


def _comparison(fn):
    """k·d + c against 0 for positions (a Diagonal edged where it crosses), else elementwise."""
    def combine(a, b):
        if not (isinstance(a, Positions) or isinstance(b, Positions)):
            return _pointwise(fn, a, b)
        pa, pb = _as_positions(a), _as_positions(b)
        diff = None if pa is None or pb is None else _linear(operator.sub)(pa, pb)
        if diff is None or diff.row != -diff.col:
            return None
        k, c = diff.col, diff.offset
        if k == 0:
            return _uniform(fn(c, 0))
        f = math.floor(-c / k)
        return Diagonal(lambda d: fn(k * d + c, 0), frozenset(range(f - 1, f + 3)))
    return combine


def _triangle(keep_lower: bool):
    def form(node, x):
        k = node.attrs.get("diagonal", 0)
        rows, cols = _trailing(node.type.shape)
        if not isinstance(x, Diagonal) or isinstance(rows, int) and rows == 1 or isinstance(cols, int) and cols == 1:
            return None  # a broadcast row or column is not a function of d
        zero = _converted(0, node.type.dtype)
        kept = (lambda d: d <= k) if keep_lower else (lambda d: d >= k)
        return Diagonal(lambda d: x.value(d) if kept(d) else zero, x.edges | {k + 1 if keep_lower else k}, x.domain)
    return form


def _trailing(shape) -> tuple:
    return ((1, 1) + tuple(shape))[-2:]


def _ones(dims) -> bool:
    return all(isinstance(d, int) and d == 1 for d in dims)


def _reshaped(node, x):
    """Views that keep (i, j) where they were, or turn a row of positions into a column."""
    before, after = node.inputs[0].type.shape, node.type.shape
    if not (_ones(before[:-2]) and _ones(after[:-2])):
        return None
    (r0, c0), (r1, c1) = _trailing(before), _trailing(after)
    if dims_equal(r0, r1) and dims_equal(c0, c1):
        return x
    if _ones((r0, c1)) and dims_equal(c0, r1):  # [.., 1, S] -> [.., S, 1]
        if _is_constant(x):
            return x
        return Positions(x.col, 0, x.offset) if isinstance(x, Positions) and x.row == 0 else None
    return None


def _sliced(node, x):
    rank = node.type.rank
    axis = rank - 1 - node.attrs["dim"] % rank  # 0: columns, 1: rows
    start = node.attrs.get("start", 0)
    if axis > 1 or _is_constant(x):
        return x
    if node.attrs.get("step", 1) != 1 or not isinstance(start, int):
        return None
    if isinstance(x, Positions):
        return Positions(x.row, x.col, x.offset + (x.row if axis else x.col) * start)
    return x.shifted(start if axis else -start)


def _arange(node):
    start, step = node.attrs.get("start", 0), node.attrs.get("step", 1)
    if not (isinstance(start, int) and isinstance(step, int)):
        return None
    return _uniform(start) if _ones(node.type.shape) else Positions(0, step, start)


def _constant_form(tensor):
    """A constant's Diagonal: one value per diagonal of its last two dims, the same across the others."""
    if tensor.numel() == 1:
        return _uniform(tensor.item())
    if tensor.dim() < 2 or 1 in tensor.shape[-2:]:
        return None
    rows, cols = tensor.shape[-2:]
    stack = tensor.reshape(-1, rows, cols)
    mat = stack[0]
    if not (bool((stack == mat).all()) and bool((mat[1:, 1:] == mat[:-1, :-1]).all())):
        return None
    values = torch.cat([mat[:, 0].flip(0), mat[0, 1:]]).tolist()  # d = 1 - rows .. cols - 1
    lo = 1 - rows
    edges = frozenset(lo + n for n in range(1, len(values)) if values[n] != values[n - 1])

    def value(d):
        if not lo <= d < cols:
            raise IndexError(f"diagonal {d} is outside the constant's [{lo}, {cols - 1}]")
        return values[d - lo]

    return Diagonal(value, edges, (lo, cols - 1))


def _converted(value, dtype: str):
    if dtype == "bool":
        return bool(value)
    return float(value) if dtype in FLOAT_DTYPES else int(value)


def _binary(combine):
    def form(node, *args):
        if len(args) == 1:
            other = _uniform(node.attrs["scalar"])
            args = (other, args[0]) if node.attrs.get("reverse") else (args[0], other)
        return combine(*args)
    return form


_ELEMENTWISE = {
    "logical_not": lambda node, x: _pointwise(operator.not_, x),
    "logical_and": _binary(lambda a, b: _pointwise(lambda x, y: bool(x) and bool(y), a, b)),
    "logical_or": _binary(lambda a, b: _pointwise(lambda x, y: bool(x) or bool(y), a, b)),
    "neg": lambda node, x: _linear(operator.mul)(x, _uniform(-1)),
    "add": _binary(_linear(operator.add)),
    "sub": _binary(_linear(operator.sub)),
    "mul": _binary(_linear(operator.mul)),
    "where": lambda node, c, a, b: _pointwise(lambda x, y, z: y if x else z, c, a, b),
    "masked_fill": lambda node, x, mask: _pointwise(lambda v, h: node.attrs["value"] if h else v, x, mask),
    **{op: _binary(_comparison(fn)) for op, fn in (("eq", operator.eq), ("ne", operator.ne), ("lt", operator.lt),
                                                   ("le", operator.le), ("gt", operator.gt), ("ge", operator.ge))},
}
# op -> form(node, *input forms): how each op a mask is built from acts on (i, j).
MASK_FORMS = {
    "full": lambda node: _uniform(node.attrs["value"]),
    "arange": _arange,
    "reshape": _reshaped,
    "expand": lambda node, x: x,
    "slice": _sliced,
    "cast": lambda node, x: None if isinstance(x, Positions) and node.type.dtype == "bool" else x,
    "tril": _triangle(keep_lower=True),
    "triu": _triangle(keep_lower=False),
    **_ELEMENTWISE,
}


def mask_form(value, constant_tensor: Callable):
    """`value` as Positions or a Diagonal, or None where it is not one this reads."""
    forms: dict = {}

    def form(v):
        if v not in forms:
            forms[v] = _form_of(v, form, constant_tensor)
        return forms[v]

    return form(value)


def _form_of(value, form, constant_tensor):
    if isinstance(value, Constant):
        return _constant_form(constant_tensor(value))
    if not isinstance(value, Node) or value.op not in MASK_FORMS:
        return None
    inputs = [form(v) for v in value.inputs]
    result = None if any(f is None for f in inputs) else MASK_FORMS[value.op](value, *inputs)
    if isinstance(result, Diagonal):  # values in the node's dtype, as torch computes them
        dtype, inner = value.type.dtype, result
        result = Diagonal(lambda d: _converted(inner.value(d), dtype), inner.edges, inner.domain)
    return result


def is_causal_mask(mask, q_type, k_type, constant_tensor: Callable) -> bool:
    """True when the attention op's mask (bool: True attends; float: added) is by value
    exactly torch's is_causal for S_q == S_k: 0 / True on and below the diagonal, -inf or
    finfo.min / False above."""
    s_q, s_k = q_type.shape[2], k_type.shape[2]
    rows, cols = _trailing(mask.type.shape)
    if not (dims_equal(s_q, s_k) and dims_equal(rows, s_q) and dims_equal(cols, s_k)):
        return False
    form = mask_form(mask, constant_tensor)
    if not isinstance(form, Diagonal) or not {0, 1} <= set(form.samples()):
        return False  # (a domain without both sides of the diagonal proves nothing)
    if mask.type.dtype == "bool":
        expected = lambda d, v: v == (d <= 0)  # noqa: E731
    else:
        expected = lambda d, v: v == 0 if d <= 0 else _hides(v, mask.type)  # noqa: E731
    try:
        return all(expected(d, form.value(d)) for d in form.samples())
    except (ArithmeticError, ValueError, TypeError, IndexError):  # inf to int, out of a table
        return False


def _causal(builder, m):
    attend = m.old("attend")
    q, k, v, mask = attend.inputs
    if not is_causal_mask(mask, q.type, k.type, _constant_tensors(builder)):
        return None
    return builder.op("attention", m._mapped(q), m._mapped(k), m._mapped(v),
                      **{**attend.attrs, "causal": True}, source=attend.source)


# ----------------------------------------------------------------------------- 3. rope
def _half(x_name: str, first: bool):
    """x[..., :h] (first) or x[..., h:] on the last dim of a rank-3 x."""
    return Op("slice", Any(x_name), dim=2, step=1, bind="lo" if first else "hi")


def _rope(builder, m):
    x, lo, hi = m.old("x"), m.old("lo"), m.old("hi")
    width = x.type.shape[2]
    if x.type.rank != 3 or lo.attrs["start"] != 0 or not dims_equal(lo.attrs["end"], floordiv(width, 2)):
        return None
    if not (dims_equal(hi.attrs["start"], floordiv(width, 2)) and hi.attrs.get("end") in (None, width)):
        return None
    cos, sin = _as_table(builder, m, "cos_b", x), _as_table(builder, m, "sin_b", x)
    if cos is None or sin is None:
        return None
    return builder.op("rope", m.x, cos, sin, source=m.old("out").source)


def _as_table(builder, m, name: str, x):
    """cos/sin as [T, D] from the [T, 1, D] broadcast the model multiplied by."""
    value = m.old(name)
    t = value.type
    if t.rank != 3 or t.shape[1] != 1 or not dims_equal(t.shape[0], x.type.shape[0]) or not dims_equal(t.shape[2], x.type.shape[2]):
        return None
    if isinstance(value, Node) and value.op == "reshape" and value.inputs[0].type.rank == 2:
        return m._mapped(value.inputs[0])
    return builder.op("reshape", m._mapped(value), shape=(t.shape[0], t.shape[2]))


ROPE = Op(
    "add",
    Op("mul", Any("x"), Any("cos_b"), commutative=True),
    Op(
        "mul",
        Op("concat", Op("neg", _half("x", first=False)), _half("x", first=True), dim=2),
        Any("sin_b"),
        commutative=True,
    ),
    commutative=True,
    bind="out",
)


# ----------------------------------------------------------------------------- 4. rope into cache ops
def _write_with_rope(builder, m):
    write = m.old("write")
    cache, _, value, slots = (m._mapped(v) for v in write.inputs)
    return builder.op("kv_cache_write", cache, m.k, value, slots, m.cos, m.sin,
                      **write.attrs, rope=True, source=write.source)


def _attend_with_rope(builder, m):
    attend = m.old("attend")
    rest = tuple(m._mapped(v) for v in attend.inputs[1:])
    return builder.op("paged_attention", m.q, *rest, m.cos, m.sin, **attend.attrs, rope=True, source=attend.source)


ROTATED = Op("rope", Any("k"), Any("cos"), Any("sin"))

RULES = [
    # reshape(matmul(reshape(a), reshape(b))) over flattened batch dims -> matmul(a, b)
    Rule("batched_matmul", Op("reshape", Op("matmul", Op("reshape", Any(), bind="a3"), Op("reshape", Any(), bind="b3")), bind="out"), _batched_matmul),
    # softmax(mask(scale · q kᵀ)) @ v -> attention(q, k, v[, mask])
    *[Rule("attention", pattern, _attention) for pattern in _attention_patterns()],
    # attention(q, k, v, mask) with the mask causal by value and S_q == S_k -> attention(q, k, v) {causal}
    Rule("causal_mask", Op("attention", Any(), Any(), Any(), Any(), causal=False, bind="attend"), _causal),
    # x·cos + cat(-x[h:], x[:h])·sin -> rope(x, cos, sin)
    Rule("rope", ROPE, _rope),
    # kv_cache_write(cache, rope(k), v, slots) -> kv_cache_write(..., cos, sin) {rope=true}
    Rule("rope_into_cache_write", Op("kv_cache_write", Any(), ROTATED, Any(), Any(), bind="write"), _write_with_rope),
    # paged_attention(rope(q), ...) -> paged_attention(q, ..., cos, sin) {rope=true}
    Rule(
        "rope_into_paged_attention",
        Op("paged_attention", Op("rope", Any("q"), Any("cos"), Any("sin")), Any(), Any(), Any(), Any(), bind="attend"),
        _attend_with_rope,
    ),
]


def fuse_attention(graph):
    return rewrite(graph, RULES, "fuse_attention")
