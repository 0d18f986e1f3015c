"""The OpenAI API's bodies: requests parsed into SamplingParams and prompts, and the
responses and stream chunks built from fuselm's RequestOutputs.

Requests are parsed strictly (a bool is not a number, a float is not a token id): a
value of the wrong type is a 400 naming the field before anything reaches the engine.
Ranges are SamplingParams' to check, so the server and `fuselm.LLM` refuse the same
values with the same messages. vLLM's extra sampling fields (top_k, min_p,
repetition_penalty, min_tokens, ignore_eos, stop_token_ids, ...; `extra_body` in the
`openai` client) are accepted too. Fields that would change the answer and that fuselm
does not implement (echo, suffix, logit_bias, best_of, tools, response formats) are
refused rather than ignored; other unknown fields (`user`, ...) are ignored.

Choices are numbered as vLLM numbers them: prompt i's sample j is choice i * n + j.
"""
from __future__ import annotations

import time
from dataclasses import fields as dataclass_fields
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict

from ..sampling_params import SamplingParams
from .errors import bad_request, field_named_in

MAX_LOGPROBS = 20  # top logprobs per token a request may ask for (vLLM's default limit)
SAMPLING_FIELDS = {f.name for f in dataclass_fields(SamplingParams)}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: Optional[str] = None  # None: the served model
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = 1
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # vLLM's extensions
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Optional[int] = None
    ignore_eos: Optional[bool] = None
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: Optional[bool] = None
    include_stop_str_in_output: Optional[bool] = None

    # field -> the values that leave it without effect
    UNSUPPORTED: ClassVar[dict] = {"echo": (False,), "suffix": ("",), "logit_bias": ({},), "best_of": (1,),
                         "tools": ([],), "functions": ([],), "response_format": ({"type": "text"},)}

    def sampling_params(self, max_tokens: Optional[int], logprobs: Optional[int]) -> SamplingParams:
        """The request's SamplingParams; a value SamplingParams refuses is a 400 naming its field."""
        self._refuse_unsupported()
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream=true", "stream_options")
        if logprobs is not None and logprobs > MAX_LOGPROBS:
            raise bad_request(f"at most {MAX_LOGPROBS} top logprobs per token can be returned, got {logprobs}",
                              "logprobs")
        given = {name: getattr(self, name) for name in SAMPLING_FIELDS & set(type(self).model_fields)}
        options = {name: value for name, value in given.items() if value is not None}
        options.update(max_tokens=max_tokens, logprobs=logprobs)
        try:
            return SamplingParams(**options)
        except (TypeError, ValueError) as err:
            raise bad_request(str(err), field_named_in(str(err), SAMPLING_FIELDS)) from None

    def _refuse_unsupported(self) -> None:
        for name, value in (self.model_extra or {}).items():
            if name in self.UNSUPPORTED and value is not None and value not in self.UNSUPPORTED[name]:
                raise bad_request(f"{name} is not supported by this server", name)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(GenerationRequest):
    # Any: the shapes are checked by `prompts`, whose messages say what a prompt may be.
    prompt: Any
    logprobs: Optional[int] = None

    def prompts(self) -> list:
        """The prompts: a str or a list of token ids is one; a list of them is several."""
        prompt = self.prompt
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                       and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
            return [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            return prompt
        if isinstance(prompt, list) and not prompt:
            raise bad_request("prompt is empty", "prompt")
        raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of "
                          f"token-id lists; got {_describe(prompt)}", "prompt")

    def to_sampling_params(self) -> SamplingParams:
        return self.sampling_params(16 if self.max_tokens is None else self.max_tokens, self.logprobs)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: Union[str, list[TextPart], None] = None

    def for_template(self) -> dict:
        """The message as chat templates read it: text parts joined into one string."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": self.role, "content": content or ""}


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None

    def to_sampling_params(self) -> SamplingParams:
        """max_completion_tokens (or the older max_tokens); unset: until the context is full."""
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling_params(max_tokens, logprobs)


def _describe(value) -> str:
    if isinstance(value, list):
        kinds = sorted({type(item).__name__ for item in value})
        return f"a list holding {', '.join(kinds)}"
    return type(value).__name__


# -- responses ------------------------------------------------------------------------


def finish_reason(output) -> Optional[str]:
    """OpenAI's finish_reason: "stop" (EOS or a stop string/token) or "length"."""
    return output.finish_reason if output.finish_reason in ("stop", "length") else None


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(response_id: str, object_name: str, model: str, choices: list, **extra) -> dict:
    return {"id": response_id, "object": object_name, "created": int(time.time()), "model": model,
            "choices": choices, **extra}


class CompletionFormat:
    """Choices of /v1/completions: `text`, and logprobs as the legacy lists."""

    object_name, chunk_object_name, id_prefix = "text_completion", "text_completion", "cmpl-"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def choice(self, index: int, text: str, token_logprobs, reason: Optional[str], offset: int = 0) -> dict:
        return {"index": index, "text": text, "logprobs": self.logprobs(token_logprobs, offset),
                "finish_reason": reason}

    chunk_choice = choice

    def opening_chunk_choices(self, num_choices: int) -> list:
        return []

    def logprobs(self, entries, offset: int) -> Optional[dict]:
        """entries: (token id, TokenLogprobs) per token; offset: where the first token's text starts."""
        if entries is None:
            return None
        tokens, offsets = [], []
        for token_id, _ in entries:
            offsets.append(offset)
            tokens.append(self.tokenizer.decode([token_id]))
            offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [lp.sampled_logprob for _, lp in entries],
                "top_logprobs": [{self.tokenizer.decode([t]): p for t, p in lp.top} for _, lp in entries],
                "text_offset": offsets}


class ChatFormat:
    """Choices of /v1/chat/completions: a `message` (a `delta` in chunks, the first
    carrying the role), and logprobs as `content` entries (which have no text offsets:
    `offset` is taken for CompletionFormat's sake)."""

    object_name, chunk_object_name, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def choice(self, index: int, text: str, token_logprobs, reason: Optional[str], offset: int = 0) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": self.logprobs(token_logprobs), "finish_reason": reason}

    def chunk_choice(self, index: int, text: str, token_logprobs, reason: Optional[str], offset: int = 0) -> dict:
        return {"index": index, "delta": {"content": text} if text else {},
                "logprobs": self.logprobs(token_logprobs), "finish_reason": reason}

    def opening_chunk_choices(self, num_choices: int) -> list:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(num_choices)]

    def logprobs(self, entries) -> Optional[dict]:
        if entries is None:
            return None
        return {"content": [{**self._token(token_id, lp.sampled_logprob),
                             "top_logprobs": [self._token(t, p) for t, p in lp.top]} for token_id, lp in entries]}

    def _token(self, token_id: int, logprob: float) -> dict:
        text = self.tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def model_card(name: str, created: int, max_model_len: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "fuselm", "root": name,
            "max_model_len": max_model_len}


__all__ = ["CompletionRequest", "ChatCompletionRequest", "CompletionFormat", "ChatFormat"]
