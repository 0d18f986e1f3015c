"""Reference semantics of the paged KV cache ops (plain torch, slow and obvious).

Cache layout: `kv_cache[L, 2, NB, BS, Hkv, D]` (layer, key/value, block, offset in the
block, kv head, head dim); a token's slot is `block * BS + offset`. Sequence n owns
query rows `cu_seqlens_q[n] : cu_seqlens_q[n+1]`: the last q_len tokens of a context of
`context_lens[n]` tokens stored in blocks `block_tables[n]`; query i attends causally to
context positions `0 .. context_len - q_len + i`; query head h reads kv head
`h // (H // Hkv)`. The IR ops `kv_cache_write` / `paged_attention` and fuselm's torch
custom ops both run these functions.
"""
from __future__ import annotations

import torch
from torch import Tensor

KEY, VALUE = 0, 1


def kv_cache_write(
    kv_cache: Tensor, key: Tensor, value: Tensor, slot_mapping: Tensor, layer: int
) -> Tensor:
    """Write key/value `[T, Hkv, D]` into `kv_cache[layer]` at `slot_mapping` (in place).

    Slots < 0 mark padding tokens and are skipped. Returns `kv_cache`.
    """
    block_size = kv_cache.shape[3]
    real = slot_mapping >= 0
    slots = slot_mapping[real]
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[layer, KEY, blocks, offsets] = key[real].to(kv_cache.dtype)
    kv_cache[layer, VALUE, blocks, offsets] = value[real].to(kv_cache.dtype)
    return kv_cache


def paged_attention(
    query: Tensor,
    kv_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    cu_seqlens_q: Tensor,
    layer: int,
    scale: float,
) -> Tensor:
    """Causal attention of each sequence's queries `[T, H, D]` to its paged context.

    Sequence n owns query rows `cu_seqlens_q[n]:cu_seqlens_q[n+1]`: the last q_len tokens
    of a context of `context_lens[n]` tokens stored in blocks `block_tables[n]`.
    """
    output = torch.zeros_like(query)
    bounds = cu_seqlens_q.tolist()
    for n, context_len in enumerate(context_lens.tolist()):
        start, end = bounds[n], bounds[n + 1]
        if end == start:
            continue
        keys, values = gather_context(kv_cache, layer, block_tables[n], context_len)
        output[start:end] = causal_attention(query[start:end], keys, values, scale)
    return output


def gather_context(
    kv_cache: Tensor, layer: int, block_table: Tensor, context_len: int
) -> tuple[Tensor, Tensor]:
    """One sequence's cached keys and values, each `[context_len, Hkv, D]`."""
    block_size = kv_cache.shape[3]
    num_blocks = -(-context_len // block_size)
    blocks = block_table[:num_blocks].long()
    keys = kv_cache[layer, KEY, blocks].flatten(0, 1)[:context_len]
    values = kv_cache[layer, VALUE, blocks].flatten(0, 1)[:context_len]
    return keys, values


def causal_attention(query: Tensor, keys: Tensor, values: Tensor, scale: float) -> Tensor:
    """Queries `[Q, H, D]` as the last Q positions of keys/values `[C, Hkv, D]`, in fp32."""
    q_len, num_heads = query.shape[:2]
    context_len, kv_heads = keys.shape[:2]
    group = num_heads // kv_heads
    keys = keys.float().repeat_interleave(group, dim=1)
    values = values.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query.float(), keys) * scale
    query_positions = torch.arange(context_len - q_len, context_len, device=query.device)
    key_positions = torch.arange(context_len, device=query.device)
    visible = key_positions[None, :] <= query_positions[:, None]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, values).to(query.dtype)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of x [T, H, D] with cos/sin [T, D] (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
