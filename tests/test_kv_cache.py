"""Tests of the paged KV cache manager: slots, all-or-nothing allocation, prefix caching,
copy-on-write forks, truncation, and a randomized stress test against a model cache."""
import random
from collections import Counter

import pytest
import torch

from fuselm.models.config import LlamaConfig
from fuselm.runtime.kv_cache import (
    KVCacheManager,
    free_memory_budget,
    kv_bytes_per_token,
    num_blocks_for_budget,
)


def prefill(mgr, seq_id, tokens):
    """Match the prefix, allocate the rest, mark it computed; returns the cache hit."""
    hit = mgr.match_prefix(seq_id, tokens)
    assert mgr.allocate(seq_id, hit, len(tokens) - hit) == []
    mgr.mark_computed(seq_id, tokens, len(tokens))
    return hit


def check_ref_counts(mgr, seq_ids):
    held = Counter(block for seq_id in seq_ids for block in mgr.block_table(seq_id))
    for block in range(mgr.num_blocks):
        assert mgr.ref_count(block) == held[block], f"block {block}"
    assert set(mgr._free_blocks) == {b for b in range(mgr.num_blocks) if held[b] == 0}
    assert mgr.num_free_blocks + mgr.num_used_blocks == mgr.num_blocks


# -- allocation and slots ----------------------------------------------------------------


