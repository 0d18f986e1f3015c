"""varlen_attention(q [T, H, D], k [T, Hkv, D], v [T, Hkv, Dv], cu_seqlens) in TVMScript.

Packed sequences without padding (ir/varlen_ops.py): sequence n owns rows cu[n]:cu[n+1]
of q, k, v and of the output, and its queries attend to its keys only (causal: to keys at
or before their own row). The kernel is generated per (H, Hkv, D, Dv, dtypes, scale,
causal); T and N are variables bound from the arguments, so one build serves every
batch: the work items come from T and N alone. The
sequences cover the rows (cu[0] = 0, cu[N] = T, as `varlen_inputs` makes them): a row
outside every sequence is not written.

Work items (query tile, kv head), parallel: a tile is QT query rows of one sequence x the
H/Hkv query heads sharing the kv head: M = QT * H/Hkv rows, QT = max(16, 32 / (H/Hkv)).
Sequence n's tiles are items cu[n] // QT + n, ... (T // QT + N bound them all, as in
Triton's paged_attention); an item finds its sequence by binary search over cu_seqlens
and does nothing past the sequence's rows.

The scores are kept transposed, sc[KC keys, M rows], so that every step is a vector over
the tile's rows with k and v read in place from the packed [T, Hkv, *] rows (nothing is
transposed or copied): the query tile is transposed once to qt[D, M] (scaled, fp32); per
chunk of KEYS_PER_CHUNK keys, register blocks of KEYS_PER_BLOCK keys x a vector of rows
accumulate qt[d, rows] * k[key, d] (a broadcast); masking (keys past the sequence, or
past the row when causal), the running max, the exponentials and the running sum are
vectors over the rows; then acc[M, Dv] += p . V[chunk], register blocks of
ROWS_PER_BLOCK rows x a slice of Dv (`value_slice`). Only the chunk's real keys are
visited (whole blocks of KEYS_PER_BLOCK), and causal tiles stop at their last row.
"""
from __future__ import annotations

import math

import torch
from tvm.script import tirx as T

from ...errors import UnsupportedKernelError
from ...ir.graph import Graph
from . import fastmath
from ..memory import kernel_ready
from .attention import value_slice
from .build import SERIAL_MAX, operand_positions, single_node, tir_dtype, vector_lanes
from .paged import store_tile

OPS = ("varlen_attention",)

ROWS_PER_TILE = 32  # rows of a tile (query rows x the H/Hkv heads of a kv head) ...
MIN_QUERY_ROWS = 16  # ... with at least this many query rows (tokens): M is a multiple of 16
KEYS_PER_CHUNK = 64  # keys per online-softmax step
KEYS_PER_BLOCK = 8  # keys per register block of scores
ROWS_PER_BLOCK = 4  # rows per register block of the P.V update
NEG = -3.0e38  # a hidden score: exp() of it minus any real max is 0, and no inf - inf


def _static_sizes(node) -> tuple:
    q, k, v = (x.type for x in node.inputs[:3])
    sizes = (q.shape[1], k.shape[1], q.shape[2], v.shape[2])
    if not all(isinstance(d, int) for d in sizes):
        raise UnsupportedKernelError(f"varlen_attention needs static heads and head dims: {q}, {k}, {v}")
    if not {q.dtype, k.dtype, v.dtype} <= {"f32", "f16", "bf16"}:
        raise UnsupportedKernelError(f"varlen_attention takes float q, k, v, got {q}, {k}, {v}")
    return sizes


