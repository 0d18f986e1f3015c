"""CUDA graphs for decode steps: one captured forward per batch-size bucket.

A decode step of a small model is bound by launches, not by the GPU: a Llama layer is
about eight kernels, each a few microseconds of Python and driver work to launch.
Replaying a captured graph launches the whole forward at once (vLLM's and
torch.compile's "reduce-overhead" remedy).

A graph replays fixed shapes and addresses, so the forward is captured for a few batch
sizes (`batch_buckets`: 1, 2, 4, then multiples of 8 up to max_num_seqs) over static
input buffers sized for the largest bucket; bucket B reads their first B rows. A step
of n decoding sequences copies its inputs into the buffers, pads them up to the
smallest bucket B >= n and replays B's graph; rows n..B-1 are padding that touches
nothing real: slot -1 (the cache write skips it), context length 1 on block 0, and
their logits are dropped. The block table width is the one of max_model_len, so a
graph covers every context length (the decode kernel's partition count comes from that
width, and programs past a sequence's length return at once).

Only decode-only batches (every sequence adds one token) replay; prefill and mixed steps
run the forward directly. `capture=False` keeps the padding and static buffers but
calls the forward instead of replaying: the cpu tests check padding that way.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..models.contract import LMInputs

PADDING_SLOT = -1  # kv_cache_write skips negative slots


def batch_buckets(max_num_seqs: int) -> list:
    """Captured batch sizes: 1, 2, 4, then multiples of 8, up to the first >= max_num_seqs."""
    candidates = [1, 2, 4] + list(range(8, max_num_seqs + 8, 8))
    largest = next(b for b in candidates if b >= max_num_seqs)
    return [b for b in candidates if b < largest] + [largest]


class StaticDecodeInputs:
    """Device buffers of the contract's inputs for `max_batch` one-token sequences, and
    host mirrors (pinned on cuda) that a step fills in place and sends with two copies.

    Only what changes is written: a row's block table is overwritten from its start, and
    entries past a sequence's blocks may be stale (the attention kernels read only the
    blocks that hold its context), so a table row is not cleared between steps."""

    def __init__(self, kv_cache: torch.Tensor, max_batch: int, max_blocks: int):
        device = kv_cache.device
        self.kv_cache, self.max_batch, self.max_blocks = kv_cache, max_batch, max_blocks
        self._tables_end = max_batch * max_blocks
        self._lens_end = self._tables_end + max_batch
        # rows: input_ids, positions, slot_mapping, logits_indices
        self.int64 = torch.zeros(4, max_batch, dtype=torch.int64, device=device)
        # block tables [max_batch * max_blocks], context lens [max_batch], cu_seqlens [max_batch + 1]
        self.int32 = torch.zeros(self._lens_end + max_batch + 1, dtype=torch.int32, device=device)
        pinned = device.type == "cuda"
        self._host64 = torch.zeros(self.int64.shape, dtype=torch.int64, pin_memory=pinned)
        self._host32 = torch.zeros(self.int32.shape, dtype=torch.int32, pin_memory=pinned)
        host64, host32 = self._host64.numpy(), self._host32.numpy()
        self._token_ids, self._positions, self._slots, logits_indices = host64
        logits_indices[:] = range(max_batch)  # one logits row per sequence
        self._tables = host32[:self._tables_end].reshape(max_batch, max_blocks)
        self._context_lens = host32[self._tables_end:self._lens_end]
        host32[self._lens_end:] = range(max_batch + 1)  # cu_seqlens: one token per sequence
        self.fill([], [], [], [], batch=max_batch)

    def view(self, batch: int) -> LMInputs:
        """The inputs of a `batch`-sequence decode step: views of the first rows."""
        return LMInputs(
            input_ids=self.int64[0, :batch],
            positions=self.int64[1, :batch],
            kv_cache=self.kv_cache,
            slot_mapping=self.int64[2, :batch],
            block_tables=self.int32[:self._tables_end].view(self.max_batch, self.max_blocks)[:batch],
            context_lens=self.int32[self._tables_end:self._lens_end][:batch],
            cu_seqlens_q=self.int32[self._lens_end:][:batch + 1],
            logits_indices=self.int64[3, :batch],
        )

    def fill(self, token_ids: list, positions: list, slots: list, tables: list, batch: int) -> None:
        """Write n sequences' inputs (one new token each) and pad them to `batch` rows."""
        n = len(token_ids)
        if not n <= batch <= self.max_batch:
            raise ValueError(f"{n} sequences do not fit a decode batch of {batch} (at most {self.max_batch})")
        for row, table in enumerate(tables):
            if len(table) > self.max_blocks:
                raise ValueError(f"a block table of {len(table)} blocks exceeds the captured width {self.max_blocks}")
            self._tables[row, :len(table)] = table
        self._token_ids[:n], self._token_ids[n:batch] = token_ids, 0
        self._positions[:n], self._positions[n:batch] = positions, 0
        self._slots[:n], self._slots[n:batch] = slots, PADDING_SLOT  # padding rows write nothing
        self._context_lens[:n] = self._positions[:n] + 1
        self._context_lens[n:batch] = 1  # padding rows see one position of their table's first block
        self.int64.copy_(self._host64, non_blocking=True)
        self.int32.copy_(self._host32, non_blocking=True)


class DecodeGraphs:
    """Captured decode forwards per batch bucket; `run` pads a step to its bucket and replays."""

    def __init__(self, forward: Callable, kv_cache: torch.Tensor, max_num_seqs: int, max_blocks: int,
                 capture: bool = True):
        self.forward = forward
        self.buckets = batch_buckets(max_num_seqs)
        self.inputs = StaticDecodeInputs(kv_cache, self.buckets[-1], max_blocks)
        self.capture = capture
        self.graphs: dict = {}  # bucket -> (torch.cuda.CUDAGraph, its logits tensor)
        self.replays = 0

    def bucket(self, num_seqs: int) -> Optional[int]:
        return next((b for b in self.buckets if b >= num_seqs), None)

    def capture_all(self) -> None:
        """Warm up and capture every bucket, largest first, all in one memory pool (a smaller
        bucket's activations fit in what the larger one's used)."""
        if not self.capture:
            return
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for batch in reversed(self.buckets):
            inputs = self.inputs.view(batch).as_tuple()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up off the default stream, as torch's docs ask
                self.forward(*inputs)  # compiles and tunes the kernels for this batch size
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = logits_of(self.forward(*inputs))
            self.graphs[batch] = (graph, logits)
        torch.cuda.synchronize()

    def run(self, token_ids: list, positions: list, slots: list, tables: list) -> torch.Tensor:
        """Logits `[n, V]` of n decoding sequences (token i at positions[i], written to slots[i])."""
        n = len(token_ids)
        batch = self.bucket(n)
        self.inputs.fill(token_ids, positions, slots, tables, batch)
        self.replays += 1
        if not self.capture:
            return logits_of(self.forward(*self.inputs.view(batch).as_tuple()))[:n]
        graph, logits = self.graphs[batch]
        graph.replay()
        return logits[:n]


def logits_of(out) -> torch.Tensor:
    """The logits of a forward's result: (logits, cache) or logits alone."""
    return out[0] if isinstance(out, tuple) else out
