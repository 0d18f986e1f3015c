"""attention(q, k, v[, mask]) {causal, scale, gqa} on [B, H, S, D] tensors, lowered to TE.

Registered in the lowering table, so views around it (q/k/v sliced out of a fused qkv
projection, heads permuted) inline into its reads. Per query row (the generic
schedule's parallel loop over B x H x S): the row of scores q . k_j as vector partial
sums over D (8 keys at a time), the mask, the row max, the probabilities exp(s - max)
kept in a row buffer (one exp per score), their sum, then out[e] = sum_j p_j v[j, e]
with e vectorized. Scores are materialized one row at a time, never [S, S].

A group of the attention op alone (no views inlined) takes `tiled_func` below instead:
query tiles in TVMScript (elementwise.py routes it there). The TE form serves the rest.

Semantics are torch's scaled_dot_product_attention: a bool mask keeps True positions,
a float mask is added; `causal` keeps key j <= query i (top-left aligned); scale
defaults to 1/sqrt(D); with `gqa`, query head h reads kv head h // (H / Hkv).
"""
from __future__ import annotations

import math

from tvm import te, tirx

from ...errors import UnsupportedKernelError
from . import fastmath
from ..memory import kernel_ready
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
        raise UnsupportedKernelError(f"attention needs a static head dim, got {q_type}")
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
    # a row with every key hidden (peak -inf) has probabilities 0 and gives 0, as SDPA
    probs = te.compute((B, H, S, Sk), lambda b, h, i, j: tirx.Select(
        peak[b, h, i] > const(-math.inf, peak[b, h, i]), fastmath.exp(masked(b, h, i, j) - peak[b, h, i]),
        const(0.0, peak[b, h, i])), name=f"{name}_probs_kept")
    j2 = te.reduce_axis((0, Sk), name="j")
    total = te.compute((B, H, S), lambda b, h, i: te.sum(probs[b, h, i, j2], axis=j2), name=f"{name}_sum")
    j3 = te.reduce_axis((0, Sk), name="j")

    def weighted(b, h, i, e):
        kb, kh = kv(b, h)
        return te.sum(probs[b, h, i, j3] * cast(v(kb, kh, j3, e), "float32"), axis=j3)

    numerator = te.compute((B, H, S, Dv), weighted, name=f"{name}_num")
    ctx.refinements.append(lambda sch: refine(sch, name, lanes))
    return ctx.compute(node, lambda b, h, i, e: tirx.Select(total[b, h, i] > const(0.0, total[b, h, i]),
                                                            numerator[b, h, i, e] / total[b, h, i],
                                                            const(0.0, total[b, h, i])), name=name)


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


# ----------------------------------------------------------------------------- query tiles
# The single-node `attention` group is compiled from TVMScript instead (`tiled_func`), with
# the structure of paged.py's paged_attention_tiled: work items (query tile, batch, head),
# parallel, tiles ordered 0, last, 1, last-1, ... so the static split balances causal work.
# K is transposed once by `run` (torch) to [D, keys padded to whole chunks]. Per chunk of
# KEYS_PER_CHUNK keys: the scores [QT, KC] are register blocks of RB rows x KEYS_PER_BLOCK
# keys, broadcast FMAs vectorized over the keys, reading K^T in place; the mask
# (read per score, its key dim padded by `run` to whole chunks, other broadcast dims
# read at index 0) and causality are applied; online
# softmax per row; acc[QT, Dv] += p . V[chunk], vectorized over Dv, V read in place.
# Chunks past the tile's causal diagonal are never visited. Every size but D and Dv is a
# variable bound from the arguments.
ROWS_PER_TILE = 16
KEYS_PER_CHUNK = 32  # keys per online-softmax step
KEYS_PER_BLOCK = 16  # keys per register block of scores


def tiled_supported(group) -> bool:
    if len(group.nodes) != 1 or group.outputs != [group.nodes[0]] or group.nodes[0].op != "attention":
        return False
    node = group.nodes[0]
    q_type, k_type, v_type = (x.type for x in node.inputs[:3])
    if not (isinstance(q_type.shape[3], int) and isinstance(v_type.shape[3], int)):
        return False
    if len(q_type.shape) != 4 or len(k_type.shape) != 4 or len(v_type.shape) != 4:
        return False
    dtypes = {x.type.dtype for x in node.inputs[:3]}
    if not dtypes <= {"f32", "f16", "bf16"}:
        return False
    if len(node.inputs) > 3:
        mask = node.inputs[3].type
        if len(mask.shape) > 4 or mask.dtype not in ("bool", "f32", "f16", "bf16"):
            return False
    from .build import operand_positions
    try:
        operand_positions(group, node)
    except UnsupportedKernelError:  # an operand read through a view: the TE path takes it
        return False
    return True


