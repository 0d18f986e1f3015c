"""`fuselm.LLM`: load, compile and serve a language model in a few lines.

    llm = fuselm.LLM("smollm2-135m")            # target="auto": cuda if a GPU is visible
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    stream = llm.stream("Once upon a time", SamplingParams(max_tokens=64))
    for piece in stream: ...                    # then stream.output is its RequestOutput
    reply = llm.chat([{"role": "user", "content": "What is the capital of France?"}])
    llm = fuselm.LLM(model="smollm2.fuselm")    # an artifact of `fuselm build`: nothing compiles

Every call is a consumer of one engine loop (runtime/engine_loop.py): the engine steps
on its own thread and each request's outputs go to that request's stream, so calls from
several threads, and streams read at any pace, are served together by continuous
batching and never see each other's outputs. `generate` validates every prompt before
queuing any; a call interrupted (Ctrl-C) or a stream dropped unread aborts its requests
and frees their KV blocks.

Defaults are vLLM's: a prompt is used as given (no chat template; `chat` applies it)
and `SamplingParams()` samples at temperature 1.0 for at most 16 tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Sequence, Union

import torch

from .runtime.engine import DEFAULT_BLOCK_SIZE, LLMEngine
from .runtime.engine_loop import EngineLoop, RequestStream
from .runtime.request import RequestOutput
from .sampling_params import SamplingParams
from .target import get_target

Prompt = Union[str, Sequence[int], dict]


class LLM:
    def __init__(self, model: str = "smollm2-135m", target: str = "auto", *, dtype: Optional[torch.dtype] = None,
                 max_model_len: Optional[int] = None, max_num_seqs: int = 16,
                 max_num_batched_tokens: Optional[int] = None, kv_cache_bytes: Optional[int] = None,
                 block_size: Optional[int] = None, enable_prefix_caching: bool = True,
                 cache_dir: Optional[str] = None, enforce_eager: bool = False, quantize=None):
        """`model`: a named model, a Hugging Face directory or .gguf file (loaded and
        compiled now), or an artifact directory of `fuselm build` (loaded: its tokenizer,
        config and compiled forward; `max_model_len` defaults to what it was built with,
        `target="auto"` is its target, and `dtype` and `block_size` are its own).
        `block_size`: tokens per KV-cache block (default 16). `enforce_eager`: on cuda, run
        decode steps kernel by kernel instead of replaying CUDA graphs (vLLM's option).
        `quantize`: a scheme name or a `fuselm.QuantizeConfig` (see `fuselm.compile`;
        calibration samples are texts); an artifact keeps the quantization it was built with."""
        from .artifact.format import is_artifact

        options = dict(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=max_num_batched_tokens, kv_cache_bytes=kv_cache_bytes,
                       enable_prefix_caching=enable_prefix_caching, cache_dir=cache_dir, enforce_eager=enforce_eager)
        if is_artifact(model):
            if quantize not in (None, "none"):
                from .errors import ArtifactError

                raise ArtifactError(f"{model} is an artifact: its quantization was chosen when it was built "
                                    "(fuselm build --quantize); load it without quantize=")
            self.engine = _artifact_engine(model, target, dtype, block_size, options)
        else:
            from .models import load
            from .quant.config import loads_packed

            target = get_target(target)
            packed = loads_packed(quantize)  # a bad quantize= is refused before the model loads
            with target.importing():
                loaded = load(model, dtype=dtype or target.default_dtype, packed=packed)
                if loaded.config.model_type == "bert":
                    raise ValueError(f"{model!r} is an encoder ({loaded.config.model_type}): it embeds text and does "
                                     "not generate; use fuselm.Encoder (`fuselm embed` on the command line)")
                self.engine = LLMEngine(loaded, target, block_size=block_size or DEFAULT_BLOCK_SIZE,
                                        donate_weights=True, quantize=quantize, **options)  # the model is ours alone
        self.target, self.tokenizer = self.engine.target, self.engine.tokenizer
        self.loop = EngineLoop(self.engine)

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> "LLM":
        """An LLM front end over an engine built elsewhere (e.g. sharing a compiled model)."""
        llm = cls.__new__(cls)
        llm.target, llm.engine, llm.tokenizer = engine.target, engine, engine.tokenizer
        llm.loop = EngineLoop(engine)
        return llm

    def close(self) -> None:
        """Abort what is still running and stop the engine loop's thread."""
        self.loop.shutdown()

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None) -> list:
        """One RequestOutput per prompt, in order. Every request is validated before any runs.
        With SamplingParams(n > 1), the output is the first sample's, and `output.samples`
        holds all n (the prompt is prefilled once; the samples fork its KV blocks)."""
        single = _is_single_prompt(prompts)
        if not single and not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a prompt or a list of prompts, got {type(prompts).__name__}")
        prompts = [prompts] if single else list(prompts)
        params = _params_per_prompt(sampling_params, len(prompts))
        requests = [self.engine.make_request(p, sp, None, final_output_only=True,
                                             argument="prompt" if single else f"prompts[{i}]")
                    for i, (p, sp) in enumerate(zip(prompts, params))]
        streams = self.loop.submit_requests(requests)
        try:
            return [_final_output(stream) for stream in streams]
        finally:
            for stream in streams:
                stream.close()  # an interrupted call aborts what is left

    def stream(self, prompt: Prompt, sampling_params: Optional[SamplingParams] = None) -> "TextStream":
        """The text of one request, piece by piece as it is generated; the pieces concatenate
        to the text `generate` would return, and `.output` is the final RequestOutput."""
        return TextStream(self.loop.submit(prompt, sampling_params))

    def chat(self, messages: Sequence[dict], sampling_params: Optional[SamplingParams] = None) -> RequestOutput:
        """Answer a conversation rendered through the model's chat template."""
        return self.generate([self.chat_prompt(messages)], sampling_params)[0]

    def chat_prompt(self, messages: Sequence[dict]) -> list:
        if not isinstance(messages, (list, tuple)):
            raise TypeError(f"messages must be a list of {{'role': str, 'content': str}} dicts, "
                            f"got {type(messages).__name__}")
        if not messages:
            raise ValueError("messages is empty")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not all(isinstance(message.get(k), str) for k in ("role", "content")):
                raise TypeError(f"messages[{index}] must be a dict with str 'role' and 'content', got {message!r:.80}")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def _artifact_engine(directory, target, dtype, block_size, options: dict) -> LLMEngine:
    """An engine on the artifact at `directory`: its tokenizer and config, its loaded
    forward, and by default the context length it was built with."""
    from .artifact import load
    from .errors import ArtifactError
    from .models import LoadedModel

    artifact = load(directory, target)
    if artifact.block_size is None:
        raise ArtifactError(f"{directory} holds a {artifact.config.model_type} model, not a causal language model: "
                            "fuselm.LLM serves language models; call fuselm.load on it instead")
    for name, asked, built in (("dtype", dtype, artifact.dtype), ("block_size", block_size, artifact.block_size)):
        if asked is not None and asked != built:
            raise ArtifactError(f"{directory} was built with {name}={built}, which an artifact cannot change; "
                                f"got {name}={asked}")
    if options["max_model_len"] is None:
        options = {**options, "max_model_len": artifact.max_model_len}
    loaded = LoadedModel(model=None, tokenizer=artifact.tokenizer, config=artifact.config, source=artifact.path)
    return LLMEngine(loaded, artifact.target, forward=artifact, dtype=artifact.dtype, block_size=artifact.block_size,
                     **options)