def test_allocate_grows_table_and_maps_slots():
    mgr = KVCacheManager(num_blocks=8, block_size=16)
    assert mgr.allocate("a", 0, 20) == []
    table = mgr.block_table("a")
    assert len(table) == 2 and mgr.num_used_blocks == 2 and mgr.num_free_blocks == 6
    assert mgr.slots("a", 0, 20) == [table[p // 16] * 16 + p % 16 for p in range(20)]
    assert mgr.allocate("a", 20, 12) == [] and len(mgr.block_table("a")) == 2  # fits
    assert mgr.allocate("a", 32, 1) == [] and len(mgr.block_table("a")) == 3
    assert mgr.slots("a", 32, 33) == [mgr.block_table("a")[2] * 16]
    with pytest.raises(IndexError):
        mgr.slots("a", 40, 49)


def test_block_size_one_allocates_per_token():
    mgr = KVCacheManager(num_blocks=10, block_size=1)
    mgr.allocate("a", 0, 5)
    mgr.allocate("b", 0, 2)
    mgr.allocate("a", 5, 1)
    assert mgr.slots("a", 0, 6) == mgr.block_table("a") and len(set(mgr.block_table("a"))) == 6
    assert mgr.num_free_blocks == 2
    tokens = [3, 1, 4, 1, 5]
    mgr.mark_computed("a", tokens + [9], 6)
    assert mgr.match_prefix("c", tokens) == 4  # one token left to compute
    assert mgr.block_table("c") == mgr.block_table("a")[:4]


def test_blocks_needed_matches_what_allocate_takes():
    mgr = KVCacheManager(num_blocks=16, block_size=4)
    for computed, new in [(0, 5), (5, 3), (8, 1), (9, 10)]:
        need, free = mgr.blocks_needed("a", computed, new), mgr.num_free_blocks
        mgr.allocate("a", computed, new)
        assert free - mgr.num_free_blocks == need
    assert mgr.blocks_needed("a", 19, 1) == 0 and mgr.blocks_needed("new", 0, 9) == 3


def test_allocation_is_all_or_nothing():
    mgr = KVCacheManager(num_blocks=4, block_size=4)
    mgr.allocate("a", 0, 12)
    assert mgr.allocate("b", 0, 8) is None
    assert not mgr.has("b") and mgr.num_free_blocks == 1
    assert mgr.allocate("a", 12, 5) is None
    assert len(mgr.block_table("a")) == 3 and mgr.num_free_blocks == 1
    assert mgr.allocate("a", 12, 4) == [] and mgr.num_free_blocks == 0


def test_copy_on_write_is_all_or_nothing():
    mgr = KVCacheManager(num_blocks=4, block_size=4)
    mgr.allocate("p", 0, 6)
    mgr.fork("p", "c")
    mgr.allocate("x", 0, 8)  # the free list is now empty
    assert mgr.allocate("c", 6, 1) is None
    assert mgr.block_table("c") == mgr.block_table("p") and mgr.stats.cow_copies == 0


def test_free_returns_every_block():
    mgr = KVCacheManager(num_blocks=12, block_size=4)
    prefill(mgr, "a", list(range(9)))
    prefill(mgr, "b", list(range(9)) + [7, 7, 7])
    mgr.fork("b", "c")
    mgr.allocate("c", 12, 3)
    for seq_id in ["a", "b", "c"]:
        mgr.free(seq_id)
    assert mgr.num_free_blocks == mgr.num_blocks and mgr.num_used_blocks == 0
    check_ref_counts(mgr, [])


def test_unknown_ids_and_existing_fork_target_raise():
    mgr = KVCacheManager(num_blocks=4, block_size=4)
    with pytest.raises(KeyError, match="unknown sequence"):
        mgr.free("ghost")
    with pytest.raises(KeyError, match="unknown sequence"):
        mgr.fork("ghost", "child")
    mgr.allocate("a", 0, 3)  # an unknown id is created by allocate
    mgr.allocate("b", 0, 3)
    with pytest.raises(ValueError, match="already exists"):
        mgr.fork("a", "b")
    with pytest.raises(ValueError, match="already holds blocks"):
        mgr.match_prefix("a", [1, 2, 3, 4, 5])


# -- prefix caching ----------------------------------------------------------------------


def test_shared_prefix_is_served_from_cache():
    mgr = KVCacheManager(num_blocks=32, block_size=16)
    shared = list(range(100))
    assert prefill(mgr, "a", shared + [1000, 1001]) == 0
    second = shared + [2000, 2001, 2002]
    assert prefill(mgr, "b", second) == (100 // 16) * 16
    assert mgr.stats.prefix_queries == 102 + len(second)
    assert mgr.stats.prefix_hits == 96
    assert mgr.block_table("b")[:6] == mgr.block_table("a")[:6]
    assert all(mgr.ref_count(block) == 2 for block in mgr.block_table("a")[:6])
    check_ref_counts(mgr, ["a", "b"])


def test_prefix_hit_leaves_one_token_to_compute():
    mgr = KVCacheManager(num_blocks=8, block_size=16)
    prefill(mgr, "a", list(range(32)))
    assert mgr.match_prefix("b", list(range(32))) == 16
    assert mgr.match_prefix("c", list(range(33))) == 32


def test_hash_is_chained_on_the_prefix():
    mgr = KVCacheManager(num_blocks=8, block_size=4)
    x, y = [1, 2, 3, 4], [5, 6, 7, 8]
    prefill(mgr, "a", x + y + [0])
    # y's block is cached after x; after a different prefix it must not hit
    assert mgr.match_prefix("b", y + y + [0]) == 0
    assert mgr.match_prefix("c", x + y + [9]) == 8


def test_hit_verifies_token_ids_not_only_the_hash():
    mgr = KVCacheManager(num_blocks=8, block_size=4)
    prefill(mgr, "a", [1, 2, 3, 4, 0])
    other_key = (None, (9, 9, 9, 9))
    mgr._cached_blocks[hash(other_key)] = mgr.block_table("a")[0]  # a forged collision
    assert mgr.match_prefix("b", [9, 9, 9, 9, 0]) == 0


def test_hit_on_a_freed_but_cached_block():
    mgr = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(13))
    prefill(mgr, "a", prompt)
    table = mgr.block_table("a")
    mgr.free("a")
    assert mgr.num_free_blocks == 8
    assert mgr.match_prefix("b", prompt) == 12
    assert mgr.block_table("b") == table[:3] and mgr.num_free_blocks == 5
    assert all(mgr.ref_count(block) == 1 for block in table[:3])
    check_ref_counts(mgr, ["b"])


def test_lru_eviction_takes_least_recent_and_tail_blocks_first():
    mgr = KVCacheManager(num_blocks=4, block_size=4)
    prompt = list(range(9))  # two full blocks and a partial one
    prefill(mgr, "a", prompt)
    first, second, partial = mgr.block_table("a")
    mgr.free("a")  # tail first: the free list is [3, partial, second, first]
    assert list(mgr._free_blocks) == [3, partial, second, first]
    mgr.allocate("b", 0, 8)  # takes 3 and the uncached partial block
    assert mgr.match_prefix("probe", prompt) == 8
    mgr.free("probe")  # both cached blocks are back, now most recently freed
    mgr.allocate("c", 0, 1)  # the free list runs dry of uncached blocks: evicts one
    assert mgr.block_table("c") == [second]
    assert mgr.match_prefix("d", prompt) == 4 and mgr.block_table("d") == [first]
    assert mgr.num_free_blocks == 0


def test_mark_computed_keeps_the_block_registered_first():
    mgr = KVCacheManager(num_blocks=8, block_size=4)
    prompt = [1, 2, 3, 4, 5]
    for seq_id in ["a", "b"]:  # prefilled in one batch: neither could hit
        mgr.allocate(seq_id, 0, len(prompt))
    for seq_id in ["a", "b"]:
        mgr.mark_computed(seq_id, prompt, len(prompt))
    mgr.mark_computed("a", prompt, len(prompt))  # again: nothing changes
    mgr.free("b")
    assert mgr.match_prefix("c", prompt) == 4
    assert mgr.block_table("c") == mgr.block_table("a")[:1]


def test_prefix_caching_can_be_disabled():
    mgr = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    prefill(mgr, "a", list(range(9)))
    assert mgr.match_prefix("b", list(range(9))) == 0
    assert mgr.stats.prefix_hits == 0 and mgr._cached_blocks == {}


# -- fork and copy-on-write --------------------------------------------------------------


def test_fork_then_write_copies_the_shared_partial_block():
    mgr = KVCacheManager(num_blocks=8, block_size=4)
    mgr.allocate("p", 0, 6)
    full, partial = mgr.block_table("p")
    mgr.fork("p", "c")
    assert mgr.block_table("c") == [full, partial] and mgr.ref_count(partial) == 2
    copies = mgr.allocate("c", 6, 1)
    assert len(copies) == 1 and copies[0][0] == partial
    fresh = copies[0][1]
    assert mgr.block_table("c") == [full, fresh] and mgr.block_table("p") == [full, partial]
    assert mgr.ref_count(full) == 2 and mgr.ref_count(partial) == 1 and mgr.ref_count(fresh) == 1
    assert mgr.stats.cow_copies == 1
    assert mgr.allocate("p", 6, 1) == []  # the parent owns its block alone now
    check_ref_counts(mgr, ["p", "c"])


def test_copy_on_write_keeps_parent_data_in_a_real_cache_tensor():
    layers, heads, dim, size = 2, 2, 3, 4
    mgr = KVCacheManager(num_blocks=6, block_size=size)
    cache = torch.zeros(layers, 2, mgr.num_blocks, size, heads, dim)
    flat = cache.view(layers, 2, mgr.num_blocks * size, heads, dim)  # slot-indexed view

    def write(seq_id, position, value):
        flat[:, :, mgr.slots(seq_id, position, position + 1)[0]] = value

    def read(seq_id, end):
        return flat[:, :, mgr.slots(seq_id, 0, end)].clone()

    mgr.allocate("p", 0, 6)
    for position in range(6):
        write("p", position, float(position + 1))
    parent_before = read("p", 6)
    mgr.fork("p", "c")
    for src, dst in mgr.allocate("c", 6, 1):
        cache[:, :, dst] = cache[:, :, src]
    write("c", 6, -1.0)
    assert torch.equal(read("p", 6), parent_before)
    assert torch.equal(read("c", 6), parent_before)
    assert mgr.allocate("p", 6, 1) == []
    write("p", 6, 7.0)
    assert torch.all(read("c", 7)[:, :, 6] == -1.0) and torch.all(read("p", 7)[:, :, 6] == 7.0)


# -- truncate ----------------------------------------------------------------------------


def test_truncate_drops_whole_blocks_past_the_end():
    mgr = KVCacheManager(num_blocks=8, block_size=4)
    mgr.allocate("a", 0, 10)
    table = mgr.block_table("a")
    mgr.truncate("a", 7)
    assert mgr.block_table("a") == table[:2] and mgr.num_free_blocks == 6
    mgr.truncate("a", 4)
    assert mgr.block_table("a") == table[:1]
    mgr.truncate("a", 0)
    assert mgr.block_table("a") == [] and mgr.num_free_blocks == 8
    assert mgr.allocate("a", 0, 2) == []


def test_truncate_unregisters_a_kept_partial_block():
    mgr = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(9))
    prefill(mgr, "a", prompt)
    mgr.truncate("a", 6)  # block 1 will be rewritten: no longer a cache entry
    assert mgr.match_prefix("b", prompt) == 4
    mgr.allocate("a", 6, 2)
    mgr.mark_computed("a", prompt[:6] + [60, 70], 8)
    assert mgr.match_prefix("c", prompt[:6] + [60, 70, 0]) == 8


def test_truncate_keeps_a_shared_partial_block_registered():
    mgr = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(9))
    prefill(mgr, "a", prompt)
    mgr.fork("a", "b")
    mgr.truncate("b", 6)
    assert mgr.match_prefix("c", prompt) == 8  # a still holds what the hash says
    copies = mgr.allocate("b", 6, 1)
    assert copies == [(mgr.block_table("a")[1], mgr.block_table("b")[1])]
    check_ref_counts(mgr, ["a", "b", "c"])


