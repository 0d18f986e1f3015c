"""Recognize attention and rotary embeddings, and fold rope into the paged cache ops.

Rules, in the order they matter:
1. batched matmul: torch.export lowers a 4-d `torch.matmul` to reshapes around a 3-d
   matmul; put the 4-d matmul back (re-splitting the batch dims of its operands) so the
   attention patterns see it.
2. attention: softmax((q @ kᵀ) · scale [+ mask]) @ v, with the scale a multiply or a
   divide (or absent) and the mask added, becomes `attention(q, k, v[, mask])`; keys and
   values repeated per query head (Hugging Face's repeat_kv) are read as grouped-query.
3. rope: x·cos + rotate_half(x)·sin, rotate_half written as cat(-x[..., h:], x[..., :h]),
   becomes `rope(x, cos, sin)`.
4. rope into the cache ops: the keys a `kv_cache_write` stores and the queries a
   `paged_attention` reads get rotated inside those ops (`rope=true`), so no kernel
   runs for rope alone.
"""
from __future__ import annotations

from ..ir.graph import Node
from ..ir.types import dims_equal, floordiv
from .patterns import Any, Op, Rule, rewrite

SWAP_LAST_TWO = (0, 1, 3, 2)


# ----------------------------------------------------------------------------- 1. matmul
def _batched_matmul(builder, m):
    out = m.old("out")
    if out.type.rank < 4:
        return None
    a, b = (_unflattened(builder, m, name, out) for name in ("a3", "b3"))
    candidate = builder.op("matmul", a, b, source=out.source)
    return candidate if candidate.type.same_as(out.type) else None


def _unflattened(builder, m, name: str, out):
    """The matmul operand with out's batch dims, from the source of its 3-d reshape."""
    flat = m.old(name)
    source = m._mapped(flat.inputs[0])
    shape = out.type.shape[:-2] + flat.type.shape[-2:]
    if source.type.rank == len(shape) and all(dims_equal(a, b) for a, b in zip(source.type.shape, shape)):
        return source
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
    q, k, v = m.old("q"), m.old("k"), m.old("v")
    if q.type.rank != 4 or not dims_equal(m.old("kt").attrs["dims"][-1], 2):
        return None
    scale = 1.0
    if "scaled" in m._bindings:
        node = m.old("scaled")
        if "scalar" not in node.attrs or node.attrs.get("reverse"):
            return None
        scale = 1.0 / node.attrs["scalar"] if node.op == "div" else node.attrs["scalar"]
    gqa = False
    k0, v0 = _unrepeated(k), _unrepeated(v)
    if k0 is not None and v0 is not None:
        k, v, gqa = k0, v0, True
    mask = (m.mask,) if "mask" in m._bindings else ()
    return builder.op("attention", m._mapped(q), m._mapped(k), m._mapped(v), *mask,
                      causal=False, scale=float(scale), gqa=gqa, source=m.old("out").source)


def _attention_patterns():
    scores = Op("matmul", Any("q"), Op("permute", Any("k"), dims=SWAP_LAST_TWO, bind="kt"))
    scaled = [scores, Op("div", scores, bind="scaled"), Op("mul", scores, bind="scaled")]
    masked = [s for base in scaled for s in (base, Op("add", base, Any("mask"), commutative=True))]
    return [Op("matmul", Op("softmax", s, dim=3), Any("v"), bind="out") for s in masked]


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
    *[Rule("attention", pattern, _attention) for pattern in _attention_patterns()],
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
