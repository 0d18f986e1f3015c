"""paged_attention: causal variable-length attention over a paged KV cache.

Queries of N sequences are packed back to back ([T, H, D], sequence n owns rows
cu_seqlens_q[n]:cu_seqlens_q[n+1]); each sequence is the last q_len tokens of a
context of context_lens[n] tokens whose keys and values sit in the cache
[L, 2, NB, BS, Hkv, D] at the blocks block_tables[n] lists (semantics in
fuselm/ir/attention_reference.py). The kernel is flash attention with an online
softmax over BLOCK_N context positions at a time, gathered through the block table
(any block size), so cached context (q_len < context_len) works like a fresh prompt.

Programs: axis 0 numbers query blocks so that sequence n's blocks start at
cu_seqlens_q[n] // BLOCK_M + n, which bounds them by T // BLOCK_M + N without reading
the lengths on the host; each program finds its sequence by binary search over
cu_seqlens_q (`query_block`, shared with varlen_attention.py). Axis 1 is the query
head; head h reads kv head h // (H // Hkv).
With `rope=true` the queries are rotated (rotate-half, cos/sin [T, D]) as they are read.

Decode: when T <= N (at most one query row per sequence, empty sequences aside) the
host wrapper launches the split-KV kernels of paged_decode.py instead, from the same
module: the dispatch is a run-time test on the shapes, never a new compile.
"""
from __future__ import annotations

from ...errors import UnsupportedKernelError
from ...ir.graph import Node
from ...ir.types import dim_str
from . import paged_decode
from .device_functions import ONLINE_SOFTMAX, QUERY_BLOCK, ROPE, mma_source
from .module import GeneratedKernel, drop_omitted, number_token, optional, torch_dtype_name

OPS = ("paged_attention",)

_CONFIGS = {  # BLOCK_M = 16 when sequences average at most 2 new tokens (decode-like)
    "half": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    "f32": dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
}
_DECODE_CONFIGS = {  # the split-KV kernel's tile is the H/Hkv heads of a group (>= 16 rows) x BLOCK_N keys
    "half": dict(BLOCK_N=64, num_warps=4, num_stages=2),
    "f32": dict(BLOCK_N=32, num_warps=4, num_stages=2),
}


GATHER_KV = '''@triton.jit
def gather_kv(cache_head, table, keys, key_mask, offs_d, d_mask, block_size, stride_ckv, stride_cb, stride_cs, stride_cd):
    """Keys [BLOCK_D, BLOCK_N] (transposed) and values [BLOCK_N, BLOCK_D] of context positions
    `keys` of one kv head, found through the sequence's block table (any block size)."""
    block = tl.load(table + keys // block_size, mask=key_mask, other=0).to(tl.int64)
    slots = block * stride_cb + (keys % block_size) * stride_cs
    k = tl.load(cache_head + slots[None, :] + offs_d[:, None] * stride_cd, mask=key_mask[None, :] & d_mask[:, None], other=0.0)
    v = tl.load(cache_head + stride_ckv + slots[:, None] + offs_d[None, :] * stride_cd, mask=key_mask[:, None] & d_mask[None, :], other=0.0)
    return k, v
'''


def generate(node: Node) -> GeneratedKernel:
    query, cache = node.inputs[0].type, node.inputs[1].type
    rope, layer, scale = bool(node.attrs.get("rope", False)), int(node.attrs["layer"]), node.attrs["scale"]
    if query.dtype not in ("f32", "f16", "bf16") or cache.rank != 6:
        raise UnsupportedKernelError(f"paged_attention kernels take float queries and a [L,2,NB,BS,Hkv,D] cache, got {query}, {cache}")
    heads, kv_heads, head_dim = query.shape[1], cache.shape[4], query.shape[2]
    parts = ["paged_attention", f"h{dim_str(heads)}", f"kv{dim_str(kv_heads)}", f"d{dim_str(head_dim)}",
             f"layer{layer}", *(["rope"] if rope else []), f"scale{number_token(scale)}", query.dtype]
    if cache.dtype != query.dtype:
        parts.append(f"cache{cache.dtype}")
    name = "_".join(parts)
    params = ("query", "kv_cache", "block_tables", "context_lens", "cu_seqlens_q", *(("cos", "sin") if rope else ()))
    helpers = [mma_source(query.dtype), ONLINE_SOFTMAX, QUERY_BLOCK, GATHER_KV] + ([ROPE] if rope else [])
    kind = "f32" if query.dtype == "f32" else "half"
    cast_kv = cache.dtype != query.dtype
    body = "\n\n".join(helpers + [
        _kernel(name, rope, cast_kv), paged_decode.split_kernel(name, rope, cast_kv), paged_decode.merge_kernel(name),
        _launch(name, params, rope, layer, scale, _CONFIGS[kind], torch_dtype_name(node.type.dtype)),
        paged_decode.host(name, _DECODE_CONFIGS[kind])])
    summary = (f"causal varlen attention of {heads} query heads to {kv_heads} kv heads of {head_dim} in cache layer "
               f"{layer}{', rope on the queries' if rope else ''}, {query.dtype}")
    return GeneratedKernel(name, summary, drop_omitted(body), params)


