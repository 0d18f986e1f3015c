"""Split-KV (FlashDecoding) kernels for paged_attention when each sequence has one query row.

Decode gives the prefill kernel one useful row in each BLOCK_M-row tile and only N x H
programs: with a few sequences and long contexts most of the GPU idles. Here each
sequence's context is cut into partitions of `partition` positions and one program per
(sequence, kv head, partition) attends the H/Hkv query heads that share the kv head,
as the rows of one tile (each K/V block is loaded once for the group). It writes its
partial row max and row sum (base 2) and the unnormalized output to fp32 scratch; a
second kernel, one program per (sequence, query head), merges the partitions
(log-sum-exp: out = sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s). With a single
partition the first kernel normalizes and writes the output itself.

The host does not read the lengths (no device sync, CUDA-graph friendly): the grid's
partition count comes from the table width, context <= MB * BS; a program whose
partition starts past what its rows see returns at once, and the merge reads only the
cdiv(visible, partition) partitions a row has. A sequence's rows are a loop, so the
kernels stay exact when T <= N puts a longer sequence beside empty ones (one row per
sequence otherwise).

`paged_attention.py` pastes these kernels and `launch_decode` into its module, beside
the helpers they call (mma, online_softmax_step, gather_kv, rope); its `launch` calls
`launch_decode` when T <= N.
"""
from __future__ import annotations

from .module import optional


def split_kernel(name: str, rope: bool, cast_kv: bool) -> str:
    return f'''@triton.jit
def {name}_split_kernel(
    # pointers
    q_ptr, cache_ptr, block_tables_ptr, context_lens_ptr, cu_seqlens_ptr, cos_ptr, sin_ptr,
    part_max_ptr, part_sum_ptr, part_out_ptr, out_ptr,
    # sizes
    KV_GROUP, head_dim, block_size, partition,
    # strides: q and out [T, H, D], the layer's cache [2, NB, BS, Hkv, D], block tables [N, MB], cos/sin [T, D],
    # partial max and sum [T, H, S], partial out [T, H, S, D]
    stride_qt, stride_qh, stride_qd,
    stride_ckv, stride_cb, stride_cs, stride_ch, stride_cd,
    stride_bt,
    stride_ct, stride_cosd, stride_st, stride_sind,
    stride_pt, stride_ph, stride_ps,
    stride_pot, stride_poh, stride_pos, stride_pod,
    stride_ot, stride_oh, stride_od,
    qk_scale,  # softmax scale * log2(e): the softmax runs on exp2
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
    ONE_SPLIT: tl.constexpr,  # a single partition: write the normalized output, no scratch
):
    """The query heads of one kv head against one partition of one sequence's context."""
    seq = tl.program_id(axis=0)
    kv_head = tl.program_id(axis=1)
    split = tl.program_id(axis=2)
    q_start = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    context_len = tl.load(context_lens_ptr + seq)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * KV_GROUP + offs_g  # the tile's rows: query heads reading this kv head
    g_mask = offs_g < KV_GROUP
    d_mask = offs_d < head_dim
    q_mask = g_mask[:, None] & d_mask[None, :]
    cache_head = cache_ptr + kv_head * stride_ch
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    split_start = split * partition
    first_row = tl.maximum(split_start - (context_len - q_len), 0)  # rows that see this partition
    for row in range(first_row, q_len):  # one row or none, unless T <= N put a long sequence beside empty ones
        token = (q_start + row).to(tl.int64)
        q_rows = q_ptr + token * stride_qt + heads[:, None] * stride_qh
        q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
        {optional(rope, "partner = tl.load(q_rows + rope_partner(offs_d, head_dim)[None, :] * stride_qd, mask=q_mask, other=0.0)")}
        {optional(rope, "cos = tl.load(cos_ptr + token * stride_ct + offs_d * stride_cosd, mask=d_mask, other=0.0).to(tl.float32)")}
        {optional(rope, "sin = tl.load(sin_ptr + token * stride_st + offs_d * stride_sind, mask=d_mask, other=0.0).to(tl.float32)")}
        {optional(rope, "q = apply_rope(q.to(tl.float32), partner.to(tl.float32), cos[None, :], sin[None, :], offs_d, head_dim).to(q.dtype)")}
        # the positions this row sees (causal) that fall in this partition
        split_end = tl.minimum(split_start + partition, context_len - q_len + row + 1)

        m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
        for start_n in range(split_start, split_end, BLOCK_N):
            keys = start_n + offs_n
            key_mask = keys < split_end
            k, v = gather_kv(cache_head, table, keys, key_mask, offs_d, d_mask, block_size, stride_ckv, stride_cb, stride_cs, stride_cd)
            {optional(cast_kv, "k = k.to(q.dtype)")}
            {optional(cast_kv, "v = v.to(q.dtype)")}
            scores = mma(q, k, tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32), UPCAST) * qk_scale
            scores = tl.where(key_mask[None, :], scores, float("-inf"))
            m_i, l_i, acc = online_softmax_step(scores, v, m_i, l_i, acc, UPCAST)

        if ONE_SPLIT:
            out_ptrs = out_ptr + token * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
            tl.store(out_ptrs, finish_softmax(acc, l_i).to(out_ptr.dtype.element_ty), mask=q_mask)
        else:
            part = token * stride_pt + heads * stride_ph + split * stride_ps
            tl.store(part_max_ptr + part, m_i, mask=g_mask)
            tl.store(part_sum_ptr + part, l_i, mask=g_mask)
            part_out = part_out_ptr + token * stride_pot + heads[:, None] * stride_poh + split * stride_pos
            tl.store(part_out + offs_d[None, :] * stride_pod, acc, mask=q_mask)
'''