# -- randomized stress -------------------------------------------------------------------


class CacheModel:
    """Drives a manager like an engine would; the cache holds, at each slot, the whole
    prefix up to that token (K/V depend on all earlier tokens), so any wrong sharing,
    copy or prefix hit shows up as a wrong read."""

    def __init__(self, mgr: KVCacheManager, rng: random.Random):
        self.mgr, self.rng = mgr, rng
        self.cache = [None] * (mgr.num_blocks * mgr.block_size)
        self.tokens: dict[int, list[int]] = {}
        self.next_id = 0

    def write(self, seq_id, tokens, start):
        """Allocate and write tokens[start:]; False when out of blocks."""
        need, free = self.mgr.blocks_needed(seq_id, start, len(tokens) - start), self.mgr.num_free_blocks
        table = self.mgr.block_table(seq_id) if self.mgr.has(seq_id) else None
        copies = self.mgr.allocate(seq_id, start, len(tokens) - start)
        if copies is None:
            assert need > free
            assert (self.mgr.block_table(seq_id) if self.mgr.has(seq_id) else None) == table
            return False
        assert free - self.mgr.num_free_blocks == need
        size = self.mgr.block_size
        for src, dst in copies:
            self.cache[dst * size:(dst + 1) * size] = self.cache[src * size:(src + 1) * size]
        for position, slot in enumerate(self.mgr.slots(seq_id, start, len(tokens)), start):
            assert self.mgr.ref_count(slot // size) == 1, "writing into a shared block"
            self.cache[slot] = tuple(tokens[:position + 1])
        self.mgr.mark_computed(seq_id, tokens, len(tokens))
        self.tokens[seq_id] = tokens
        return True

    def read(self, seq_id, end):
        return [self.cache[slot] for slot in self.mgr.slots(seq_id, 0, end)]

    def add(self, prefixes):
        seq_id, self.next_id = self.next_id, self.next_id + 1
        prompt = self.rng.choice(prefixes)[: self.rng.randint(0, 30)]
        prompt = prompt + [self.rng.randrange(3) for _ in range(self.rng.randint(1, 10))]
        hit = self.mgr.match_prefix(seq_id, prompt)
        assert hit % self.mgr.block_size == 0 and hit < len(prompt)
        assert self.read(seq_id, hit) == [tuple(prompt[:p + 1]) for p in range(hit)]
        if not self.write(seq_id, prompt, hit):
            self.mgr.free(seq_id)

    def decode(self, seq_id):
        self.write(seq_id, self.tokens[seq_id] + [self.rng.randrange(3)], len(self.tokens[seq_id]))

    def fork(self, seq_id):
        child, self.next_id = self.next_id, self.next_id + 1
        self.mgr.fork(seq_id, child)
        self.tokens[child] = list(self.tokens[seq_id])

    def truncate(self, seq_id):
        keep = self.rng.randint(0, len(self.tokens[seq_id]))
        self.mgr.truncate(seq_id, keep)
        self.tokens[seq_id] = self.tokens[seq_id][:keep]

    def free(self, seq_id):
        self.mgr.free(seq_id)
        del self.tokens[seq_id]

    def check(self):
        check_ref_counts(self.mgr, list(self.tokens))
        for seq_id, tokens in self.tokens.items():
            assert self.read(seq_id, len(tokens)) == [tuple(tokens[:p + 1]) for p in range(len(tokens))]
        size = self.mgr.block_size
        for block in self.mgr._cached_blocks.values():  # cache entries, live or evictable
            cached = self.cache[block * size:(block + 1) * size]
            assert all(entry is not None for entry in cached)
            assert tuple(entry[-1] for entry in cached) == self.mgr._blocks[block].key[1]


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_operations_keep_the_invariants(block_size, seed):
    rng = random.Random(seed)
    mgr = KVCacheManager(num_blocks=max(8, 160 // block_size), block_size=block_size)
    model = CacheModel(mgr, rng)
    prefixes = [[rng.randrange(3) for _ in range(30)] for _ in range(3)]
    for _ in range(400):
        op = rng.choice(["add", "add", "decode", "decode", "decode", "fork", "truncate", "free"])
        if op == "add" or not model.tokens:
            model.add(prefixes)
        else:
            getattr(model, op)(rng.choice(list(model.tokens)))
        model.check()
    for seq_id in list(model.tokens):
        model.free(seq_id)
    assert mgr.num_free_blocks == mgr.num_blocks
    assert mgr.stats.prefix_hits > 0
    assert mgr.stats.cow_copies > 0 or block_size == 1  # one-token blocks are never partial


# -- sizing ------------------------------------------------------------------------------


def test_kv_bytes_per_token_and_blocks_for_budget():
    config = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         hidden_size=576)
    per_token = 2 * 30 * 3 * 64 * 2
    assert kv_bytes_per_token(config, torch.float16) == per_token
    assert kv_bytes_per_token(config, torch.float32) == 2 * per_token
    assert num_blocks_for_budget(per_token * 16 * 10 + 5, config, 16, torch.float16) == 10
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        num_blocks_for_budget(per_token * 15, config, 16, torch.float16)


def test_free_memory_budget_takes_a_fraction_of_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 4000))
    assert free_memory_budget(0.5, "cuda") == 500
    with pytest.raises(ValueError):
        free_memory_budget(0.0, "cuda")
