"""The engine core: `add_request`, `step`, `abort`; `fuselm.LLM` and the server are built on it.

    engine = LLMEngine(loaded_model, target="cpu", max_model_len=512)
    request_id = engine.add_request("Hello", SamplingParams(max_tokens=8))
    while engine.has_unfinished():
        for output in engine.step(): ...

A step is: schedule (scheduler.py, the only owner of the KV-cache manager) -> one forward
pass over the packed batch (model_runner.py) -> note which tokens are now in the KV cache
-> sample the requests whose last token was computed (sampler.py) -> turn each token into
text, a stop decision and an output (output_processor.py) -> free the blocks of finished
requests. Requests come in through intake.py, which checks everything about them first:
a bad request raises TypeError or ValueError in `add_request` and nothing of it is queued.

Failures stay with the requests they concern. A request whose forward pass, sampling or
detokenizing raises ends with finish_reason "error" and the message; the others go on,
and an unexpected error in a step ends that step's requests alone. A KeyboardInterrupt
or SystemExit raised inside `step` propagates, leaving the engine consistent: outputs
made before it come with the next step, and a request interrupted between its forward
pass and its sampling recomputes its last token (a forward pass with zero tokens is
never issued).

The methods are thread-safe (one lock; a step holds it), but one consumer should drive
`step` at a time: several consumers share an engine through `EngineLoop`
(engine_loop.py), which steps it on one thread and routes each request's outputs to
its own stream.
"""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from ..target import Target, get_target
from ..sampling_params import SamplingParams
from .intake import RequestIntake
from .kv_cache import KVCacheManager, free_memory_budget, kv_bytes_per_token, num_blocks_for_budget
from .model_runner import ModelRunner
from .output_processor import OutputProcessor
from .request import Request, RequestOutput, RequestStatus
from .sampler import Sampler, SamplingState
from .scheduler import ScheduledRequest, Scheduler, SchedulerConfig

DEFAULT_BLOCK_SIZE = 16  # tokens per KV-cache block
CUDA_MEMORY_FRACTION = 0.9  # of the free GPU memory after compiling, for the KV cache


@dataclass
class EngineStats:
    steps: int = 0
    preemptions: int = 0
    batched_tokens: int = 0
    prompt_tokens: int = 0  # of requests queued (vLLM's prompt_tokens_total)
    generation_tokens: int = 0  # sampled
    kv_utilization: list = field(default_factory=list)  # per step: tokens stored / slots held

    @property
    def mean_kv_utilization(self) -> float:
        return sum(self.kv_utilization) / max(len(self.kv_utilization), 1)