def merge_kernel(name: str) -> str:
    return f'''@triton.jit
def {name}_merge_kernel(
    # pointers
    context_lens_ptr, cu_seqlens_ptr, part_max_ptr, part_sum_ptr, part_out_ptr, out_ptr,
    # sizes
    partition, head_dim,
    # strides: partial max and sum [T, H, S], partial out [T, H, S, D], out [T, H, D]
    stride_pt, stride_ph, stride_ps,
    stride_pot, stride_poh, stride_pos, stride_pod,
    stride_ot, stride_oh, stride_od,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One sequence and query head: merges the partitions' partial softmaxes of its rows."""
    seq = tl.program_id(axis=0)
    head = tl.program_id(axis=1)
    q_start = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    context_len = tl.load(context_lens_ptr + seq)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    for row in range(0, q_len):
        token = (q_start + row).to(tl.int64)
        part = token * stride_pt + head * stride_ph
        part_out = part_out_ptr + token * stride_pot + head * stride_poh
        num_splits = tl.cdiv(context_len - q_len + row + 1, partition)  # those the row sees
        peak = tl.full((BLOCK_S,), float("-inf"), dtype=tl.float32)
        for s0 in range(0, num_splits, BLOCK_S):  # first pass: the row max over all partitions
            splits = s0 + offs_s
            peak = tl.maximum(peak, tl.load(part_max_ptr + part + splits * stride_ps, mask=splits < num_splits, other=float("-inf")))
        m = tl.max(peak, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)  # no visible key anywhere: every weight is 0
        total = tl.zeros((BLOCK_S,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
        for s0 in range(0, num_splits, BLOCK_S):  # second pass: rescale to the row max and add up
            splits = s0 + offs_s
            s_mask = splits < num_splits
            weight = tl.exp2(tl.load(part_max_ptr + part + splits * stride_ps, mask=s_mask, other=float("-inf")) - m)
            total += weight * tl.load(part_sum_ptr + part + splits * stride_ps, mask=s_mask, other=0.0)
            partial = tl.load(part_out + splits[:, None] * stride_pos + offs_d[None, :] * stride_pod,
                              mask=s_mask[:, None] & d_mask[None, :], other=0.0)
            acc += weight[:, None] * partial
        out = tl.sum(acc, axis=0) / tl.maximum(tl.sum(total, axis=0), 1e-30)
        tl.store(out_ptr + token * stride_ot + head * stride_oh + offs_d * stride_od, out.to(out_ptr.dtype.element_ty), mask=d_mask)
'''


def host(name: str, config: dict) -> str:
    """`decode_partition` and `launch_decode`, the host side of the two kernels."""
    return f'''DECODE_CONFIG = {config}
PARTITION_SIZE = None  # context positions per partition; None: chosen per launch by decode_partition
PARTITION_RANGE = (64, 512)


def decode_partition(max_context, programs, device):
    """Positions per partition: a power of two in PARTITION_RANGE giving enough partitions
    that programs x partitions fill every SM about twice (FlashDecoding's rule)."""
    if PARTITION_SIZE:
        return PARTITION_SIZE
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    wanted = triton.cdiv(2 * sms, programs)
    low, high = PARTITION_RANGE
    return min(max(triton.next_power_of_2(triton.cdiv(max_context, wanted)), low), high)


def launch_decode(query, cache, block_tables, context_lens, cu_seqlens_q, cos, sin, out, rope_strides):
    """Split-KV decode: (sequence, kv head, partition) programs, then the merge if there are several."""
    T, H, D = query.shape
    N, MB = block_tables.shape
    BS, HKV = cache.shape[2], cache.shape[3]
    max_context = max(MB * BS, 1)  # the table bounds every context; the lengths stay on the device
    partition = decode_partition(max_context, N * HKV, query.device)
    splits = triton.cdiv(max_context, partition)
    part_max = part_sum = part_out = out  # unused with a single partition
    part_strides = (0,) * 7
    if splits > 1:
        part_max = torch.empty((T, H, splits), device=query.device, dtype=torch.float32)
        part_sum = torch.empty_like(part_max)
        part_out = torch.empty((T, H, splits, D), device=query.device, dtype=torch.float32)
        part_strides = (*part_max.stride(), *part_out.stride())
    block_d = max(16, triton.next_power_of_2(D))
    {name}_split_kernel[(N, HKV, splits)](
        query, cache, block_tables, context_lens, cu_seqlens_q, cos, sin, part_max, part_sum, part_out, out,
        H // HKV, D, BS, partition,
        *query.stride(), *cache.stride(), block_tables.stride(0), *rope_strides,
        *part_strides, *out.stride(),
        SCALE * 1.4426950408889634,
        BLOCK_G=max(16, triton.next_power_of_2(H // HKV)), BLOCK_N=min(DECODE_CONFIG["BLOCK_N"], partition),
        BLOCK_D=block_d, UPCAST=INTERPRETED and query.dtype == torch.bfloat16, ONE_SPLIT=splits == 1,
        num_warps=DECODE_CONFIG["num_warps"], num_stages=DECODE_CONFIG["num_stages"],
    )
    if splits > 1:
        {name}_merge_kernel[(N, H)](
            context_lens, cu_seqlens_q, part_max, part_sum, part_out, out,
            partition, D,
            *part_strides, *out.stride(),
            BLOCK_S=min(32, triton.next_power_of_2(splits)), BLOCK_D=block_d,
        )
    return out
'''
