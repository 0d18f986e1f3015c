"""The paged KV cache ops, written in TVMScript: their loops depend on data.

Cache layout `kv_cache[L, 2, NB, BS, Hkv, D]` (see `ir/attention_reference.py`). The
kernels are generated per (BS, Hkv, H, D, dtypes, layer, rope); every other size
(tokens T, sequences N, blocks NB, table width MB, layers L) is a variable bound from
the arguments, so one build serves every batch.

- `kv_cache_write(cache, key, value, slot_mapping[, cos, sin])`: parallel over tokens
  (serial for a few tokens, as in decode);
  token t's key and value rows go to slot `slot_mapping[t]` (skipped when < 0), the key
  rotated first when rope=true. It writes `cache` in place and `run` returns that same
  tensor (DLPack hands TVM torch's storage; nothing is copied).
- `paged_attention(query, cache, block_tables, context_lens, cu_seqlens_q[, cos, sin])`:
  query tiles of ROWS_PER_TILE rows x the H/Hkv query heads that share one kv head
  (`paged_attention_tiled_func`), parallel over (tile, sequence, kv head). Per chunk of
  16 context positions the keys are gathered once (transposed) for the whole tile, the
  scores and the P.V update are register-blocked FMAs, the softmax is online per row,
  and chunks above the tile's causal diagonal are skipped. `run` passes the tile count
  (from the longest q_len) and, when every q_len <= 1 (decode), takes the twin built with
  one row per tile. Query row i of a sequence is the (context - q_len + i)-th position,
  rotated when rope=true; query head h reads kv head h // (H / Hkv).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tvm.script import tirx as T

from ...errors import UnsupportedKernelError
from ...ir.graph import Graph
from . import fastmath
from ..memory import check_kernel_ready, kernel_ready
from .build import SERIAL_MAX, operand_positions, single_node, tir_dtype, vector_lanes

OPS = ("kv_cache_write", "paged_attention")


@dataclass(frozen=True)
class CacheSpec:
    """The static sizes and dtypes a cache kernel is generated for."""

    block_size: int
    kv_heads: int
    head_dim: int
    layer: int
    rope: bool
    cache_dtype: str
    data_dtype: str  # key/value or query
    index_dtypes: tuple  # dtypes of the integer inputs, in order
    heads: int = 0  # query heads (paged_attention)
    scale: float = 1.0


def spec_of(node) -> CacheSpec:
    cache_at = 0 if node.op == "kv_cache_write" else 1
    cache, data = node.inputs[cache_at].type, node.inputs[1 - cache_at].type
    _, _, _, block_size, kv_heads, head_dim = cache.shape
    sizes = (block_size, kv_heads, head_dim) + ((data.shape[1],) if node.op == "paged_attention" else ())
    if not all(isinstance(d, int) for d in sizes):
        raise UnsupportedKernelError(f"{node.op} needs static block size, heads and head dim: {cache}, {data}")
    rope = bool(node.attrs.get("rope", False))
    n_index = 1 if node.op == "kv_cache_write" else 3
    first_index = 3 if node.op == "kv_cache_write" else 2
    index_dtypes = tuple(tir_dtype(v.type.dtype) for v in node.inputs[first_index:first_index + n_index])
    return CacheSpec(block_size, kv_heads, head_dim, int(node.attrs["layer"]), rope, tir_dtype(cache.dtype),
                     tir_dtype(data.dtype), index_dtypes, data.shape[1] if node.op == "paged_attention" else 0,
                     float(node.attrs.get("scale", 1.0)))


def _rotated(rows, t, h, cos, sin, d, half, size):
    """Rotary embedding of rows[t, h, d] (rotate-half convention), in fp32."""
    x = rows[t, h, d].astype("float32")
    partner = rows[t, h, T.floormod(d + half, size)].astype("float32")
    sign = T.Select(d < half, T.float32(-1.0), T.float32(1.0))
    return x * cos[t, d].astype("float32") + sign * partner * sin[t, d].astype("float32")


# ----------------------------------------------------------------------------- kv_cache_write
def kv_cache_write_func(s: CacheSpec, parallel: bool = True):
    BS, HKV, D, LAYER = s.block_size, s.kv_heads, s.head_dim, s.layer
    cache_dt, data_dt, slot_dt = s.cache_dtype, s.data_dtype, s.index_dtypes[0]
    half = D // 2
    tokens = T.parallel if parallel else T.serial

    @T.prim_func
    def kv_cache_write(cache_h: T.handle, key_h: T.handle, value_h: T.handle, slots_h: T.handle,
                       cos_h: T.handle, sin_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        L = T.int64()
        NB = T.int64()
        TOKENS = T.int64()
        ROPE_T = T.int64()
        cache = T.match_buffer(cache_h, (L, 2, NB, BS, HKV, D), cache_dt, offset_factor=1)  # a layer's view
        key = T.match_buffer(key_h, (TOKENS, HKV, D), data_dt)
        value = T.match_buffer(value_h, (TOKENS, HKV, D), data_dt)
        slots = T.match_buffer(slots_h, (TOKENS,), slot_dt)
        cos = T.match_buffer(cos_h, (ROPE_T, D), data_dt)
        sin = T.match_buffer(sin_h, (ROPE_T, D), data_dt)
        for t in tokens(TOKENS):
            slot = T.Cast("int64", slots[t])
            if slot >= 0:
                for h in range(HKV):
                    for d in T.vectorized(D):
                        if s.rope:
                            cache[LAYER, 0, slot // BS, slot % BS, h, d] = T.Cast(cache_dt, _rotated(
                                key, t, h, cos, sin, d, half, D))
                        else:
                            cache[LAYER, 0, slot // BS, slot % BS, h, d] = T.Cast(cache_dt, key[t, h, d])
                        cache[LAYER, 1, slot // BS, slot % BS, h, d] = T.Cast(cache_dt, value[t, h, d])

    return kv_cache_write


# ----------------------------------------------------------------------------- paged_attention
KEYS_PER_CHUNK = 16  # context positions whose keys are gathered (transposed) together
ROWS_PER_TILE = 8


@T.macro
def store_tile(out, acc, total, first, rows, kv, tile_rows: int, group: int, width: int, dtype: str):
    """out[first + qi, kv * group + g] = acc / total of tile row qi * group + g, for the
    tile's real rows (qi < rows): the query tile of paged attention and varlen attention."""
    for qi, g in T.grid(tile_rows, group):
        if T.Cast("int64", qi) < rows:
            for d in T.vectorized(width):
                out[first + qi, kv * group + g, d] = T.Cast(dtype, acc[qi * group + g, d] / total[qi * group + g])


