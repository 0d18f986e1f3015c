"""Iteration-level (ORCA) continuous batching with a token budget and chunked prefill.

Every engine step asks `schedule()` which requests run and how many of their tokens
(vLLM v1's unified form: no separate prefill and decode phases):

1. Running requests first, oldest first. Each gets the tokens it has not computed yet
   (1 in decode; the rest of its prompt, up to the remaining budget, in a chunked
   prefill). When the KV cache has no block for it, the newest running request is
   preempted by recompute (its blocks freed, it goes back to the head of the queue
   with `num_computed = 0`), until the request fits or was itself the newest.
2. Then waiting requests, first come first served, while the token budget, the
   sequence limit and the free blocks allow. A new request first takes what the
   prefix cache holds of its tokens. The head of the queue is never skipped: a
   request that does not fit blocks the ones behind it (no starvation). Nothing new
   is admitted in a step that had to preempt.

`max_num_batched_tokens` bounds the tokens of one forward pass (and so its latency
and activation memory); `max_num_seqs` bounds the sequences.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from .kv_cache import KVCacheManager
from .request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    start: int  # first position computed in this step (= num_computed before it)
    num_new: int  # positions start .. start + num_new - 1

    @property
    def completes(self) -> bool:
        """Whether this step computes the request's last known token, so it samples."""
        return self.start + self.num_new == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list = field(default_factory=list)  # ScheduledRequest, in batch order
    block_copies: list = field(default_factory=list)  # (src, dst) copy-on-write pairs
    preempted: list = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque = deque()
        self.running: list = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed, budget)
            if num_new < 1:  # a step was interrupted between its forward pass and sampling:
                self.roll_back(request, request.num_tokens - 1)  # recompute the last token
                num_new = 1
            if not self._allocate_or_preempt(request, num_new, out):
                break  # the request preempted itself: it was the newest
            out.scheduled.append(ScheduledRequest(request, request.num_computed, num_new))
            budget -= num_new
            index += 1
        return budget

    def _allocate_or_preempt(self, request: Request, num_new: int, out: SchedulerOutput) -> bool:
        while True:
            copies = self.kv.allocate(request.key, request.num_computed, num_new)
            if copies is not None:
                out.block_copies.extend(copies)
                return True
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return False

    def _preempt(self, request: Request) -> None:
        self.kv.free(request.key)
        request.num_computed = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.num_computed == 0 and not self.kv.has(request.key):
                request.num_computed = self.kv.match_prefix(request.key, request.all_token_ids)
            num_new = min(request.num_tokens - request.num_computed, budget)
            copies = self.kv.allocate(request.key, request.num_computed, num_new)
            if copies is None:
                if self.kv.has(request.key):
                    self.kv.free(request.key)  # give back the prefix blocks it took
                request.num_computed = 0
                break
            out.block_copies.extend(copies)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, request.num_computed, num_new))
            budget -= num_new

    def roll_back(self, request: Request, num_tokens: int) -> None:
        """Keep only the first `num_tokens` of the request's computed positions (and blocks)."""
        request.num_computed = min(request.num_computed, num_tokens)
        if self.kv.has(request.key):
            self.kv.truncate(request.key, request.num_computed)

    def mark_computed(self, request: Request, num_computed: int) -> None:
        request.num_computed = num_computed
        self.kv.mark_computed(request.key, request.all_token_ids, num_computed)

    def fork(self, parent: Request, child: Request) -> None:
        """Run `child` from now on, sharing the parent's blocks (copied on write)."""
        self.kv.fork(parent.key, child.key)
        self.running.append(child)

    def kv_utilization(self) -> Optional[float]:
        """Tokens stored over slots held, or None while nothing is held."""
        held = self.kv.num_used_blocks * self.kv.block_size
        stored = sum(r.num_computed for r in self.running)
        return min(stored / held, 1.0) if held else None

    def finish(self, request: Request) -> None:
        """Drop a finished or aborted request from the queues and free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if self.kv.has(request.key):
            self.kv.free(request.key)
