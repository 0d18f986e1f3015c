"""How one request wants its tokens chosen and when it stops: `SamplingParams`.

The names and defaults follow vLLM's `SamplingParams`, so a request written for vLLM
or for an OpenAI-style server means the same thing here. The object is frozen data: the
sampler (`fuselm.runtime.sampler`) reads it and the engine reads the stop conditions.

Every field is checked once, in `__post_init__` (edits afterwards raise
FrozenInstanceError), so nothing downstream needs to guard
against a bad value: first the types (numpy scalars are accepted and turned into
Python ones; a bool is not taken for a number), then the ranges, written as a table of
`(field, rule, check)` rows. A failed check raises `ValueError` naming the field, the
rule and the bad value, e.g. "top_p must be in (0, 1], got 1.5". The stop conditions
are normalized to tuples, so `stop="###"` and `stop=["###"]` compare equal afterwards.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

# Dividing logits by a smaller temperature can overflow float32, so such requests are
# treated as greedy, as vLLM does.
GREEDY_TEMPERATURE = 1e-5

_FLOAT_FIELDS = (
    "temperature", "top_p", "min_p",
    "repetition_penalty", "presence_penalty", "frequency_penalty",
)
_OPTIONAL_INT_FIELDS = ("seed", "max_tokens", "logprobs")
_BOOL_FIELDS = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens")

# (field, rule as the error message states it, check); run after the type checks.
_RANGE_RULES = (
    ("temperature", "finite and >= 0", lambda v: math.isfinite(v) and v >= 0),
    ("top_k", "-1, 0 or >= 1", lambda v: v >= -1),
    ("top_p", "in (0, 1]", lambda v: 0 < v <= 1),
    ("min_p", "in [0, 1]", lambda v: 0 <= v <= 1),
    ("repetition_penalty", "finite and > 0", lambda v: math.isfinite(v) and v > 0),
    ("presence_penalty", "in [-2, 2]", lambda v: -2 <= v <= 2),
    ("frequency_penalty", "in [-2, 2]", lambda v: -2 <= v <= 2),
    # torch.Generator.manual_seed takes any 64-bit value, signed or not.
    ("seed", "None or in [-2**63, 2**64)", lambda v: v is None or -(2**63) <= v < 2**64),
    ("max_tokens", "None or >= 1", lambda v: v is None or v >= 1),
    ("logprobs", "None or >= 0", lambda v: v is None or v >= 0),
    ("min_tokens", ">= 0", lambda v: v >= 0),
    ("n", ">= 1", lambda v: v >= 1),
)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 or -1: all tokens
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    max_tokens: Optional[int] = 16  # None: until the context is full
    min_tokens: int = 0  # EOS and stop_token_ids are masked out until this many are generated
    stop: Union[str, Sequence[str], None] = None  # normalized to a tuple of str
    stop_token_ids: Sequence[int] = field(default_factory=tuple)  # normalized to a tuple
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # top logprobs to return; 0: only the sampled token's
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    n: int = 1  # samples of the prompt: prefilled once, the samples fork its KV blocks

    def __post_init__(self):
        self._check_types()
        self._set("stop", _normalized_stop(self.stop))
        self._set("stop_token_ids", _normalized_stop_token_ids(self.stop_token_ids))
        for name, rule, check in _RANGE_RULES:
            value = getattr(self, name)
            if not check(value):
                raise ValueError(f"{name} must be {rule}, got {value!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax of the penalized logits."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    def _set(self, name: str, value) -> None:
        """Normalize a field during validation (the object is frozen afterwards)."""
        object.__setattr__(self, name, value)

    def _check_types(self) -> None:
        for name in _FLOAT_FIELDS:
            self._set(name, _as_float(name, getattr(self, name)))
        for name in ("top_k", "min_tokens", "n"):
            self._set(name, _as_int(name, getattr(self, name)))
        for name in _OPTIONAL_INT_FIELDS:
            value = getattr(self, name)
            self._set(name, None if value is None else _as_int(name, value, "an int or None"))
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


def _as_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _as_int(name: str, value, kind: str = "an int") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)


def _normalized_stop(stop) -> tuple[str, ...]:
    strings = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) and s for s in strings):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return tuple(strings)


def _normalized_stop_token_ids(token_ids) -> tuple[int, ...]:
    if not isinstance(token_ids, (list, tuple)) or not all(
        isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0 for t in token_ids
    ):
        raise ValueError(f"stop_token_ids must be a list of ints >= 0, got {token_ids!r}")
    return tuple(int(t) for t in token_ids)
