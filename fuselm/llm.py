"""`fuselm.LLM`: load, compile and serve a language model in a few lines.

    llm = fuselm.LLM("smollm2-135m")            # target="auto": cuda if a GPU is visible
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    for piece in llm.stream("Once upon a time", SamplingParams(max_tokens=64)): ...
    reply = llm.chat([{"role": "user", "content": "What is the capital of France?"}])

Everything runs on the engine core (runtime/engine.py): `generate` validates every
request before queuing any, then steps the engine until all are done, so the
prompts are served together by continuous batching.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Sequence, Union

import torch

from .runtime.engine import LLMEngine, sample_id
from .runtime.request import RequestOutput
from .sampling_params import SamplingParams
from .target import get_target

Prompt = Union[str, Sequence[int]]


class LLM:
    def __init__(self, model: str = "smollm2-135m", target: str = "auto", *, dtype: Optional[torch.dtype] = None,
                 max_model_len: Optional[int] = None, max_num_seqs: int = 16,
                 max_num_batched_tokens: Optional[int] = None, kv_cache_bytes: Optional[int] = None,
                 block_size: int = 16, enable_prefix_caching: bool = True, cache_dir: Optional[str] = None,
                 enforce_eager: bool = False):
        """`enforce_eager`: on cuda, run decode steps kernel by kernel instead of replaying
        CUDA graphs (vLLM's option of that name)."""
        from .models import load

        self.target = get_target(target)
        if dtype is None:
            dtype = self.target.default_dtype
        with self.target.importing():
            loaded = load(model, dtype=dtype)
            self.tokenizer = loaded.tokenizer
            self.engine = LLMEngine(loaded, self.target, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                    max_num_batched_tokens=max_num_batched_tokens, kv_cache_bytes=kv_cache_bytes,
                                    block_size=block_size, enable_prefix_caching=enable_prefix_caching,
                                    cache_dir=cache_dir, enforce_eager=enforce_eager,
                                    donate_weights=True)  # the model is ours alone

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> "LLM":
        """An LLM front end over an engine built elsewhere (e.g. sharing a compiled model)."""
        llm = cls.__new__(cls)
        llm.target, llm.engine, llm.tokenizer = engine.target, engine, engine.tokenizer
        return llm

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None) -> list:
        """One RequestOutput per prompt, in order. Every request is validated before any runs.
        With SamplingParams(n > 1), the output is the first sample's, and `output.samples`
        holds all n (the prompt is prefilled once; the samples fork its KV blocks)."""
        prompts = [prompts] if _is_single_prompt(prompts) else list(prompts)
        params = _params_per_prompt(sampling_params, len(prompts))
        requests = [self.engine.make_request(p, sp, None, final_output_only=True) for p, sp in zip(prompts, params)]
        for request in requests:
            self.engine.enqueue(request)
        finished: dict = {}
        wanted = {sample for r in requests for sample in _sample_ids(r)}
        while wanted - finished.keys():
            for output in self.engine.step():
                if output.finished and output.request_id in wanted:
                    finished[output.request_id] = output
        return [_with_samples(finished, r) for r in requests]

    def stream(self, prompt: Prompt, sampling_params: Optional[SamplingParams] = None) -> Iterator[str]:
        """Yield the text of one request piece by piece as it is generated; the pieces
        concatenate to the text `generate` would return. The last output is kept in
        `self.last_output`."""
        request_id = self.engine.add_request(prompt, sampling_params)
        try:
            while True:
                for output in self.engine.step():
                    if output.request_id != request_id:
                        continue
                    if output.new_text:
                        yield output.new_text
                    if output.finished:
                        self.last_output = output
                        return
        finally:
            self.engine.abort(request_id)  # a consumer that stops early frees the request

    def chat(self, messages: Sequence[dict], sampling_params: Optional[SamplingParams] = None) -> RequestOutput:
        """Answer a conversation rendered through the model's chat template."""
        return self.generate([self.chat_prompt(messages)], sampling_params)[0]

    def chat_prompt(self, messages: Sequence[dict]) -> list:
        if not messages:
            raise ValueError("messages is empty")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def _sample_ids(request) -> list:
    return [request.request_id] + [sample_id(request.request_id, i) for i in range(1, request.params.n)]


def _with_samples(finished: dict, request) -> RequestOutput:
    output = finished[request.request_id]
    if request.params.n > 1:
        output.samples = [dataclasses.replace(output)] + [finished[i] for i in _sample_ids(request)[1:]]
    return output


def _is_single_prompt(prompts) -> bool:
    return isinstance(prompts, str) or (isinstance(prompts, Sequence) and bool(prompts)
                                        and all(isinstance(t, int) for t in prompts))


def _params_per_prompt(sampling_params, count: int) -> list:
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    params = list(sampling_params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling_params for {count} prompts")
    return params
