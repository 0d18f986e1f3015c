"""The engine core: `add_request`, `step`, `abort`; `fuselm.LLM` is built on it.

    engine = LLMEngine(loaded_model, target="cpu", max_model_len=512)
    request_id = engine.add_request("Hello", SamplingParams(max_tokens=8))
    while engine.has_unfinished():
        for output in engine.step(): ...

A step is: schedule (scheduler.py) -> one forward pass over the packed batch
(model_runner.py) -> note which tokens are now in the KV cache -> sample the requests
whose last token was computed (sampler.py) -> detokenize and check stop conditions
(detokenizer.py) -> free the blocks of finished requests.

Validation happens in `add_request`: a bad request raises ValueError there and nothing
of it is queued. A request that fails while running (its sampling or detokenizing
raises, or a forward pass that fails for it alone) ends with finish_reason "error"
and the message; the others go on.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from ..target import Target, get_target
from ..sampling_params import SamplingParams
from .detokenizer import IncrementalDetokenizer
from .kv_cache import KVCacheManager, free_memory_budget, kv_bytes_per_token, num_blocks_for_budget
from .model_runner import ModelRunner
from .request import Request, RequestOutput, RequestStatus
from .sampler import Sampler, SamplingState
from .scheduler import ScheduledRequest, Scheduler, SchedulerConfig

CUDA_MEMORY_FRACTION = 0.9  # of the free GPU memory after compiling, for the KV cache


@dataclass
class EngineStats:
    steps: int = 0
    preemptions: int = 0
    batched_tokens: int = 0
    kv_utilization: list = field(default_factory=list)  # per step: tokens stored / slots held

    @property
    def mean_kv_utilization(self) -> float:
        return sum(self.kv_utilization) / max(len(self.kv_utilization), 1)


class LLMEngine:
    def __init__(self, loaded, target: Union[str, Target] = "cpu", *, max_model_len: Optional[int] = None,
                 max_num_seqs: int = 16, max_num_batched_tokens: Optional[int] = None,
                 kv_cache_bytes: Optional[int] = None, block_size: int = 16,
                 enable_prefix_caching: bool = True, cache_dir: Optional[str] = None, forward=None,
                 donate_weights: bool = False, enforce_eager: bool = False):
        if loaded.tokenizer is None:
            raise ValueError(f"{loaded.source} has no tokenizer; the engine needs one")
        target = get_target(target)
        self.config, self.tokenizer, self.target = loaded.config, loaded.tokenizer, target
        self.max_model_len = _check_max_model_len(max_model_len, self.config)
        _check_positive(max_num_seqs=max_num_seqs, block_size=block_size)
        dtype = next(loaded.model.parameters()).dtype
        device = target.device
        forward = forward or compile_lm(loaded, target, block_size, dtype, cache_dir, donate_weights)
        if donate_weights:
            release_module_weights(loaded.model)
        num_blocks = self._num_blocks(kv_cache_bytes, max_num_seqs, block_size, dtype, device)
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        self.runner = ModelRunner(forward, self.config, self.kv, device, dtype)
        if target.cuda_graphs and not enforce_eager:  # decode steps replay CUDA graphs
            self.runner.use_decode_graphs(max_num_seqs, self.max_model_len, capture=device.type == "cuda")
        budget = max_num_batched_tokens or max(2048, max_num_seqs)
        _check_positive(max_num_batched_tokens=budget)
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs, budget, self.max_model_len), self.kv)
        self.sampler = Sampler()
        self.requests: dict = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._pending: list = []  # outputs of aborted requests, returned by the next step
        self._num_samples: dict = {}  # request id -> n, for requests that forked samples

    def _num_blocks(self, kv_cache_bytes, max_num_seqs, block_size, dtype, device) -> int:
        """cpu: room for max_num_seqs full contexts; cuda: a fraction of free memory."""
        if kv_cache_bytes is None:
            if device.type == "cuda":
                kv_cache_bytes = free_memory_budget(CUDA_MEMORY_FRACTION, device)
            else:
                blocks_per_seq = -(-self.max_model_len // block_size)
                kv_cache_bytes = max_num_seqs * blocks_per_seq * block_size * kv_bytes_per_token(self.config, dtype)
        num_blocks = num_blocks_for_budget(kv_cache_bytes, self.config, block_size, dtype)
        if num_blocks * block_size < self.max_model_len:
            raise ValueError(f"kv_cache_bytes={kv_cache_bytes} holds {num_blocks * block_size} tokens, "
                             f"fewer than max_model_len={self.max_model_len}: raise it or lower max_model_len")
        return num_blocks

    # -- requests -------------------------------------------------------------------

    def add_request(self, prompt: Union[str, Sequence[int]], params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None) -> str:
        """Validate and queue a request; returns its id. Raises ValueError, queuing nothing."""
        return self.enqueue(self.make_request(prompt, params, request_id))

    def enqueue(self, request: Request) -> str:
        """Queue a request made (and so validated) by `make_request`."""
        self.requests[request.request_id] = request
        self.scheduler.add(request)
        return request.request_id

    def make_request(self, prompt, params: Optional[SamplingParams], request_id: Optional[str],
                     final_output_only: bool = False) -> Request:
        """A validated request. `final_output_only`: `step` reports it once, when it ends (and
        its text is decoded then, unless stop strings need it token by token)."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, token_ids = self.tokenize(prompt)
        max_tokens = self.check_length(len(token_ids), params)
        sampling = SamplingState.create(params, token_ids, self.tokenizer.eos_token_ids)
        if params.n > 1 and any(sample_id(request_id, i) in self.requests for i in range(1, params.n)):
            raise ValueError(f"request_id {request_id!r}: the ids of its samples are already in use")
        return Request(request_id, text, list(token_ids), params, sampling,
                       self.new_detokenizer(token_ids, params, final_output_only), max_tokens,
                       output_token_ids=sampling.output_token_ids, final_output_only=final_output_only,
                       pending_forks=params.n - 1)

    def new_detokenizer(self, prompt_token_ids, params: SamplingParams,
                        final_output_only: bool = False) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(
            self.tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
            stop=params.stop or (), include_stop_str_in_output=params.include_stop_str_in_output,
            deferred=final_output_only)

    def tokenize(self, prompt) -> tuple:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            return prompt, self.tokenizer.encode(prompt)
        token_ids = list(prompt)
        if not token_ids:
            raise ValueError("prompt is empty (no token ids)")
        vocab = self.config.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be ints in [0, {vocab}); got {bad[:5]}")
        return None, token_ids

    def check_length(self, prompt_len: int, params: SamplingParams) -> int:
        """The request's max_tokens, after checking prompt and output fit the context."""
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ValueError(f"prompt is too long: {prompt_len} tokens, and max_model_len={self.max_model_len} "
                             "leaves no room for a generated token")
        if params.max_tokens is None:
            return room
        if params.max_tokens > room:
            raise ValueError(f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"max_model_len={self.max_model_len}")
        return params.max_tokens

    def abort(self, request_id: str) -> None:
        """End a request (and the samples forked from it) with finish_reason "abort"."""
        request_id = str(request_id)
        for index in range(1, self._num_samples.pop(request_id, 1)):
            self.abort(sample_id(request_id, index))
        request = self.requests.get(request_id)
        if request is None or request.finished:
            return
        request.finish("abort")
        self.scheduler.finish(request)
        self._pending.append(self._retire(request, request.detokenizer.flush()))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    # -- one iteration --------------------------------------------------------------

    def step(self) -> list:
        """Run one scheduled batch; returns a RequestOutput per request that progressed."""
        # The sampler's torch work runs on one thread too: torch's OpenMP workers would
        # otherwise spin after it and slow the kernels of the next step (measured 4x on
        # the decode attention).
        with torch.no_grad(), self.target.running():
            return self._step()

    def _step(self) -> list:
        outputs, self._pending = self._pending, []
        batch = self.scheduler.schedule()
        self.stats.preemptions += len(batch.preempted)
        if not batch.scheduled:
            return outputs
        logits = self._forward(batch)
        self.stats.steps += 1
        self.stats.batched_tokens += batch.num_tokens
        completing = []
        for row, item in enumerate(batch.scheduled):
            request = item.request
            if request.finished:  # its forward pass failed (see _forward)
                outputs.append(self._retire(request, request.detokenizer.flush()))
                continue
            request.num_computed = item.start + item.num_new
            self.kv.mark_computed(request.request_id, request.all_token_ids, request.num_computed)
            if item.completes:
                completing.append((row, request))
        self._record_utilization()
        outputs += self._sample_and_advance(logits, completing)
        return outputs

    def _forward(self, batch) -> torch.Tensor:
        """The batch's logits. If the forward pass fails, each request is run alone, so
        only the ones that fail by themselves end with an error (their rows are NaN)."""
        try:
            return self.runner.execute(batch.scheduled, batch.block_copies)
        except Exception as err:  # noqa: BLE001 - isolated below, per request
            if len(batch.scheduled) == 1:
                self._fail_forward(batch.scheduled[0].request, err)
                return torch.full((1, self.config.vocab_size), float("nan"))
        rows = []
        for item in batch.scheduled:
            try:
                rows.append(self.runner.execute([item], [])[0])
            except Exception as err:  # noqa: BLE001 - the request ends with the message
                self._fail_forward(item.request, err)
                rows.append(torch.full((self.config.vocab_size,), float("nan")))
        return torch.stack([row.to(rows[0].device) for row in rows])

    def _fail_forward(self, request: Request, err: Exception) -> None:
        request.finish("error", error=f"forward pass failed: {type(err).__name__}: {err}")
        self.scheduler.finish(request)

    def _sample_and_advance(self, logits: torch.Tensor, completing: list) -> list:
        if not completing:
            return []
        completing = [entry for row, request in completing for entry in self._with_samples(row, request)]
        rows = [row for row, _ in completing]
        requests = [request for _, request in completing]
        if rows == list(range(len(logits))):  # every row (decode): no gather
            sampling_logits = logits
        else:
            sampling_logits = logits[torch.tensor(rows, device=logits.device)]
        try:
            sampled = self.sampler(sampling_logits, [r.sampling for r in requests])
        except Exception:  # noqa: BLE001 - sample one by one to find the failing request
            outputs = [self._advance_alone(logits[row], request) for row, request in completing]
        else:
            outputs = [self._advance(request, token, logprobs)
                       for request, token, logprobs in zip(requests, sampled.token_ids, sampled.logprobs)]
        return [output for output in outputs if output is not None]

    def _with_samples(self, row: int, request: Request) -> list:
        """(row, request), then, the first time its prompt's logits come, (row, sample) for each
        of the params.n - 1 samples forked from it: they share its KV blocks (copied on write)
        and draw their first token from the same logits, each with its own generator."""
        entries = [(row, request)]
        if request.pending_forks and not request.output_token_ids:
            self._num_samples[request.request_id] = request.pending_forks + 1
            entries += [(row, self._fork(request, index)) for index in range(1, request.pending_forks + 1)]
            request.pending_forks = 0
        return entries

    def _fork(self, parent: Request, index: int) -> Request:
        params, child_id = parent.params, sample_id(parent.request_id, index)
        sampling = SamplingState.create(params, parent.prompt_token_ids, self.tokenizer.eos_token_ids)
        if params.seed is not None:  # sample i draws from seed + i (wrapped into the 64-bit range)
            sampling.generator = torch.Generator().manual_seed((params.seed + index + 2**63) % 2**64 - 2**63)
        child = Request(child_id, parent.prompt, list(parent.prompt_token_ids), params, sampling,
                        self.new_detokenizer(parent.prompt_token_ids, params, parent.final_output_only),
                        parent.max_tokens, output_token_ids=sampling.output_token_ids,
                        final_output_only=parent.final_output_only, num_computed=parent.num_computed,
                        status=RequestStatus.RUNNING)
        self.kv.fork(parent.request_id, child_id)
        self.requests[child_id] = child
        self.scheduler.running.append(child)
        return child

    def _advance_alone(self, logits_row: torch.Tensor, request: Request) -> Optional[RequestOutput]:
        try:
            sampled = self.sampler(logits_row[None], [request.sampling])
        except Exception as err:  # noqa: BLE001 - the request ends with the message
            return self._fail(request, f"sampling failed: {err!r}")
        return self._advance(request, sampled.token_ids[0], sampled.logprobs[0])

    def _advance(self, request: Request, token: int, logprobs) -> Optional[RequestOutput]:
        """Append a sampled token, then finish the request if a stop condition holds. The
        output, or None for a running request that reports only its end."""
        try:
            request.append_token(token, logprobs)
            stop_string = request.detokenizer.add_token(token)
            self._check_stop(request, token, stop_string)
            piece = "" if request.final_output_only else request.detokenizer.stream_piece()
        except Exception as err:  # noqa: BLE001 - the request ends with the message
            return self._fail(request, f"{type(err).__name__}: {err}")
        if request.finished:
            self.scheduler.finish(request)
            return self._retire(request, piece + request.detokenizer.flush())
        return None if request.final_output_only else request.output(piece)

    def _check_stop(self, request: Request, token: int, stop_string: Optional[str]) -> None:
        params = request.params
        if token in params.stop_token_ids:
            request.finish("stop", stop_reason=token)
        elif not params.ignore_eos and token in self.tokenizer.eos_token_ids:
            request.finish("stop")
        elif stop_string is not None:
            request.finish("stop", stop_reason=stop_string)
            self._trim_to_text(request)
        elif len(request.output_token_ids) >= request.max_tokens or request.num_tokens >= self.max_model_len:
            request.finish("length")

    def _trim_to_text(self, request: Request) -> None:
        """After a stop string, keep only the tokens whose text precedes its cut, and roll
        the KV cache back to them, so token_ids, text and the cached prefix agree."""
        cut = len(request.detokenizer.text)
        keep = len(request.output_token_ids)
        skip = request.params.skip_special_tokens
        while keep > 0 and len(self.tokenizer.decode(request.output_token_ids[:keep], skip_special_tokens=skip)) > cut:
            keep -= 1
        self.truncate(request, len(request.prompt_token_ids) + keep)

    def truncate(self, request: Request, num_tokens: int) -> None:
        """Roll a request back to its first `num_tokens` tokens (prompt included): output
        tokens, logprobs and cached K/V past that point are dropped."""
        keep = num_tokens - len(request.prompt_token_ids)
        if keep < 0:
            raise ValueError(f"cannot truncate into the prompt ({len(request.prompt_token_ids)} tokens)")
        request.truncate_output(keep)
        request.num_computed = min(request.num_computed, num_tokens)
        if self.kv.has(request.request_id):
            self.kv.truncate(request.request_id, request.num_computed)
        if not request.finished:  # it goes on: its text restarts from the kept tokens
            request.detokenizer = self.new_detokenizer(request.prompt_token_ids, request.params,
                                                       request.final_output_only)
            for token in request.output_token_ids:
                request.detokenizer.add_token(token)

    def _fail(self, request: Request, message: str) -> RequestOutput:
        request.finish("error", error=message)
        self.scheduler.finish(request)
        return self._retire(request, "")

    def _retire(self, request: Request, piece: str) -> RequestOutput:
        self.requests.pop(request.request_id, None)
        return request.output(piece)

    def _record_utilization(self) -> None:
        held = self.kv.num_used_blocks * self.kv.block_size
        stored = sum(r.num_computed for r in self.scheduler.running)
        if held:
            self.stats.kv_utilization.append(min(stored / held, 1.0))