class LLMEngine:
    def __init__(self, loaded, target: Union[str, Target] = "cpu", *, max_model_len: Optional[int] = None,
                 max_num_seqs: int = 16, max_num_batched_tokens: Optional[int] = None,
                 kv_cache_bytes: Optional[int] = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 enable_prefix_caching: bool = True, cache_dir: Optional[str] = None, forward=None,
                 donate_weights: bool = False, enforce_eager: bool = False, dtype: Optional[torch.dtype] = None,
                 quantize=None):
        """`loaded`: a models.LoadedModel; its model is compiled here unless `forward` (a
        compiled forward in the LM contract) is given. `dtype`: what the forward computes
        in and the KV cache holds; None: the model's (needed when `loaded.model` is None,
        as for a loaded artifact). `quantize`: compile_lm's (a scheme or a QuantizeConfig)."""
        if loaded.tokenizer is None:
            raise ValueError(f"{loaded.source} has no tokenizer; the engine needs one")
        target = get_target(target)
        self.config, self.tokenizer, self.target = loaded.config, loaded.tokenizer, target
        self.max_model_len = check_max_model_len(max_model_len, self.config)
        _check_positive(max_num_seqs=max_num_seqs, block_size=block_size)
        dtype = dtype or next(loaded.model.parameters()).dtype
        device = target.device
        if forward is None:
            from ..api import compile_lm  # the compiler sits above the runtime

            forward = compile_lm(loaded, target, block_size, dtype, cache_dir, donate_weights, quantize)
        if donate_weights:
            release_module_weights(loaded.model)
        num_blocks = self._num_blocks(kv_cache_bytes, max_num_seqs, block_size, dtype, device)
        kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        self.runner = ModelRunner(forward, self.config, kv, device, dtype)
        if target.cuda_graphs and not enforce_eager:  # decode steps replay CUDA graphs
            self.runner.use_decode_graphs(max_num_seqs, self.max_model_len, capture=device.type == "cuda")
        budget = max_num_batched_tokens or max(2048, max_num_seqs)
        _check_positive(max_num_batched_tokens=budget)
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs, budget, self.max_model_len), kv)
        self.intake = RequestIntake(self.tokenizer, self.config.vocab_size, self.max_model_len)
        self.requests: dict = {}  # live requests (and forked samples) by Request.key
        self.outputs = OutputProcessor(self.intake, self.scheduler, self.requests, self.tokenizer.eos_token_ids,
                                       self.max_model_len)
        self.sampler = Sampler()
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._pending: list = []  # outputs not yet returned by `step` (aborts, an interrupted step)
        self._lock = threading.RLock()

    @property
    def kv(self) -> KVCacheManager:
        """The KV-cache manager (owned by the scheduler: read it, do not change it)."""
        return self.scheduler.kv

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

    def add_request(self, prompt, params: Optional[SamplingParams] = None, request_id: Optional[str] = None) -> str:
        """Validate and queue a request; returns its id. Raises TypeError or ValueError,
        queuing nothing. `prompt` takes the forms intake.py lists."""
        return self.enqueue(self.make_request(prompt, params, request_id))

    def make_request(self, prompt, params: Optional[SamplingParams], request_id: Optional[str] = None,
                     final_output_only: bool = False, argument: str = "prompt") -> Request:
        """A validated request, not yet queued (`enqueue` queues it, and names it if
        `request_id` is None). `argument` names the prompt in error messages."""
        if request_id is not None and not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str or None, got {type(request_id).__name__}")
        if request_id == "":
            raise ValueError("request_id is empty")
        return self.intake.make_request(prompt, params, request_id, final_output_only, argument)

    def enqueue(self, request: Request) -> str:
        """Queue a request made by `make_request`; ValueError if its id is in use."""
        with self._lock:
            if request.request_id is None:
                request.request_id = self._new_id()
            elif self.is_active(request.request_id):
                raise ValueError(f"request_id {request.request_id!r} is already in use")
            self.requests[request.key] = request
            self.scheduler.add(request)
            self.stats.prompt_tokens += len(request.prompt_token_ids)
        return request.request_id

    def _new_id(self) -> str:
        """The next automatic id, skipping ids users chose."""
        while True:
            request_id = str(next(self._ids))
            if not self.is_active(request_id):
                return request_id

    def is_active(self, request_id: str) -> bool:
        """Whether a request (or a sample forked from it) with this id is unfinished."""
        with self._lock:
            return request_id in self.requests or any(key[0] == request_id for key in self._sample_keys())

    def _sample_keys(self) -> list:
        return [key for key in self.requests if isinstance(key, tuple)]

    def abort(self, request_id: str) -> None:
        """End a request (and the samples forked from it) with finish_reason "abort";
        its outputs come with the next step. An unknown or finished id is ignored."""
        with self._lock:
            keys = [request_id] + [key for key in self._sample_keys() if key[0] == request_id]
            for key in keys:
                request = self.requests.get(key)
                if request is None or request.finished:
                    continue
                request.finish("abort")
                self.scheduler.finish(request)
                self._pending.append(self.outputs.retire(request, request.detokenizer.flush()))

    def return_outputs(self, outputs: list) -> None:
        """Put outputs back to be returned, first, by the next `step` (engine_loop.py hands
        back those of requests it did not submit)."""
        with self._lock:
            self._pending[:0] = outputs

    def has_unfinished(self) -> bool:
        with self._lock:
            return self.scheduler.has_unfinished() or bool(self._pending)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def num_running(self) -> int:
        return len(self.scheduler.running)

    # -- one iteration --------------------------------------------------------------

    def step(self) -> list:
        """Run one scheduled batch; returns a RequestOutput per request that progressed."""
        # The sampler's torch work runs on one thread too: torch's OpenMP workers would
        # otherwise spin after it and slow the kernels of the next step (measured 4x on
        # the decode attention).
        with self._lock, torch.no_grad(), self.target.running():
            batch = self.scheduler.schedule()
            self.stats.preemptions += len(batch.preempted)
            if batch.scheduled:
                try:
                    self._run(batch)
                except Exception as err:  # noqa: BLE001 - a bug in a step ends its requests alone
                    self._fail_batch(batch, err)
            outputs, self._pending = self._pending, []
            return outputs

    def _run(self, batch) -> None:
        """The batch's forward pass, sampling and outputs (appended to `_pending` one by
        one, so an interrupt loses none of them)."""
        logits = self._forward(batch)
        self.stats.steps += 1
        self.stats.batched_tokens += batch.num_tokens
        completing = []
        for row, item in enumerate(batch.scheduled):
            request = item.request
            if request.finished:  # its forward pass failed (see _forward)
                self._pending.append(self.outputs.retire(request, request.detokenizer.flush()))
                continue
            self.scheduler.mark_computed(request, item.start + item.num_new)
            if item.completes:
                completing.append((row, request))
        utilization = self.scheduler.kv_utilization()
        if utilization is not None:
            self.stats.kv_utilization.append(utilization)
        self._sample_and_advance(logits, completing)

    def _fail_batch(self, batch, err: Exception) -> None:
        """End every unfinished request of the batch (and samples forked in it) with the error."""
        message = f"engine step failed: {type(err).__name__}: {err}"
        keys = {item.request.key for item in batch.scheduled}
        for request in list(self.requests.values()):
            if (request.key in keys or request.request_id in keys) and not request.finished:
                self._pending.append(self.outputs.fail(request, message))

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

    def _sample_and_advance(self, logits: torch.Tensor, completing: list) -> None:
        if not completing:
            return
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
            for row, request in completing:
                self._report(self._advance_alone(logits[row], request))
            return
        for request, token, logprobs in zip(requests, sampled.token_ids, sampled.logprobs):
            self.stats.generation_tokens += 1
            self._report(self.outputs.advance(request, token, logprobs))

    def _report(self, output: Optional[RequestOutput]) -> None:
        if output is not None:
            self._pending.append(output)

    def _with_samples(self, row: int, request: Request) -> list:
        """(row, request), then, the first time its prompt's logits come, (row, sample) for each
        of the params.n - 1 samples forked from it: they share its KV blocks (copied on write)
        and draw their first token from the same logits, each with its own generator."""
        entries = [(row, request)]
        if request.pending_forks and not request.output_token_ids:
            entries += [(row, self._fork(request, index)) for index in range(1, request.pending_forks + 1)]
            request.pending_forks = 0
        return entries

    def _fork(self, parent: Request, index: int) -> Request:
        params = parent.params
        sampling = SamplingState.create(params, parent.prompt_token_ids, self.tokenizer.eos_token_ids)
        if params.seed is not None:  # sample i draws from seed + i (wrapped into the 64-bit range)
            sampling.generator = torch.Generator().manual_seed((params.seed + index + 2**63) % 2**64 - 2**63)
        child = Request(parent.request_id, parent.prompt, list(parent.prompt_token_ids), params, sampling,
                        self.intake.new_detokenizer(parent.prompt_token_ids, params, parent.final_output_only),
                        parent.max_tokens, output_token_ids=sampling.output_token_ids,
                        final_output_only=parent.final_output_only, num_computed=parent.num_computed,
                        status=RequestStatus.RUNNING, index=index)
        self.scheduler.fork(parent, child)
        self.requests[child.key] = child
        return child

    def _advance_alone(self, logits_row: torch.Tensor, request: Request) -> Optional[RequestOutput]:
        try:
            sampled = self.sampler(logits_row[None], [request.sampling])
        except Exception as err:  # noqa: BLE001 - the request ends with the message
            return self.outputs.fail(request, f"sampling failed: {err!r}")
        self.stats.generation_tokens += 1
        return self.outputs.advance(request, sampled.token_ids[0], sampled.logprobs[0])

    def truncate(self, request: Request, num_tokens: int) -> None:
        """Roll a request back to its first `num_tokens` tokens (prompt included)."""
        with self._lock:
            self.outputs.truncate(request, num_tokens)


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


def check_max_model_len(max_model_len: Optional[int], config) -> int:
    """`max_model_len` checked against the model's positions; None: those, at most 2048."""
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
