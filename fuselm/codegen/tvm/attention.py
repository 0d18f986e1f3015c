"""attention(q, k, v[, mask]) {causal, scale, gqa} on [B, H, S, D] tensors, lowered to TE.

Registered in the lowering table, so views around it (q/k/v sliced out of a fused qkv
projection, heads permuted) inline into its reads. Per query row (the generic
schedule's parallel loop over B x H x S): the row of scores q . k_j as vector partial
sums over D (8 keys at a time), the mask, the row max, the probabilities exp(s - max)
kept in a row buffer (one exp per score), their sum, then out[e] = sum_j p_j v[j, e]
with e vectorized. Scores are materialized one row at a time, never [S, S].

Semantics are torch's scaled_dot_product_attention: a bool mask keeps True positions,
a float mask is added; `causal` keeps key j <= query i (top-left aligned); scale
defaults to 1/sqrt(D); with `gqa`, query head h reads kv head h // (H / Hkv).
"""
from __future__ import annotations

import math

from tvm import te, tirx

from . import fastmath
from .build import const, vector_lanes
from .lowering import Lowering, broadcast_read, cast, lowers

KEYS_PER_TILE = 8


def _kv_index(q_type, kv_type, gqa: bool):
    """Maps (b, h) of the query to (b, h) of k/v: broadcast size-1 dims, or head groups."""
    heads, kv_heads = q_type.shape[1], kv_type.shape[1]

    def index(b, h):
        kb = 0 if kv_type.shape[0] == 1 else b
        if kv_heads == 1:
            return kb, 0
        if gqa and not (isinstance(heads, int) and heads == kv_heads):
            return kb, h // (heads // kv_heads)
        return kb, h

    return index


@lowers("attention")
def lower_attention(ctx: Lowering, node, args):
    q, k, v = args[:3]
    q_type, k_type = node.inputs[0].type, node.inputs[1].type
    B, H, S, D = ctx.shape(q_type)
    Sk, Dv = ctx.dims(k_type.shape[2]), ctx.dims(node.inputs[2].type.shape[3])
    head_dim = q_type.shape[3]
    if not isinstance(head_dim, int):
        raise NotImplementedError(f"attention needs a static head dim, got {q_type}")
    scale = node.attrs.get("scale") or 1.0 / math.sqrt(head_dim)
    kv = _kv_index(q_type, k_type, node.attrs.get("gqa", False))
    name = ctx.name("attention")
    lanes = vector_lanes() if head_dim % vector_lanes() == 0 else 1
    chunk = te.reduce_axis((0, head_dim // lanes), name="d")

    def product(b, h, i, j, lane):
        kb, kh = kv(b, h)
        d = chunk * lanes + lane
        return cast(q(b, h, i, d), "float32") * cast(k(kb, kh, j, d), "float32")

    partial = te.compute((B, H, S, Sk, lanes), lambda b, h, i, j, lane: te.sum(product(b, h, i, j, lane), axis=chunk),
                         name=f"{name}_partial")
    lane = te.reduce_axis((0, lanes), name="lane")
    scores = te.compute((B, H, S, Sk), lambda b, h, i, j: te.sum(partial[b, h, i, j, lane], axis=lane), name=f"{name}_scores")
    masked = _masked(node, args, scores, scale)
    j = te.reduce_axis((0, Sk), name="j")
    peak = te.compute((B, H, S), lambda b, h, i: te.max(masked(b, h, i, j), axis=j), name=f"{name}_max")
    probs = te.compute((B, H, S, Sk), lambda b, h, i, j: fastmath.exp(masked(b, h, i, j) - peak[b, h, i]),
                       name=f"{name}_probs_kept")
    j2 = te.reduce_axis((0, Sk), name="j")
    total = te.compute((B, H, S), lambda b, h, i: te.sum(probs[b, h, i, j2], axis=j2), name=f"{name}_sum")
    j3 = te.reduce_axis((0, Sk), name="j")

    def weighted(b, h, i, e):
        kb, kh = kv(b, h)
        return te.sum(probs[b, h, i, j3] * cast(v(kb, kh, j3, e), "float32"), axis=j3)

    numerator = te.compute((B, H, S, Dv), weighted, name=f"{name}_num")
    ctx.refinements.append(lambda sch: refine(sch, name, lanes))
    return ctx.compute(node, lambda b, h, i, e: numerator[b, h, i, e] / total[b, h, i], name=name)


def _masked(node, args, scores, scale: float):
    """scores * scale with the mask and causality applied, as an index function."""
    causal = node.attrs.get("causal", False)
    mask, mask_type = (args[3], node.inputs[3].type) if len(args) > 3 else (None, None)

    def value(b, h, i, j):
        s = scores[b, h, i, j] * const(scale, scores[b, h, i, j])
        if mask is not None:
            m = broadcast_read(mask, mask_type, (b, h, i, j))
            s = tirx.Select(m, s, const(-math.inf, s)) if mask_type.dtype == "bool" else s + cast(m, "float32")
        if causal:
            s = tirx.Select(j <= i, s, const(-math.inf, s))
        return s

    return value


def refine(sch, name: str, lanes: int) -> None:
    """Vector dot products for the scores (8 keys a tile) and for the weighted sum of v."""
    partial = sch.get_sblock(f"{name}_partial")
    key, lane, chunk = sch.get_loops(partial)[-3:]
    if lanes > 1:
        key_tile, key_row = sch.split(key, [None, KEYS_PER_TILE])
        sch.reorder(key_tile, chunk, key_row, lane)
        sch.unroll(key_row)
        sch.vectorize(lane)
        sch.decompose_reduction(partial, chunk)
    numerator = sch.get_sblock(f"{name}_num")
    e, j = sch.get_loops(numerator)[-2:]
    sch.reorder(j, e)
    extent = sch.get(e).extent
    if isinstance(extent, tirx.IntImm) and extent.value % lanes == 0 and lanes > 1:
        sch.vectorize(sch.split(e, [None, lanes])[1])
    sch.decompose_reduction(numerator, j)
