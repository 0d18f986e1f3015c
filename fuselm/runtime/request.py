"""A request's life in the engine: its tokens, how many of them are in the KV cache,
its sampling state, its detokenizer and how it ended.

A request is WAITING (queued, or preempted and waiting to be recomputed), RUNNING
(holds KV blocks and is scheduled every step) or FINISHED. `num_computed` counts the
leading tokens of `all_token_ids` whose keys and values are in the cache; the
scheduler feeds the rest (a prompt chunk, or the last sampled token in decode).
Preemption by recompute sets it back to 0: the request's prompt and the tokens it has
generated so far are prefilled again later, so nothing it produced is lost.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from ..sampling_params import SamplingParams
from .detokenizer import IncrementalDetokenizer
from .sampler import SamplingState, TokenLogprobs


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """What `generate` returns per prompt, and `step` per request that progressed.

    `new_text` is the text that became final in this step (what `stream` yields);
    `finish_reason` is None while running, else "stop", "length", "abort" or "error"
    (then `error` says why); `stop_reason` is the stop string or token id matched.
    """

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list
    text: str
    token_ids: list
    finish_reason: Optional[str] = None
    stop_reason: object = None
    logprobs: Optional[list] = None  # per generated token, a TokenLogprobs
    new_text: str = ""
    error: Optional[str] = None
    samples: list = field(default_factory=list)  # n > 1 (from `generate`): every sample's output, this one first
    index: int = 0  # which of the request's params.n samples this is

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Request:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list
    params: SamplingParams
    sampling: SamplingState
    detokenizer: IncrementalDetokenizer
    max_tokens: int  # params.max_tokens, or what fits in the context
    output_token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    num_computed: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: Optional[str] = None
    stop_reason: object = None
    error: Optional[str] = None
    num_preemptions: int = 0
    final_output_only: bool = False  # no per-step outputs: `generate` wants the end alone
    pending_forks: int = 0  # samples (params.n - 1) to fork from it when its first token is sampled
    index: int = 0  # sample index: 0 for the request itself, 1 .. n-1 for the samples forked from it
    _all_token_ids: list = field(init=False, repr=False)  # prompt + output, kept in step

    def __post_init__(self):
        self._all_token_ids = self.prompt_token_ids + self.output_token_ids

    @property
    def all_token_ids(self) -> list:
        """Prompt and output token ids (read only: the request keeps it up to date)."""
        return self._all_token_ids

    @property
    def key(self):
        """The engine's and KV cache's key: the request id, or (request id, index) for a
        forked sample, so a sample can never collide with a user's request id."""
        return self.request_id if self.index == 0 else (self.request_id, self.index)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def finish(self, reason: str, stop_reason=None, error: Optional[str] = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason, self.stop_reason, self.error = reason, stop_reason, error

    def append_token(self, token_id: int, logprobs: Optional[TokenLogprobs]) -> None:
        self.output_token_ids.append(token_id)  # the same list as self.sampling's
        self._all_token_ids.append(token_id)
        if self.params.logprobs is not None:
            self.logprobs.append(logprobs)

    def truncate_output(self, keep: int) -> None:
        """Keep the first `keep` output tokens (and their logprobs)."""
        del self.output_token_ids[keep:]
        del self.logprobs[keep:]
        del self._all_token_ids[len(self.prompt_token_ids) + keep:]

    def output(self, new_text: str = "") -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=list(self.prompt_token_ids),
            text=self.detokenizer.text,
            token_ids=list(self.output_token_ids),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=list(self.logprobs) if self.params.logprobs is not None else None,
            new_text=new_text,
            error=self.error,
            index=self.index,
        )