def compile_lm(loaded, target: Union[str, Target], block_size: int, dtype: torch.dtype, cache_dir: Optional[str],
               donate_weights: bool = False):
    """The model compiled for `target` in the LM contract, with symbolic batch sizes.
    `donate_weights`: the compiled layouts may reuse (and scramble) the module's weights."""
    from ..api import compile
    from ..models.contract import capture_example

    target = get_target(target)
    example, dynamic = capture_example(loaded.config, block_size=block_size, dtype=dtype)
    model = loaded.model.to(target.device)
    example = tuple(t.to(target.device) for t in example)
    return compile(model, example, target=target, dynamic=dynamic, cache_dir=cache_dir,
                   donate_weights=donate_weights)


def release_module_weights(model: torch.nn.Module) -> None:
    """After a donating compile, the module's tensors that the graph did not keep (q/k/v and
    gate/up before concatenation) are dead weight: drop them, and hand the freed heap back
    to the OS (glibc keeps small freed blocks resident) before the KV cache is allocated."""
    import ctypes
    import gc

    model.to("meta")
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory is reused, just not returned
        pass


def sample_id(request_id: str, index: int) -> str:
    """The request id of sample `index` (1 .. n-1) forked from a request with n > 1."""
    return f"{request_id}#{index}"


def _check_max_model_len(max_model_len: Optional[int], config) -> int:
    limit = getattr(config, "max_position_embeddings", None) or 2048
    if max_model_len is None:
        return min(limit, 2048)
    _check_positive(max_model_len=max_model_len)
    if max_model_len > limit:
        raise ValueError(f"max_model_len={max_model_len} exceeds the model's {limit} positions")
    return max_model_len


def _check_positive(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


__all__ = ["LLMEngine", "EngineStats", "RequestOutput", "RequestStatus", "ScheduledRequest"]
