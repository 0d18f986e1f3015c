"""Request intake: everything about a request is checked here, before any of it is queued.

A prompt is one of

    "text"                          encoded with the model's tokenizer
    [1, 2, 3]                       token ids (ints, bools refused) in [0, vocab_size)
    {"prompt_token_ids": [1, 2]}    the same, as vLLM's TokensPrompt
    {"prompt": "text"}              the same as "text", as vLLM's TextPrompt

and anything else (bytes, None, a dict with other keys, a list holding a str) is a
`TypeError` naming the argument and its type; a string that cannot be encoded (a lone
surrogate) or an empty prompt is a `ValueError`. Sampling parameters are checked against
the model here (stop token ids and logprobs against the vocabulary; prompt plus
max_tokens against the context), so a request never fails later for something that
could have been refused at the door.
"""
from __future__ import annotations

import numbers
from typing import Optional

from ..sampling_params import SamplingParams
from .detokenizer import IncrementalDetokenizer
from .request import Request
from .sampler import SamplingState

PROMPT_FORMS = "a str, a list of token ids (int), {'prompt_token_ids': [...]} or {'prompt': str}"


class RequestIntake:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int):
        self.tokenizer, self.vocab_size, self.max_model_len = tokenizer, vocab_size, max_model_len

    def make_request(self, prompt, params: Optional[SamplingParams], request_id: str,
                     final_output_only: bool = False, argument: str = "prompt") -> Request:
        """A validated request. `final_output_only`: the engine reports it once, when it ends
        (and decodes its text then, unless stop strings need it token by token).
        `argument` names the prompt in error messages (e.g. "prompts[3]")."""
        params = self.check_params(params)
        text, token_ids = self.prompt_tokens(prompt, argument)
        max_tokens = self.check_length(len(token_ids), params)
        sampling = SamplingState.create(params, token_ids, self.tokenizer.eos_token_ids)
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

    def check_params(self, params: Optional[SamplingParams]) -> SamplingParams:
        if params is None:
            return SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids must be token ids in [0, {self.vocab_size}), got {bad[:5]}")
        if params.logprobs is not None and params.logprobs > self.vocab_size:
            raise ValueError(f"logprobs must be at most the vocabulary size {self.vocab_size}, got {params.logprobs}")
        return params

    def prompt_tokens(self, prompt, argument: str = "prompt") -> tuple:
        """(text or None, token ids) of a prompt in one of the accepted forms."""
        if isinstance(prompt, dict):
            return self._dict_prompt(prompt, argument)
        if isinstance(prompt, str):
            return prompt, self._encode(prompt, argument)
        if isinstance(prompt, (list, tuple)):
            return None, self._token_ids(prompt, argument)
        raise TypeError(f"{argument} must be {PROMPT_FORMS}; got {type(prompt).__name__}")

    def _dict_prompt(self, prompt: dict, argument: str) -> tuple:
        if set(prompt) == {"prompt_token_ids"} and isinstance(prompt["prompt_token_ids"], (list, tuple)):
            return None, self._token_ids(prompt["prompt_token_ids"], f"{argument}['prompt_token_ids']")
        if set(prompt) == {"prompt"} and isinstance(prompt["prompt"], str):
            return prompt["prompt"], self._encode(prompt["prompt"], f"{argument}['prompt']")
        raise TypeError(f"{argument} must be {PROMPT_FORMS}; got a dict with keys {sorted(map(str, prompt))} "
                        f"and values of types {[type(v).__name__ for v in prompt.values()]}")

    def _encode(self, text: str, argument: str) -> list:
        if not text:
            raise ValueError(f"{argument} is empty")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"{argument} cannot be encoded as UTF-8: {err.reason} "
                             f"({text[err.start:err.end]!r} at character {err.start})") from None
        return self.tokenizer.encode(text)

    def _token_ids(self, token_ids, argument: str) -> list:
        if not token_ids:
            raise ValueError(f"{argument} is empty (no token ids)")
        wrong = [t for t in token_ids if isinstance(t, bool) or not isinstance(t, numbers.Integral)]
        if wrong:
            raise TypeError(f"{argument} token ids must be ints; got {type(wrong[0]).__name__} ({wrong[0]!r})")
        bad = [int(t) for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"{argument} token ids must be in [0, {self.vocab_size}); got {bad[:5]}")
        return [int(t) for t in token_ids]

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
