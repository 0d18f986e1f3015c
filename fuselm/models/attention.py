"""Paged-KV attention as two `torch.library` custom ops, with plain-torch references.

`fuselm::kv_cache_write` stores the new tokens' keys and values in the paged cache and
`fuselm::paged_attention` attends each sequence's new queries to its cached context.
To `torch.export` each op is one opaque node, so the decoder models reach the IR as two
attention nodes per layer whatever the cache layout.

Cache layout: `kv_cache[L, 2, NB, BS, Hkv, D]` (layer, key/value, block, offset in the
block, kv head, head dim); a token's slot is `block * BS + offset`.

The semantics live in `fuselm.ir.attention_reference` (the IR interpreter runs the same
functions); the custom ops only wrap them.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..ir.attention_reference import kv_cache_write as kv_cache_write_reference
from ..ir.attention_reference import paged_attention as paged_attention_reference

@torch.library.custom_op("fuselm::kv_cache_write", mutates_args=("kv_cache",))
def kv_cache_write(
    kv_cache: Tensor, key: Tensor, value: Tensor, slot_mapping: Tensor, layer: int
) -> None:
    kv_cache_write_reference(kv_cache, key, value, slot_mapping, layer)


@kv_cache_write.register_fake
def _kv_cache_write_fake(kv_cache, key, value, slot_mapping, layer) -> None:
    return None


@torch.library.custom_op("fuselm::paged_attention", mutates_args=())
def paged_attention(
    query: Tensor,
    kv_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    cu_seqlens_q: Tensor,
    layer: int,
    scale: float,
) -> Tensor:
    return paged_attention_reference(
        query, kv_cache, block_tables, context_lens, cu_seqlens_q, layer, scale
    )


@paged_attention.register_fake
def _paged_attention_fake(query, kv_cache, block_tables, context_lens, cu_seqlens_q, layer, scale):
    return torch.empty_like(query)


class PagedKV(NamedTuple):
    """The contract inputs every attention layer of a decoder needs."""

    kv_cache: Tensor
    slot_mapping: Tensor
    block_tables: Tensor
    context_lens: Tensor
    cu_seqlens_q: Tensor


def attend_paged(
    q: Tensor, k: Tensor, v: Tensor, paged: PagedKV, layer: int, scale: float
) -> Tensor:
    """Store this layer's k/v `[T, Hkv, D]`, then attend q `[T, H, D]`; returns `[T, H, D]`."""
    torch.ops.fuselm.kv_cache_write(paged.kv_cache, k, v, paged.slot_mapping, layer)
    return torch.ops.fuselm.paged_attention(
        q, paged.kv_cache, paged.block_tables, paged.context_lens, paged.cu_seqlens_q, layer, scale
    )