def paged_attention_tiled_func(s: CacheSpec, rows_per_tile: int):
    """Query tiles: rows_per_tile query rows x the H/Hkv heads sharing one kv head.

    Work item (tile, sequence, kv head), parallel; tiles are ordered 0, last, 1, last-1,
    ... so that the static split over the threads gets equal causal work. Per chunk of
    KEYS_PER_CHUNK context positions: the keys are gathered once, transposed to [D, KC];
    scores [M, KC] are broadcast FMAs vectorized over the keys; mask, online softmax
    per row; then acc[M, D] += p[M, KC] . V[KC, D], vectorized over D, V read in place.
    Chunks past the tile's last visible position are never visited.
    """
    BS, HKV, D, H, LAYER = s.block_size, s.kv_heads, s.head_dim, s.heads, s.layer
    GROUP = H // HKV
    QT = rows_per_tile
    M = QT * GROUP
    KC = KEYS_PER_CHUNK
    RB = 4 if M % 4 == 0 else 2 if M % 2 == 0 else 1  # rows per register block
    DV = 2 * vector_lanes() if D % (2 * vector_lanes()) == 0 else D  # head-dim slice per register block
    cache_dt, q_dt = s.cache_dtype, s.data_dtype
    table_dt, lens_dt, cu_dt = s.index_dtypes
    half = D // 2
    scale = T.float32(s.scale)

    @T.prim_func
    def paged_attention_tiled(query_h: T.handle, cache_h: T.handle, tables_h: T.handle, lens_h: T.handle,
                              cu_h: T.handle, cos_h: T.handle, sin_h: T.handle, tiles: T.int64, out_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        TOKENS = T.int64()
        L = T.int64()
        NB = T.int64()
        N = T.int64()
        MB = T.int64()
        N1 = T.int64()
        ROPE_T = T.int64()
        query = T.match_buffer(query_h, (TOKENS, H, D), q_dt)
        cache = T.match_buffer(cache_h, (L, 2, NB, BS, HKV, D), cache_dt, offset_factor=1)  # a layer's view
        tables = T.match_buffer(tables_h, (N, MB), table_dt)
        lens = T.match_buffer(lens_h, (N,), lens_dt)
        cu = T.match_buffer(cu_h, (N1,), cu_dt)
        cos = T.match_buffer(cos_h, (ROPE_T, D), q_dt)
        sin = T.match_buffer(sin_h, (ROPE_T, D), q_dt)
        out = T.match_buffer(out_h, (TOKENS, H, D), q_dt)
        for work in T.parallel(tiles * N * HKV):
            qt = T.alloc_buffer((M, D), "float32", scope="local")
            acc = T.alloc_buffer((M, D), "float32", scope="local")
            kt = T.alloc_buffer((D, KC), "float32", scope="local")
            sc = T.alloc_buffer((M, KC), "float32", scope="local")
            blocks = T.alloc_buffer((KC,), "int64", scope="local")
            offsets = T.alloc_buffer((KC,), "int64", scope="local")
            peak = T.alloc_buffer((M,), "float32", scope="local")
            total = T.alloc_buffer((M,), "float32", scope="local")
            fresh = T.alloc_buffer((M,), "float32", scope="local")
            z = work // (N * HKV)
            n = work % (N * HKV) // HKV
            kv = work % HKV
            tile = T.Select(z % 2 == 0, z // 2, tiles - 1 - z // 2)
            start = T.Cast("int64", cu[n])
            q_len = T.Cast("int64", cu[n + 1]) - start
            context = T.Cast("int64", lens[n])
            q0 = tile * QT
            if q0 < q_len:
                rows = T.min(T.int64(QT), q_len - q0)
                first = context - q_len + q0  # last visible position of the tile's row 0
                for qi, g in T.grid(QT, GROUP):
                    for d in T.vectorized(D):
                        if s.rope:
                            qt[qi * GROUP + g, d] = _rotated(query, start + q0 + T.min(T.int64(qi), rows - 1),
                                                             kv * GROUP + g, cos, sin, d, half, D) * scale
                        else:
                            qt[qi * GROUP + g, d] = T.Cast("float32", query[
                                start + q0 + T.min(T.int64(qi), rows - 1), kv * GROUP + g, d]) * scale
                        acc[qi * GROUP + g, d] = T.float32(0.0)
                for r in range(M):
                    peak[r] = T.float32(-3.0e38)
                    total[r] = T.float32(0.0)
                for c in range((first + rows + (KC - 1)) // KC):
                    for j in range(KC):
                        pos = T.min(c * KC + j, first + rows - 1)  # past the end: a visible one, masked
                        blocks[j] = T.Cast("int64", tables[n, pos // BS])
                        offsets[j] = pos % BS
                        for d in range(D):
                            kt[d, j] = T.Cast("float32", cache[LAYER, 0, blocks[j], offsets[j], kv, d])
                    for rb in range(M // RB):
                        for ri in T.unroll(RB):
                            for j in T.vectorized(KC):
                                sc[rb * RB + ri, j] = T.float32(0.0)
                        for d in range(D):
                            for ri in T.unroll(RB):
                                for j in T.vectorized(KC):
                                    sc[rb * RB + ri, j] = sc[rb * RB + ri, j] + qt[rb * RB + ri, d] * kt[d, j]
                    for r in range(M):
                        for j in T.vectorized(KC):
                            sc[r, j] = T.Select(c * KC + j <= first + r // GROUP, sc[r, j], T.float32(-3.0e38))
                        fresh[r] = peak[r]
                        for j in range(KC):
                            fresh[r] = T.max(fresh[r], sc[r, j])
                        for j in T.vectorized(KC):
                            sc[r, j] = fastmath.exp(sc[r, j] - fresh[r])
                        total[r] = total[r] * fastmath.exp(peak[r] - fresh[r])
                        for d in T.vectorized(D):
                            acc[r, d] = acc[r, d] * fastmath.exp(peak[r] - fresh[r])
                        peak[r] = fresh[r]
                        for j in range(KC):
                            total[r] = total[r] + sc[r, j]
                    for rb, dc in T.grid(M // RB, D // DV):
                        for j in range(KC):
                            for ri in T.unroll(RB):
                                for dd in T.vectorized(DV):
                                    acc[rb * RB + ri, dc * DV + dd] = acc[rb * RB + ri, dc * DV + dd] + sc[
                                        rb * RB + ri, j] * T.Cast("float32", cache[
                                            LAYER, 1, blocks[j], offsets[j], kv, dc * DV + dd])
                store_tile(out, acc, total, start + q0, rows, kv, QT, GROUP, D, q_dt)

    return paged_attention_tiled


# ----------------------------------------------------------------------------- kernels
def generate(group: Graph) -> tuple:
    """(kernel name, {function name: TIR PrimFunc})."""
    node = single_node(group)
    spec = spec_of(node)
    name = f"{node.op}_bs{spec.block_size}_h{spec.kv_heads}_d{spec.head_dim}_l{spec.layer}" + ("_rope" if spec.rope else "")
    if node.op == "kv_cache_write":
        return name, {"main": kv_cache_write_func(spec), "serial": kv_cache_write_func(spec, parallel=False)}
    return name, {"main": paged_attention_tiled_func(spec, ROWS_PER_TILE),
                  "decode": paged_attention_tiled_func(spec, 1)}


def make_run(group: Graph, functions):
    node = single_node(group)
    spec, positions = spec_of(node), operand_positions(group, node)
    if node.op == "kv_cache_write":
        return _write_run(functions["main"], functions["serial"], positions, spec)
    return _attention_run(functions["main"], functions["decode"], positions, spec)


def _rope_tables(args: list, spec: CacheSpec, dtype) -> list:
    """cos and sin when rope=true; else empty stand-ins that the kernel never reads."""
    if spec.rope:
        return [kernel_ready(a) for a in args[-2:]]
    empty = torch.empty((0, spec.head_dim), dtype=dtype)
    return [empty, empty]


def _write_run(parallel, serial, positions: list, spec: CacheSpec):
    def run(*inputs):
        args = [inputs[i] for i in positions]
        cache = check_kernel_ready(args[0], "the KV cache")
        key, value, slots = (kernel_ready(a) for a in args[1:4])
        fn = serial if 2 * key.numel() < SERIAL_MAX else parallel
        fn(cache, key, value, slots, *_rope_tables(args, spec, key.dtype))
        return cache  # updated in place: the kernel wrote torch's storage

    return run


def _attention_run(tiled, decode, positions: list, spec: CacheSpec):
    def run(*inputs):
        args = [inputs[i] for i in positions]
        query = kernel_ready(args[0])
        out = torch.empty_like(query)
        cu = kernel_ready(args[4])
        cache = check_kernel_ready(args[1], "the KV cache")
        operands = (query, cache, kernel_ready(args[2]), kernel_ready(args[3]), cu,
                    *_rope_tables(args, spec, query.dtype))
        longest = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
        if longest > 1:
            tiled(*operands, -(-longest // ROWS_PER_TILE), out)
        elif longest == 1:
            decode(*operands, 1, out)  # one row per tile: the H/Hkv heads of a kv head share its keys
        return out

    return run


def program_call(group: Graph, forms: dict, operands: list, ctx):
    """`make_run` in the cpu program (program.py). The cache (its layer's view) is written
    in place. Attention: every sequence adds one token exactly when the token count equals
    the sequence count (decode: one row per tile); else ceil(tokens / ROWS_PER_TILE) tiles,
    a bound on the longest q_len (tiles past a sequence's rows do nothing)."""
    node = single_node(group)
    spec, positions = spec_of(node), operand_positions(group, node)
    args = [operands[at] for at in positions]
    types = [group.inputs[at].type for at in positions]
    dtype = tir_dtype(types[1 if node.op == "kv_cache_write" else 0].dtype)
    tables = args[-2:] if spec.rope else [ctx.empty((0, spec.head_dim), dtype)] * 2
    if node.op == "kv_cache_write":
        args = [*args[:4], *tables]
        work = 2 * ctx.numel(types[1])
        return ctx.choose([(work < SERIAL_MAX, lambda: ctx.inplace(forms["serial"], args, 0))],
                          lambda: ctx.inplace(forms["main"], args, 0))
    tokens, sequences = ctx.size(types[0].shape[0]), ctx.size(types[3].shape[0])
    shape = ctx.shape(types[0])
    operands = [*args[:5], *tables]
    tiles = ctx.prim((tokens + ROWS_PER_TILE - 1) // ROWS_PER_TILE)
    return ctx.choose([(tokens == sequences, lambda: ctx.call(forms["decode"], [*operands, ctx.prim(1)], shape, dtype))],
                      lambda: ctx.call(forms["main"], [*operands, tiles], shape, dtype))