def value_slice(width: int) -> int:
    """The Dv slice of a P.V register block: two vectors, else one, else all of Dv."""
    lanes = vector_lanes()
    return 2 * lanes if width % (2 * lanes) == 0 else lanes if width % lanes == 0 else width


def tiled_func(node, parallel: bool = True):
    from tvm.script import tirx as T

    from .build import tir_dtype

    q_type, k_type, v_type = (x.type for x in node.inputs[:3])
    D, DVAL = q_type.shape[3], v_type.shape[3]
    scale = T.float32(node.attrs.get("scale") or 1.0 / math.sqrt(D))
    causal = bool(node.attrs.get("causal", False))
    has_mask = len(node.inputs) > 3
    bool_mask = has_mask and node.inputs[3].type.dtype == "bool"
    mask_dt = tir_dtype(node.inputs[3].type.dtype) if has_mask else "float32"
    q_dt, k_dt, v_dt = (tir_dtype(t.dtype) for t in (q_type, k_type, v_type))
    QT, KC = ROWS_PER_TILE, KEYS_PER_CHUNK
    RB = 4
    HALF = vector_lanes()  # lanes of the per-row partial max and sum
    KS = KEYS_PER_BLOCK
    DV = value_slice(DVAL)
    NEG = T.float32(-math.inf)
    items = T.parallel if parallel else T.serial

    @T.prim_func
    def attention_tiled(q_h: T.handle, k_h: T.handle, v_h: T.handle, m_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        B = T.int64()
        H = T.int64()
        S = T.int64()
        KB = T.int64()
        KH = T.int64()
        MB = T.int64()
        MH = T.int64()
        MS = T.int64()
        MK = T.int64()
        query = T.match_buffer(q_h, (B, H, S, D), q_dt)
        KP = T.int64()
        key = T.match_buffer(k_h, (KB, KH, D, KP), k_dt)  # transposed, keys padded to whole chunks
        SK = T.int64()
        value = T.match_buffer(v_h, (KB, KH, SK, DVAL), v_dt)
        mask = T.match_buffer(m_h, (MB, MH, MS, MK), mask_dt)
        out = T.match_buffer(out_h, (B, H, S, DVAL), q_dt)
        for work in items(((S + (QT - 1)) // QT) * B * H):
            qt = T.alloc_buffer((QT, D), "float32", scope="local")
            acc = T.alloc_buffer((QT, DVAL), "float32", scope="local")
            sc = T.alloc_buffer((QT, KC), "float32", scope="local")
            peak = T.alloc_buffer((QT,), "float32", scope="local")
            total = T.alloc_buffer((QT, HALF), "float32", scope="local")
            fresh = T.alloc_buffer((QT,), "float32", scope="local")
            alpha = T.alloc_buffer((QT,), "float32", scope="local")
            part = T.alloc_buffer((HALF,), "float32", scope="local")
            tiles = (S + (QT - 1)) // QT
            z = work // (B * H)
            b = work % (B * H) // H
            h = work % H
            tile = T.Select(z % 2 == 0, z // 2, tiles - 1 - z // 2)
            kb = T.min(b, KB - 1)
            kh = h // (H // KH)
            mb = T.min(b, MB - 1)
            mh = T.min(h, MH - 1)
            q0 = tile * QT
            rows = T.min(T.int64(QT), S - q0)
            for qi in range(QT):
                for d in T.vectorized(D):
                    qt[qi, d] = T.Cast("float32", query[b, h, q0 + T.min(T.int64(qi), rows - 1), d]) * scale
                for d in T.vectorized(DVAL):
                    acc[qi, d] = T.float32(0.0)
                peak[qi] = T.float32(-3.0e38)
                for l in T.vectorized(HALF):
                    total[qi, l] = T.float32(0.0)
            visible = T.min(SK, q0 + rows) if causal else SK
            for c in range((visible + (KC - 1)) // KC):
                for rb, ks in T.grid(QT // RB, KC // KS):
                    for ri in T.unroll(RB):
                        for j in T.vectorized(KS):
                            sc[rb * RB + ri, ks * KS + j] = T.float32(0.0)
                    for d in range(D):
                        for ri in T.unroll(RB):
                            for j in T.vectorized(KS):
                                sc[rb * RB + ri, ks * KS + j] = sc[rb * RB + ri, ks * KS + j] + qt[
                                    rb * RB + ri, d] * T.Cast("float32", key[kb, kh, d, c * KC + ks * KS + j])
                for r in range(QT):
                    for j in T.vectorized(KC):
                        if has_mask:
                            if bool_mask:
                                sc[r, j] = T.Select(
                                    mask[mb, mh, T.min(q0 + T.min(T.int64(r), rows - 1), MS - 1),
                                         c * KC + j], sc[r, j], NEG)
                            else:
                                sc[r, j] = sc[r, j] + T.Cast("float32", mask[
                                    mb, mh, T.min(q0 + T.min(T.int64(r), rows - 1), MS - 1),
                                    c * KC + j])
                        if causal:  # key j <= query row, and a real key (S_q > S_k: past SK is padding)
                            sc[r, j] = T.Select(c * KC + j <= T.min(q0 + r, SK - 1), sc[r, j], NEG)
                        else:
                            sc[r, j] = T.Select(c * KC + j < SK, sc[r, j], NEG)
                    for l in T.vectorized(HALF):
                        part[l] = sc[r, l]
                    for t in range(1, KC // HALF):
                        for l in T.vectorized(HALF):
                            part[l] = T.max(part[l], sc[r, t * HALF + l])
                    fresh[r] = peak[r]
                    for l in range(HALF):
                        fresh[r] = T.max(fresh[r], part[l])
                    alpha[r] = fastmath.exp(peak[r] - fresh[r])
                    for j in T.vectorized(KC):
                        sc[r, j] = fastmath.exp(sc[r, j] - fresh[r])
                    for l in T.vectorized(HALF):
                        total[r, l] = total[r, l] * alpha[r]
                    for t in range(KC // HALF):
                        for l in T.vectorized(HALF):
                            total[r, l] = total[r, l] + sc[r, t * HALF + l]
                    for d in T.vectorized(DVAL):
                        acc[r, d] = acc[r, d] * alpha[r]
                    peak[r] = fresh[r]
                for rb, dc in T.grid(QT // RB, DVAL // DV):
                    for j in range(KC):
                        for ri in T.unroll(RB):
                            for dd in T.vectorized(DV):
                                acc[rb * RB + ri, dc * DV + dd] = acc[rb * RB + ri, dc * DV + dd] + sc[
                                    rb * RB + ri, j] * T.Cast("float32", value[
                                        kb, kh, T.min(c * KC + j, SK - 1), dc * DV + dd])
            for qi in range(QT):
                if T.Cast("int64", qi) < rows:
                    fresh[qi] = T.float32(0.0)
                    for l in range(HALF):
                        fresh[qi] = fresh[qi] + total[qi, l]
                    if fresh[qi] == T.float32(0.0):  # every key hidden: 0, as SDPA gives
                        fresh[qi] = T.float32(1.0)
                    for d in T.vectorized(DVAL):
                        out[b, h, q0 + qi, d] = T.Cast(q_dt, acc[qi, d] / fresh[qi])

    return attention_tiled


def tiled_generate(group) -> tuple:
    from ..kernel import group_key

    node = group.nodes[0]
    funcs = {"main": tiled_func(node), "serial": tiled_func(node, parallel=False), "keys": padded_keys_func(node)}
    if len(node.inputs) > 3:
        funcs["mask"] = padded_mask_func(node)
    return "attention_tiled_" + group_key(group, "cpu")[:6], funcs


def _padded(keys):
    return (keys + KEYS_PER_CHUNK - 1) // KEYS_PER_CHUNK * KEYS_PER_CHUNK


def padded_keys_func(node):
    """k [B, H, S, D] -> K^T [B, H, D, S padded to whole chunks] (zeros past S): what
    `run` makes with torch, as a kernel of the cpu program."""
    from tvm import te

    from .build import tir_dtype

    B, H, S = (tirx.Var(n, "int64") for n in ("B", "H", "S"))
    D = node.inputs[1].type.shape[3]
    k = te.placeholder((B, H, S, D), tir_dtype(node.inputs[1].type.dtype), name="k")
    kt = te.compute((B, H, D, _padded(S)), lambda b, h, d, j: tirx.if_then_else(
        j < S, k[b, h, tirx.min(j, S - 1), d], tirx.const(0, k.dtype)), name="kt")
    return te.create_prim_func([k, kt])


def padded_mask_func(node):
    """The mask, 4-D, its key dim broadcast to S and padded to whole chunks (zeros past S)."""
    from tvm import te

    from .build import tir_dtype

    S, MB, MH, MS, MK = (tirx.Var(n, "int64") for n in ("S", "MB", "MH", "MS", "MK"))
    mask = te.placeholder((MB, MH, MS, MK), tir_dtype(node.inputs[3].type.dtype), name="mask")
    out = te.compute((MB, MH, MS, _padded(S)), lambda b, h, s, j: tirx.if_then_else(
        j < S, mask[b, h, s, tirx.min(j, MK - 1)], tirx.const(0, mask.dtype)), name="padded")
    return te.create_prim_func([S, mask, out])


def tiled_program_call(group, forms: dict, operands: list, ctx):
    """`tiled_make_run` in the cpu program (program.py): K^T and the mask padded by kernels."""
    from . import elementwise
    from .build import operand_positions, tir_dtype

    node = group.nodes[0]
    positions = operand_positions(group, node)
    types = [group.inputs[at].type for at in positions]
    q, k, v = (operands[at] for at in positions[:3])
    k_shape = ctx.shape(types[1])
    keys = k_shape[2]
    kt = ctx.emit(ctx.call(forms["keys"], [k], [*k_shape[:2], k_shape[3], _padded(keys)], tir_dtype(types[1].dtype)))
    if len(positions) > 3:
        mask_shape = [1] * (4 - types[3].rank) + ctx.shape(types[3])
        mask = ctx.reshape(operands[positions[3]], mask_shape)
        mask = ctx.emit(ctx.call(forms["mask"], [ctx.prim(keys), mask], [*mask_shape[:3], _padded(keys)],
                                 tir_dtype(types[3].dtype)))
    else:
        mask = ctx.empty((1, 1, 1, 1), "float32")
    shape = ctx.shape(types[0])[:3] + ctx.shape(types[2])[3:]
    work = ctx.largest([*types[:3], node.type])
    args = [q, kt, v, mask]
    return ctx.choose([(work < elementwise.SERIAL_MAX, lambda: ctx.call(forms["serial"], args, shape,
                                                                         tir_dtype(node.type.dtype)))],
                      lambda: ctx.call(forms["main"], args, shape, tir_dtype(node.type.dtype)))


def tiled_make_run(group, functions):
    import torch

    from .build import operand_positions

    node = group.nodes[0]
    positions = operand_positions(group, node)
    from . import elementwise  # its SERIAL_MAX, read per call

    parallel, serial = functions["main"], functions["serial"]
    dummy = torch.zeros((1, 1, 1, 1), dtype=torch.float32)

    def run(*inputs):
        args = [inputs[i] for i in positions]
        q, k, v = (kernel_ready(a) for a in args[:3])
        keys = k.shape[2]
        kt = torch.nn.functional.pad(k.transpose(2, 3), (0, -keys % KEYS_PER_CHUNK)).contiguous()
        if len(args) > 3:
            mask = args[3]
            mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
            if mask.shape[3] != keys or keys % KEYS_PER_CHUNK:  # whole chunks of keys, read as vectors
                pad = -keys % KEYS_PER_CHUNK
                mask = torch.nn.functional.pad(mask.expand(*mask.shape[:3], keys), (0, pad))
            mask = kernel_ready(mask)
        else:
            mask = dummy
        out = torch.empty(q.shape[:3] + v.shape[3:], dtype=q.dtype)
        if out.numel():
            work = max(q.numel(), k.numel(), v.numel(), out.numel())
            (serial if work < elementwise.SERIAL_MAX else parallel)(q, kt, v, mask, out)
        return out

    return run
