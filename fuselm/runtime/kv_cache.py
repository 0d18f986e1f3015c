"""Paged KV cache bookkeeping: block tables, ref counts, prefix caching, copy-on-write.

The cache tensor `[L, 2, num_blocks, block_size, Hkv, D]` lives in the engine; this
module only decides which block holds which token. A token at position `p` of a
sequence lives in slot `block_table[p // block_size] * block_size + p % block_size`.

Design:
- Every block has a ref count: the number of block tables that hold it. Blocks with
  count 0 sit in the free list, least recently freed first; allocation takes from the
  front. The free list is an ordered dict used as a deque, so that a prefix hit can take a
  block out of the middle in O(1).
- Prefix caching: once a full block's K/V are written (`mark_computed`) it is registered
  under a chained hash, hash((parent block's hash, its token ids)), so equal tokens
  after a different prefix never match. A freed block keeps its hash: it stays a cache
  hit until allocation reuses it (LRU eviction). A hit compares the stored key too, not
  only the hash, to rule out collisions. `free` releases a table tail first, so the
  tail of a prompt is evicted before its head, which more prompts share.
- Copy-on-write: `fork` shares blocks (ref +1). Before a sequence writes positions,
  `allocate` swaps any shared block covering them for a fresh one and returns the
  (src, dst) pairs the engine must copy in the cache tensor first.
- `allocate` is all or nothing: it counts what it needs (`blocks_needed`) before it
  changes anything and returns None when the free list is too short.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable, Optional

import torch

BlockKey = tuple  # (parent block hash or None, tuple of token ids)


@dataclass
class KVCacheStats:
    prefix_queries: int = 0  # tokens looked up in the prefix cache
    prefix_hits: int = 0  # tokens served from it
    cow_copies: int = 0  # blocks copied on write

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


@dataclass
class _Block:
    ref_count: int = 0
    hash: Optional[int] = None  # set while registered in the prefix cache
    key: Optional[BlockKey] = None


@dataclass
class _SeqBlocks:
    table: list = field(default_factory=list)
    # chained hashes of the sequence's leading full blocks whose K/V are written
    block_hashes: list = field(default_factory=list)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = KVCacheStats()
        self._blocks = [_Block() for _ in range(num_blocks)]
        self._free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached_blocks: dict[int, int] = {}  # chained hash -> block id
        self._seqs: dict[Hashable, _SeqBlocks] = {}

    # -- queries ---------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free_blocks)

    def has(self, seq_id) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id) -> list[int]:
        return list(self._seq(seq_id).table)

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def slots(self, seq_id, start: int, end: int) -> list[int]:
        table, size = self._seq(seq_id).table, self.block_size
        if end > len(table) * size:
            raise IndexError(f"sequence {seq_id!r} holds {len(table) * size} slots, asked up to {end}")
        return [table[p // size] * size + p % size for p in range(start, end)]

    # -- prefix caching --------------------------------------------------------------

    def match_prefix(self, seq_id, token_ids: list[int]) -> int:
        """Attach cached full blocks matching the longest prefix of `token_ids`.

        Leaves at least one token to compute, so the last prompt token yields logits.
        Returns the number of tokens served from the cache (a multiple of block_size).
        """
        seq = self._seqs.setdefault(seq_id, _SeqBlocks())
        if seq.table:
            raise ValueError(f"match_prefix on sequence {seq_id!r}, which already holds blocks")
        if not self.enable_prefix_caching:
            return 0
        for block_hash, block_id in self._longest_cached_prefix(token_ids):
            self._take_block(block_id)
            seq.table.append(block_id)
            seq.block_hashes.append(block_hash)
        hit_tokens = len(seq.table) * self.block_size
        self.stats.prefix_queries += len(token_ids)
        self.stats.prefix_hits += hit_tokens
        return hit_tokens

    def _longest_cached_prefix(self, token_ids: list[int]) -> list[tuple[int, int]]:
        matched, parent = [], None
        for index in range((len(token_ids) - 1) // self.block_size):
            key = self._block_key(parent, token_ids, index)
            block_id = self._cached_blocks.get(hash(key))
            if block_id is None or self._blocks[block_id].key != key:
                break
            parent = hash(key)
            matched.append((parent, block_id))
        return matched

    def _block_key(self, parent: Optional[int], token_ids: list[int], index: int) -> BlockKey:
        start = index * self.block_size
        return (parent, tuple(token_ids[start:start + self.block_size]))

    def mark_computed(self, seq_id, token_ids: list[int], num_computed: int) -> None:
        """K/V of positions < num_computed are written: register their full blocks."""
        seq = self._seq(seq_id)
        if len(token_ids) < num_computed:
            raise ValueError(f"{num_computed} tokens computed but only {len(token_ids)} token ids given")
        if not self.enable_prefix_caching:
            return
        num_full = min(num_computed // self.block_size, len(seq.table))
        for index in range(len(seq.block_hashes), num_full):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            key = self._block_key(parent, token_ids, index)
            seq.block_hashes.append(hash(key))
            self._register(seq.table[index], key)

    def _register(self, block_id: int, key: BlockKey) -> None:
        block = self._blocks[block_id]
        if block.hash is not None or hash(key) in self._cached_blocks:
            return  # registered already, or an equal block is: keep that one
        block.hash, block.key = hash(key), key
        self._cached_blocks[block.hash] = block_id

    def _unregister(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.hash is not None and self._cached_blocks.get(block.hash) == block_id:
            del self._cached_blocks[block.hash]
        block.hash = block.key = None

    # -- allocation ------------------------------------------------------------------

    def blocks_needed(self, seq_id, num_computed: int, num_new: int) -> int:
        """How many blocks `allocate` would take from the free list."""
        grow, shared = self._needs(seq_id, num_computed, num_new)
        return grow + len(shared)

    def allocate(self, seq_id, num_computed: int, num_new: int) -> Optional[list[tuple[int, int]]]:
        """Own slots for positions [num_computed, num_computed + num_new).

        Returns the (src_block, dst_block) copies to apply to the cache before writing,
        or None, changing nothing, when the free list is too short.
        """
        if self._writes_own_fresh_block(seq_id, num_computed, num_new):
            return []  # the decode step's common case: nothing to take, copy or forget
        grow, shared = self._needs(seq_id, num_computed, num_new)
        if grow + len(shared) > self.num_free_blocks:
            return None
        seq = self._seqs.setdefault(seq_id, _SeqBlocks())
        copies = [self._copy_on_write(seq, index) for index in shared]
        self._forget_rewritten(seq, num_computed, num_new)
        seq.table.extend(self._pop_free_block() for _ in range(grow))
        return copies

    def _needs(self, seq_id, num_computed: int, num_new: int) -> tuple[int, list[int]]:
        """(fresh blocks to append, indices of shared blocks to copy) for writing the range."""
        table = self._seqs[seq_id].table if seq_id in self._seqs else []
        grow = max(0, self._blocks_for(num_computed + num_new) - len(table))
        return grow, self._shared_in_range(table, num_computed, num_new)

    def _writes_own_fresh_block(self, seq_id, num_computed: int, num_new: int) -> bool:
        """One new token into a block the sequence holds alone, with no hash registered."""
        seq = self._seqs.get(seq_id)
        if seq is None or num_new != 1 or num_computed >= len(seq.table) * self.block_size:
            return False
        index = num_computed // self.block_size
        block = self._blocks[seq.table[index]]
        return block.ref_count == 1 and block.hash is None and len(seq.block_hashes) <= index

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _shared_in_range(self, table: list[int], num_computed: int, num_new: int) -> list[int]:
        """Indices in `table` of shared blocks that positions [num_computed, +num_new) hit."""
        if num_new <= 0:
            return []
        first = num_computed // self.block_size
        last = min(len(table), self._blocks_for(num_computed + num_new))
        return [i for i in range(first, last) if self._blocks[table[i]].ref_count > 1]

    def _copy_on_write(self, seq: _SeqBlocks, index: int) -> tuple[int, int]:
        shared = seq.table[index]
        fresh = self._pop_free_block()
        self._blocks[shared].ref_count -= 1
        seq.table[index] = fresh
        self.stats.cow_copies += 1
        return shared, fresh

    def _forget_rewritten(self, seq: _SeqBlocks, num_computed: int, num_new: int) -> None:
        """Blocks about to be (re)written no longer hold what their hashes say."""
        if num_new <= 0:
            return
        first = num_computed // self.block_size
        del seq.block_hashes[first:]
        for block_id in seq.table[first:self._blocks_for(num_computed + num_new)]:
            self._unregister(block_id)  # each is owned by this sequence alone here

    def _pop_free_block(self) -> int:
        block_id, _ = self._free_blocks.popitem(last=False)
        self._unregister(block_id)  # evict its cached contents
        self._blocks[block_id].ref_count = 1
        return block_id

    def _take_block(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free_blocks[block_id]
        block.ref_count += 1

    def _release_block(self, block_id: int) -> None:
        block = self._blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free_blocks[block_id] = None  # keeps its hash: evictable cache

    # -- sequence lifetime -----------------------------------------------------------

    def fork(self, parent_id, child_id) -> None:
        """The child shares all of the parent's blocks; writes copy them (see allocate)."""
        parent = self._seq(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"cannot fork into sequence {child_id!r}: it already exists")
        for block_id in parent.table:
            self._take_block(block_id)
        self._seqs[child_id] = _SeqBlocks(list(parent.table), list(parent.block_hashes))

    def truncate(self, seq_id, num_tokens: int) -> None:
        """Keep positions < num_tokens; drop the blocks past them, tail first."""
        seq = self._seq(seq_id)
        keep = self._blocks_for(num_tokens)
        for block_id in reversed(seq.table[keep:]):
            self._release_block(block_id)
        del seq.table[keep:]
        del seq.block_hashes[num_tokens // self.block_size:]
        partial = num_tokens % self.block_size and len(seq.table) == keep
        if partial and self._blocks[seq.table[-1]].ref_count == 1:
            self._unregister(seq.table[-1])  # it will be rewritten

    def free(self, seq_id) -> None:
        """Release every block, tail first, so a prompt's tail is evicted before its head."""
        for block_id in reversed(self._seq(seq_id).table):
            self._release_block(block_id)
        del self._seqs[seq_id]

    def _seq(self, seq_id) -> _SeqBlocks:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}: the KV cache manager has no such sequence") from None


# -- sizing --------------------------------------------------------------------------


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of K and V that one token takes across all layers."""
    return 2 * config.num_hidden_layers * config.kv_heads * config.dim_per_head * dtype.itemsize


def num_blocks_for_budget(budget_bytes: int, config, block_size: int, dtype: torch.dtype) -> int:
    block_bytes = kv_bytes_per_token(config, dtype) * block_size
    num_blocks = int(budget_bytes) // block_bytes
    if num_blocks < 1:
        raise ValueError(
            f"kv_cache_bytes={budget_bytes} is less than one KV cache block ({block_bytes} bytes "
            f"for block_size={block_size}); raise kv_cache_bytes"
        )
    return num_blocks


def free_memory_budget(fraction: float, device) -> int:
    """`fraction` of the CUDA device's free memory, in bytes."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"memory fraction must be in (0, 1], got {fraction}")
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return int(free_bytes * fraction)