def query_rows(group: int) -> int:
    """Query rows (tokens) of a tile whose rows are those tokens x `group` heads."""
    return max(MIN_QUERY_ROWS, ROWS_PER_TILE // group)


def varlen_attention_func(node, parallel: bool = True):
    H, HKV, D, DVAL = _static_sizes(node)
    GROUP = H // HKV
    QT, KC, JB, RB = query_rows(GROUP), KEYS_PER_CHUNK, KEYS_PER_BLOCK, ROWS_PER_BLOCK
    M = QT * GROUP
    L = vector_lanes()  # rows per score vector (M is a multiple)
    DV = value_slice(DVAL)
    q_dt, k_dt, v_dt, cu_dt = (tir_dtype(x.type.dtype) for x in node.inputs)
    scale = T.float32(node.attrs.get("scale") or 1.0 / math.sqrt(D))
    causal = bool(node.attrs.get("causal", False))
    items = T.parallel if parallel else T.serial

    @T.prim_func
    def varlen_attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, cu_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        TOKENS = T.int64()
        N1 = T.int64()
        query = T.match_buffer(q_h, (TOKENS, H, D), q_dt)
        key = T.match_buffer(k_h, (TOKENS, HKV, D), k_dt)
        value = T.match_buffer(v_h, (TOKENS, HKV, DVAL), v_dt)
        cu = T.match_buffer(cu_h, (N1,), cu_dt)
        out = T.match_buffer(out_h, (TOKENS, H, DVAL), q_dt)
        for work in items((TOKENS // QT + N1 - 1) * HKV):
            qt = T.alloc_buffer((D, M), "float32", scope="local")
            sc = T.alloc_buffer((KC, M), "float32", scope="local")
            acc = T.alloc_buffer((M, DVAL), "float32", scope="local")
            peak = T.alloc_buffer((M,), "float32", scope="local")
            fresh = T.alloc_buffer((M,), "float32", scope="local")
            alpha = T.alloc_buffer((M,), "float32", scope="local")
            total = T.alloc_buffer((M,), "float32", scope="local")
            bounds = T.alloc_buffer((2,), "int64", scope="local")
            tile = work // HKV
            kv = work % HKV
            # the sequence: the last n with cu[n] // QT + n <= tile (binary search)
            bounds[0] = T.int64(0)
            bounds[1] = N1 - 1
            while bounds[0] < bounds[1]:
                mid = (bounds[0] + bounds[1]) // 2
                if T.Cast("int64", cu[mid]) // QT + mid <= tile:
                    bounds[0] = mid + 1
                else:
                    bounds[1] = mid
            n = bounds[0] - 1
            start = T.Cast("int64", cu[n])
            length = T.Cast("int64", cu[n + 1]) - start
            q0 = (tile - start // QT - n) * QT
            if q0 < length:
                rows = T.min(T.int64(QT), length - q0)
                visible = T.min(length, q0 + rows) if causal else length
                for qi, g in T.grid(QT, GROUP):
                    for d in range(D):
                        qt[d, qi * GROUP + g] = T.Cast("float32", query[
                            start + q0 + T.min(T.int64(qi), rows - 1), kv * GROUP + g, d]) * scale
                for r in T.vectorized(M):
                    peak[r] = T.float32(NEG)
                    total[r] = T.float32(0.0)
                for r in range(M):
                    for e in T.vectorized(DVAL):
                        acc[r, e] = T.float32(0.0)
                for c in range((visible + (KC - 1)) // KC):
                    keys = T.min(T.int64(KC), visible - c * KC)  # real keys of the chunk
                    blocks = (keys + (JB - 1)) // JB
                    for rv, jb in T.grid(M // L, blocks):
                        for ji in T.unroll(JB):
                            for l in T.vectorized(L):
                                sc[jb * JB + ji, rv * L + l] = T.float32(0.0)
                        for d in range(D):
                            for ji in T.unroll(JB):
                                for l in T.vectorized(L):
                                    sc[jb * JB + ji, rv * L + l] = sc[jb * JB + ji, rv * L + l] + qt[
                                        d, rv * L + l] * T.Cast("float32", key[
                                            start + T.min(c * KC + jb * JB + ji, length - 1), kv, d])
                    for r in T.vectorized(M):
                        fresh[r] = peak[r]
                    for j in range(blocks * JB):
                        for r in T.vectorized(M):
                            if causal:
                                sc[j, r] = T.Select(c * KC + j <= q0 + r // GROUP, sc[j, r], T.float32(NEG))
                            else:
                                sc[j, r] = T.Select(j < keys, sc[j, r], T.float32(NEG))
                            fresh[r] = T.max(fresh[r], sc[j, r])
                    for r in T.vectorized(M):
                        alpha[r] = fastmath.exp(peak[r] - fresh[r])
                        total[r] = total[r] * alpha[r]
                        peak[r] = fresh[r]
                    for j in range(keys):
                        for r in T.vectorized(M):
                            sc[j, r] = fastmath.exp(sc[j, r] - fresh[r])
                            total[r] = total[r] + sc[j, r]
                    for rb, dc in T.grid(M // RB, DVAL // DV):
                        for ri in T.unroll(RB):
                            for dd in T.vectorized(DV):
                                acc[rb * RB + ri, dc * DV + dd] = acc[rb * RB + ri, dc * DV + dd] * alpha[rb * RB + ri]
                        for j in range(keys):
                            for ri in T.unroll(RB):
                                for dd in T.vectorized(DV):
                                    acc[rb * RB + ri, dc * DV + dd] = acc[rb * RB + ri, dc * DV + dd] + sc[
                                        j, rb * RB + ri] * T.Cast("float32", value[
                                            start + c * KC + j, kv, dc * DV + dd])
                store_tile(out, acc, total, start + q0, rows, kv, QT, GROUP, DVAL, q_dt)

    return varlen_attention


# ----------------------------------------------------------------------------- kernels
def generate(group: Graph) -> tuple:
    """(kernel name, {function name: TIR PrimFunc}): the parallel form and its serial twin."""
    from ..kernel import group_key

    node = single_node(group)
    H, HKV, D, DVAL = _static_sizes(node)
    name = f"varlen_attention_h{H}_kv{HKV}_d{D}_dv{DVAL}" + ("_causal" if node.attrs.get("causal") else "")
    return f"{name}_{group_key(group, 'cpu')[:6]}", {"main": varlen_attention_func(node),
                                                     "serial": varlen_attention_func(node, parallel=False)}


def make_run(group: Graph, functions):
    node = single_node(group)
    positions = operand_positions(group, node)
    parallel, serial = functions["main"], functions["serial"]

    def run(*inputs):
        q, k, v, cu = (kernel_ready(inputs[i]) for i in positions)
        out = torch.empty(q.shape[:2] + v.shape[2:], dtype=q.dtype)
        if out.numel() and cu.numel() > 1:
            work = max(q.numel(), k.numel(), v.numel(), out.numel())
            (serial if work < SERIAL_MAX else parallel)(q, k, v, cu, out)
        return out

    return run


def program_call(group: Graph, forms: dict, operands: list, ctx):
    """`make_run` in the cpu program (program.py): the serial twin below SERIAL_MAX."""
    node = single_node(group)
    positions = operand_positions(group, node)
    types = [group.inputs[at].type for at in positions]
    args = [operands[at] for at in positions]
    shape, dtype = ctx.shape(node.type), tir_dtype(node.type.dtype)
    work = ctx.largest([*types[:3], node.type])
    return ctx.choose([(work < SERIAL_MAX, lambda: ctx.call(forms["serial"], args, shape, dtype))],
                      lambda: ctx.call(forms["main"], args, shape, dtype))