def _kernel(name: str, rope: bool, cast_kv: bool) -> str:
    return f'''@triton.jit(do_not_specialize=["num_seqs"])  # the batch varies: no recompiles
def {name}_kernel(
    # pointers
    q_ptr, cache_ptr, block_tables_ptr, context_lens_ptr, cu_seqlens_ptr, cos_ptr, sin_ptr, out_ptr,
    # sizes
    num_seqs, KV_GROUP, head_dim, block_size,
    # strides: q and out [T, H, D], the layer's cache [2, NB, BS, Hkv, D], block tables [N, MB], cos/sin [T, D]
    stride_qt, stride_qh, stride_qd,
    stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd,
    stride_bt,
    stride_ct, stride_cosd, stride_st, stride_sind,
    stride_ot, stride_oh, stride_od,
    qk_scale,  # softmax scale * log2(e): the softmax runs on exp2
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
):
    """BLOCK_M query rows of one sequence and head against the context they may see."""
    pid = tl.program_id(axis=0)
    head = tl.program_id(axis=1)
    kv_head = head // KV_GROUP
    seq, q_start, q_len, start_m = query_block(cu_seqlens_ptr, num_seqs, pid, BLOCK_M)
    context_len = tl.load(context_lens_ptr + seq)

    rows = start_m + tl.arange(0, BLOCK_M)  # query index within the sequence
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = rows < q_len
    d_mask = offs_d < head_dim
    tokens = (q_start + rows).to(tl.int64)
    q_mask = row_mask[:, None] & d_mask[None, :]
    q_rows = q_ptr + tokens[:, None] * stride_qt + head * stride_qh
    q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
    {optional(rope, "partner = tl.load(q_rows + rope_partner(offs_d, head_dim)[None, :] * stride_qd, mask=q_mask, other=0.0)")}
    {optional(rope, "cos = tl.load(cos_ptr + tokens[:, None] * stride_ct + offs_d[None, :] * stride_cosd, mask=q_mask, other=0.0)")}
    {optional(rope, "sin = tl.load(sin_ptr + tokens[:, None] * stride_st + offs_d[None, :] * stride_sind, mask=q_mask, other=0.0)")}
    {optional(rope, "q = apply_rope(q.to(tl.float32), partner.to(tl.float32), cos.to(tl.float32), sin.to(tl.float32), offs_d, head_dim).to(q.dtype)")}
    positions = context_len - q_len + rows  # where each query sits in its context

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # causal: the block's last query sees up to its own position; empty blocks see nothing
    hi_n = tl.minimum(context_len, context_len - q_len + start_m + BLOCK_M)
    hi_n = tl.where(start_m < q_len, hi_n, 0)
    cache_head = cache_ptr + kv_head * stride_ch
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start_n in range(0, hi_n, BLOCK_N):
        keys = start_n + offs_n
        key_mask = keys < context_len
        k, v = gather_kv(cache_head, table, keys, key_mask, offs_d, d_mask, block_size, stride_ckv, stride_cb, stride_cs, stride_cd)
        {optional(cast_kv, "k = k.to(q.dtype)")}
        {optional(cast_kv, "v = v.to(q.dtype)")}
        scores = mma(q, k, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST) * qk_scale
        visible = row_mask[:, None] & key_mask[None, :] & (keys[None, :] <= positions[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_i, l_i, acc = online_softmax_step(scores, v, m_i, l_i, acc, UPCAST)

    out = finish_softmax(acc, l_i)
    out_ptrs = out_ptr + tokens[:, None] * stride_ot + head * stride_oh + offs_d[None, :] * stride_od
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)
'''


def _launch(name: str, params: tuple, rope: bool, layer: int, scale: float, config: dict, out_dtype: str) -> str:
    rope_strides = "*cos.stride(), *sin.stride()" if rope else "0, 0, 0, 0"
    return f'''LAYER = {layer}
SCALE = {scale!r}
CONFIG = {config}
SPLIT_KV_DECODE = True  # False sends decode batches to the prefill kernel too (benchmarks compare)


def launch({", ".join(params)}):
    """Checks, allocates out[T, H, D] (zeros: rows outside every sequence stay 0), launches
    the split-KV decode kernels when T <= N, else the prefill kernel."""
    T, H, D = query.shape
    L, _, NB, BS, HKV, _ = kv_cache.shape
    N = context_lens.shape[0]
    assert kv_cache.shape[1] == 2 and kv_cache.shape[5] == D and H % HKV == 0 and 0 <= LAYER < L
    assert cu_seqlens_q.shape == (N + 1,) and block_tables.shape[0] == N and block_tables.stride(1) == 1
    assert cu_seqlens_q.is_contiguous() and context_lens.is_contiguous()
    {optional(rope, "assert cos.shape == (T, D) and sin.shape == (T, D)")}
    {optional(not rope, "cos = sin = query  # unused")}
    out = torch.zeros((T, H, D), device=query.device, dtype={out_dtype})
    if T == 0 or N == 0:
        return out
    cache = kv_cache[LAYER]  # torch computes the layer's offset (no int32 overflow in the kernel)
    if SPLIT_KV_DECODE and T <= N:  # one query row per sequence: decode
        return launch_decode(query, cache, block_tables, context_lens, cu_seqlens_q, cos, sin, out, ({rope_strides}))
    cfg = dict(CONFIG, BLOCK_M=16) if T <= 2 * N else CONFIG
    grid = (T // cfg["BLOCK_M"] + N, H)
    {name}_kernel[grid](
        query, cache, block_tables, context_lens, cu_seqlens_q, cos, sin, out,
        N, H // HKV, D, BS,
        *query.stride(), *cache.stride(), block_tables.stride(0), {rope_strides}, *out.stride(),
        SCALE * 1.4426950408889634,
        BLOCK_D=max(16, triton.next_power_of_2(D)), UPCAST=INTERPRETED and query.dtype == torch.bfloat16, **cfg,
    )
    return out
'''
