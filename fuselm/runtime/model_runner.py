"""Turns a scheduled batch into the LM forward contract and runs the compiled model.

The runner owns the paged KV cache tensor `[L, 2, NB, BS, Hkv, D]`; the compiled
model's `kv_cache_write` kernels fill it in place. For each scheduled request the
batch holds the tokens at positions `start .. start + num_new - 1`, packed back to back
(no padding); their slots come from the request's block table, and the one logits
row per request is its last new token (only the rows of requests that complete are
sampled; a partial prefill chunk's row is computed and dropped, which keeps the
lm_head's row count equal to the sequence count).

With `decode_graphs` (cuda), a batch in which every request adds one token replays the
captured forward of its batch-size bucket instead (cuda_graphs.py).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..models.contract import LMInputs, make_kv_cache
from .cuda_graphs import DecodeGraphs, logits_of
from .kv_cache import KVCacheManager


class ModelRunner:
    def __init__(self, forward: Callable, config, kv: KVCacheManager, device, dtype: torch.dtype):
        self.forward = forward
        self.kv = kv
        self.device = torch.device(device)
        self.kv_cache = make_kv_cache(config, kv.num_blocks, kv.block_size, dtype, self.device)
        self.decode_graphs: Optional[DecodeGraphs] = None

    def use_decode_graphs(self, max_num_seqs: int, max_model_len: int, capture: bool = True) -> None:
        """Replay decode-only steps from graphs captured for each batch bucket (now)."""
        max_blocks = -(-max_model_len // self.kv.block_size)
        self.decode_graphs = DecodeGraphs(self.forward, self.kv_cache, max_num_seqs, max_blocks, capture)
        self.decode_graphs.capture_all()

    def execute(self, scheduled: list, block_copies: list) -> torch.Tensor:
        """fp32 logits `[len(scheduled), vocab]`, row i for scheduled[i]'s last new token."""
        self.copy_blocks(block_copies)
        batch = HostBatch(scheduled, self.kv)
        if self.decode_graphs is not None and batch.is_decode and self.decode_graphs.bucket(len(scheduled)):
            return self.decode_graphs.run(batch.input_ids, batch.positions, batch.slots, batch.tables).float()
        return logits_of(self.forward(*self.to_inputs(batch).as_tuple())).float()

    def copy_blocks(self, block_copies: list) -> None:
        """Copy-on-write: a shared block is copied before a request writes into it."""
        if block_copies:
            src = torch.tensor([s for s, _ in block_copies], device=self.device)
            dst = torch.tensor([d for _, d in block_copies], device=self.device)
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    def prepare_inputs(self, scheduled: list) -> LMInputs:
        return self.to_inputs(HostBatch(scheduled, self.kv))

    def to_inputs(self, batch: "HostBatch") -> LMInputs:
        width = max(len(t) for t in batch.tables)
        padded = [t + [0] * (width - len(t)) for t in batch.tables]

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        return LMInputs(
            input_ids=tensor(batch.input_ids, torch.int64),
            positions=tensor(batch.positions, torch.int64),
            kv_cache=self.kv_cache,
            slot_mapping=tensor(batch.slots, torch.int64),
            block_tables=tensor(padded, torch.int32),
            context_lens=tensor(batch.context_lens, torch.int32),
            cu_seqlens_q=tensor(batch.cu_seqlens, torch.int32),
            logits_indices=tensor([c - 1 for c in batch.cu_seqlens[1:]], torch.int64),
        )


class HostBatch:
    """A scheduled batch as host lists: its new tokens packed back to back, their positions
    and slots, and each request's block table, context length and offset."""

    def __init__(self, scheduled: list, kv: KVCacheManager):
        self.input_ids, self.positions, self.slots, self.tables = [], [], [], []
        self.context_lens, self.cu_seqlens = [], [0]
        for item in scheduled:
            request, start, end = item.request, item.start, item.start + item.num_new
            self.input_ids += request.all_token_ids[start:end]
            self.positions += range(start, end)
            self.slots += kv.slots(request.key, start, end)
            self.tables.append(kv.block_table(request.key))
            self.context_lens.append(end)
            self.cu_seqlens.append(self.cu_seqlens[-1] + item.num_new)
        self.is_decode = len(self.input_ids) == len(scheduled)  # one new token per request