class TextStream:
    """An iterator over one request's new text; `output` is its final RequestOutput once
    the iteration ends. Closing it, or dropping it unread, aborts the request."""

    def __init__(self, stream: RequestStream):
        self.request_id = stream.request_id
        self._final: list = []  # the final output, once read
        self._stream = stream
        self._pieces = _text_pieces(stream, self._final)  # holds no reference to self: dropping
        # the TextStream frees it at once, and the generator's exit closes the stream

    @property
    def output(self) -> Optional[RequestOutput]:
        return self._final[0] if self._final else None

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()
        self._stream.close()


def _text_pieces(stream: RequestStream, final: list) -> Iterator[str]:
    for output in stream:
        if output.new_text:
            yield output.new_text
        if output.finished and output.index == 0:
            final.append(output)


def _final_output(stream: RequestStream) -> RequestOutput:
    """The first sample's final output, with every sample's in `.samples` when n > 1."""
    finals = {output.index: output for output in stream if output.finished}
    output = finals[0]
    if stream.num_samples > 1:
        output.samples = [dataclasses.replace(output)] + [finals[i] for i in range(1, stream.num_samples)]
    return output


def _is_single_prompt(prompts) -> bool:
    """A str, a dict, or a non-empty list of ints (token ids); a list of prompts otherwise."""
    return isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and bool(prompts)
                                                and not isinstance(prompts[0], (str, dict, list, tuple)))


def _params_per_prompt(sampling_params, count: int) -> list:
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    if not isinstance(sampling_params, (list, tuple)):
        raise TypeError(f"sampling_params must be a SamplingParams, a list of them or None, "
                        f"got {type(sampling_params).__name__}")
    params = list(sampling_params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling_params for {count} prompts")
    return params
