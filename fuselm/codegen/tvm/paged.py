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
  parallel over (sequence, query head). For each of the sequence's query rows (the last
  q_len positions of its context, rotated when rope=true), one pass over its visible
  context with an online softmax: the block table is read once per position, the
  score is a vector dot product (one accumulator per lane), and the weighted sum of
  values is a vector update of the row accumulator. Query head h reads kv head
  h // (H / Hkv).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tvm.script import tirx as T

from ...ir.graph import Graph
from . import fastmath
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
        raise NotImplementedError(f"{node.op} needs static block size, heads and head dim: {cache}, {data}")
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
        cache = T.match_buffer(cache_h, (L, 2, NB, BS, HKV, D), cache_dt)
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
def paged_attention_func(s: CacheSpec):
    BS, HKV, D, H, LAYER = s.block_size, s.kv_heads, s.head_dim, s.heads, s.layer
    GROUP = H // HKV
    cache_dt, q_dt = s.cache_dtype, s.data_dtype
    table_dt, lens_dt, cu_dt = s.index_dtypes
    LANES = vector_lanes() if D % vector_lanes() == 0 else 1
    CHUNKS = D // LANES
    half = D // 2
    scale = T.float32(s.scale)

    @T.prim_func
    def paged_attention(query_h: T.handle, cache_h: T.handle, tables_h: T.handle, lens_h: T.handle,
                        cu_h: T.handle, cos_h: T.handle, sin_h: T.handle, out_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        TOKENS = T.int64()
        L = T.int64()
        NB = T.int64()
        N = T.int64()
        MB = T.int64()
        N1 = T.int64()
        ROPE_T = T.int64()
        query = T.match_buffer(query_h, (TOKENS, H, D), q_dt)
        cache = T.match_buffer(cache_h, (L, 2, NB, BS, HKV, D), cache_dt)
        tables = T.match_buffer(tables_h, (N, MB), table_dt)
        lens = T.match_buffer(lens_h, (N,), lens_dt)
        cu = T.match_buffer(cu_h, (N1,), cu_dt)
        cos = T.match_buffer(cos_h, (ROPE_T, D), q_dt)
        sin = T.match_buffer(sin_h, (ROPE_T, D), q_dt)
        out = T.match_buffer(out_h, (TOKENS, H, D), q_dt)
        for work in T.parallel(N * H):
            q = T.alloc_buffer((D,), "float32", scope="local")
            acc = T.alloc_buffer((D,), "float32", scope="local")
            lane_sums = T.alloc_buffer((LANES,), "float32", scope="local")
            running = T.alloc_buffer((3,), "float32", scope="local")  # max, sum of exp, score
            n = work // H
            h = work % H
            start = T.Cast("int64", cu[n])
            q_len = T.Cast("int64", cu[n + 1]) - start
            context = T.Cast("int64", lens[n])
            for qi in range(q_len):
                t = start + qi
                for d in T.vectorized(D):
                    if s.rope:
                        q[d] = _rotated(query, t, h, cos, sin, d, half, D) * scale
                    else:
                        q[d] = T.Cast("float32", query[t, h, d]) * scale
                    acc[d] = T.float32(0.0)
                running[0] = T.float32(-3.0e38)
                running[1] = T.float32(0.0)
                for pos in range(context - q_len + qi + 1):
                    block = T.Cast("int64", tables[n, pos // BS])
                    offset = pos % BS
                    for lane in T.vectorized(LANES):
                        lane_sums[lane] = T.float32(0.0)
                    for c in range(CHUNKS):
                        for lane in T.vectorized(LANES):
                            lane_sums[lane] = lane_sums[lane] + q[c * LANES + lane] * T.Cast(
                                "float32", cache[LAYER, 0, block, offset, h // GROUP, c * LANES + lane])
                    running[2] = T.float32(0.0)
                    for lane in range(LANES):
                        running[2] = running[2] + lane_sums[lane]
                    peak = T.max(running[0], running[2])
                    correction = fastmath.exp(running[0] - peak)
                    weight = fastmath.exp(running[2] - peak)
                    running[1] = running[1] * correction + weight
                    running[0] = peak
                    for d in T.vectorized(D):
                        acc[d] = acc[d] * correction + weight * T.Cast(
                            "float32", cache[LAYER, 1, block, offset, h // GROUP, d])
                for d in T.vectorized(D):
                    out[t, h, d] = T.Cast(q_dt, acc[d] / running[1])

    return paged_attention


# ----------------------------------------------------------------------------- kernels
def generate(group: Graph) -> tuple:
    """(kernel name, {function name: TIR PrimFunc})."""
    node = single_node(group)
    spec = spec_of(node)
    name = f"{node.op}_bs{spec.block_size}_h{spec.kv_heads}_d{spec.head_dim}_l{spec.layer}" + ("_rope" if spec.rope else "")
    if node.op == "kv_cache_write":
        return name, {"main": kv_cache_write_func(spec), "serial": kv_cache_write_func(spec, parallel=False)}
    return name, {"main": paged_attention_func(spec)}


def make_run(group: Graph, functions):
    node = single_node(group)
    spec, positions = spec_of(node), operand_positions(group, node)
    if node.op == "kv_cache_write":
        return _write_run(functions["main"], functions["serial"], positions, spec)
    return _attention_run(functions["main"], positions, spec)


def _rope_tables(args: list, spec: CacheSpec, dtype) -> list:
    """cos and sin when rope=true; else empty stand-ins that the kernel never reads."""
    if spec.rope:
        return [a.contiguous() for a in args[-2:]]
    empty = torch.empty((0, spec.head_dim), dtype=dtype)
    return [empty, empty]


def _write_run(parallel, serial, positions: list, spec: CacheSpec):
    def run(*inputs):
        args = [inputs[i] for i in positions]
        cache = args[0]
        key, value, slots = (a.contiguous() for a in args[1:4])
        fn = serial if 2 * key.numel() < SERIAL_MAX else parallel
        fn(cache, key, value, slots, *_rope_tables(args, spec, key.dtype))
        return cache  # updated in place: the kernel wrote torch's storage

    return run


def _attention_run(fn, positions: list, spec: CacheSpec):
    def run(*inputs):
        args = [inputs[i] for i in positions]
        query = args[0].contiguous()
        out = torch.empty_like(query)
        fn(query, args[1], *(a.contiguous() for a in args[2:5]), *_rope_tables(args, spec, query.dtype), out)
        return out

    return run
