"""The sampler: a batch of logits `[N, V]`, one row per sequence, to N next tokens.

Each row is turned into a token in this order, the order of vLLM and Hugging Face:

1. penalties, over the token history: the repetition penalty (prompt and output tokens;
   a positive logit is divided by it, a negative one multiplied), then the presence and
   frequency penalties (output tokens only, OpenAI's: `logit -= presence * (count > 0)
   + frequency * count`);
2. greedy rows (`SamplingParams.greedy`) take the argmax, the first one on ties;
3. sampled rows divide by their temperature, keep their top-k tokens, then the smallest
   set of those whose renormalized probability reaches top-p (the top token always
   stays), then the tokens with at least min-p times the top probability, and draw.

Steps 1 and 3 run on the whole batch at once, with each row's parameters as a column.
The draw is the only step with per-row randomness: each row takes one float64 uniform
from its generator, the request's seeded one or else the sampler's (shared by the
unseeded rows, which take its next draws in one call), and inverts the row's CDF with
it. So a seeded request draws the same tokens whoever shares its batch, and the random
numbers come from a CPU generator whatever device the logits live on.

Logprobs are the log-softmax of the raw logits, before penalties and temperature (like
vLLM v1's default), so they describe the model rather than the sampling settings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..sampling_params import SamplingParams


@dataclass
class SamplingState:
    """One sequence as the sampler sees it; the engine appends each new token."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    generator: Optional[torch.Generator] = None  # None: draw from the sampler's generator
    eos_token_ids: tuple = ()  # masked out, with params.stop_token_ids, before params.min_tokens

    @classmethod
    def create(cls, params: SamplingParams, prompt_token_ids: Sequence[int],
               eos_token_ids: Sequence[int] = ()) -> "SamplingState":
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        return cls(params, list(prompt_token_ids), [], generator, tuple(eos_token_ids))

    def banned_until_min_tokens(self) -> tuple:
        """Token ids that may not be sampled yet: min_tokens is not reached."""
        if len(self.output_token_ids) >= self.params.min_tokens:
            return ()
        return self.eos_token_ids + self.params.stop_token_ids


@dataclass
class TokenLogprobs:
    sampled_logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), highest first; params.logprobs long


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Optional[TokenLogprobs]]  # None for rows that asked for none


class Sampler:
    def __init__(self, seed: Optional[int] = None):
        """`seed` fixes the draws of unseeded requests; None seeds from the OS."""
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(states):
            shape = list(logits.shape)
            raise ValueError(f"expected logits of shape [{len(states)}, vocab], got {shape}")
        raw = logits.float()
        penalized = mask_until_min_tokens(apply_penalties(raw, states), states)
        token_ids = penalized.argmax(dim=-1)
        sampled_rows = [i for i, state in enumerate(states) if not state.params.greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=logits.device)
            token_ids[rows] = self._sample(penalized[rows], [states[i] for i in sampled_rows])
        tokens = token_ids.tolist()
        return SamplerOutput(tokens, token_logprobs(raw, tokens, states))

    def _sample(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        params = [state.params for state in states]
        temperatures = _column([p.temperature for p in params], logits)
        scaled = logits / temperatures[:, None]
        keep = top_k_top_p_min_p_mask(
            scaled, [p.top_k for p in params], [p.top_p for p in params], [p.min_p for p in params]
        )
        probs = torch.softmax(scaled.masked_fill(~keep, float("-inf")), dim=-1)
        return draw(probs, [self._generator_of(state) for state in states])

    def _generator_of(self, state: SamplingState) -> torch.Generator:
        return self.generator if state.generator is None else state.generator


# -- penalties ------------------------------------------------------------------------


def mask_until_min_tokens(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """-inf on EOS and stop token ids in rows that have not generated min_tokens yet."""
    banned = [(row, state.banned_until_min_tokens()) for row, state in enumerate(states)]
    banned = [(row, ids) for row, ids in banned if ids]
    if not banned:
        return logits
    logits = logits.clone()
    for row, ids in banned:
        logits[row, list(ids)] = float("-inf")
    return logits


def apply_penalties(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """`logits` with each row's repetition, presence and frequency penalties; never in place."""
    penalized_rows = [i for i, state in enumerate(states) if _has_penalties(state.params)]
    if not penalized_rows:
        return logits
    rows = torch.tensor(penalized_rows, device=logits.device)
    chosen = [states[i] for i in penalized_rows]
    out = logits.clone()
    out[rows] = _penalize(logits[rows], chosen)
    return out


def _has_penalties(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )


def _penalize(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    params = [state.params for state in states]
    output_counts = token_counts([s.output_token_ids for s in states], logits)
    prompt_counts = token_counts([s.prompt_token_ids for s in states], logits)
    seen = (output_counts + prompt_counts) > 0
    repetition = _column([p.repetition_penalty for p in params], logits)[:, None]
    repeated = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, repeated, logits)
    presence = _column([p.presence_penalty for p in params], logits)[:, None]
    frequency = _column([p.frequency_penalty for p in params], logits)[:, None]
    return logits - presence * (output_counts > 0) - frequency * output_counts


def token_counts(token_lists: Sequence[Sequence[int]], logits: torch.Tensor) -> torch.Tensor:
    """`[N, V]` float counts of each token id in each row's list, on the logits' device."""
    rows, vocab = logits.shape
    width = max((len(ids) for ids in token_lists), default=0)
    # Padding points at an extra column, dropped at the end.
    padded = torch.tensor(
        [list(ids) + [vocab] * (width - len(ids)) for ids in token_lists], dtype=torch.long
    )
    padded = padded.reshape(rows, width).to(logits.device)
    counts = torch.zeros(rows, vocab + 1, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=logits.dtype))
    return counts[:, :vocab]


# -- truncation -----------------------------------------------------------------------


def top_k_top_p_min_p_mask(
    logits: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float], min_p: Sequence[float]
) -> torch.Tensor:
    """`[N, V]` bool: True for the tokens each row may still draw, top-k, then top-p, then min-p."""
    keep = top_k_mask(logits, top_k)
    keep &= top_p_mask(logits.masked_fill(~keep, float("-inf")), top_p)
    # min-p compares with the top probability, which the earlier cuts keep and whose
    # ratio to any other kept token renormalizing does not change.
    keep &= min_p_mask(logits, min_p)
    return keep


def top_k_mask(logits: torch.Tensor, top_k: Sequence[int]) -> torch.Tensor:
    vocab = logits.shape[-1]
    enabled = [0 < k < vocab for k in top_k]
    if not any(enabled):
        return torch.ones_like(logits, dtype=torch.bool)
    ks = [k if on else 1 for k, on in zip(top_k, enabled)]
    kth_index = torch.tensor(ks, device=logits.device)[:, None] - 1
    kth_largest = logits.topk(max(ks), dim=-1).values.gather(1, kth_index)
    disabled = ~torch.tensor(enabled, device=logits.device)[:, None]
    return (logits >= kth_largest) | disabled  # ties with the k-th token stay


def top_p_mask(logits: torch.Tensor, top_p: Sequence[float]) -> torch.Tensor:
    if all(p >= 1.0 for p in top_p):
        return torch.ones_like(logits, dtype=torch.bool)
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    # A token stays while the tokens above it hold less than top_p; the top one always does.
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
    limits = _column(top_p, logits)[:, None]
    keep_sorted = (mass_above < limits) | (limits >= 1.0)
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


def min_p_mask(logits: torch.Tensor, min_p: Sequence[float]) -> torch.Tensor:
    if not any(min_p):
        return torch.ones_like(logits, dtype=torch.bool)
    probs = torch.softmax(logits, dim=-1)
    floors = _column(min_p, logits)[:, None] * probs.amax(dim=-1, keepdim=True)
    return probs >= floors


# -- drawing and logprobs -------------------------------------------------------------


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row of `probs`, by inverting the row's CDF at a uniform from its generator."""
    uniforms = row_uniforms(generators)
    cdf = probs.double().cumsum(dim=-1)
    targets = uniforms.to(probs.device)[:, None] * cdf[:, -1:]
    # With right=True a zero-probability token is never the first CDF value above the
    # target; only a target rounded up to the total overshoots, to the last possible token.
    chosen = torch.searchsorted(cdf, targets, right=True).squeeze(1)
    positions = torch.arange(probs.shape[-1], device=probs.device)
    last_possible = torch.where(probs > 0, positions, 0).amax(dim=-1)
    return torch.minimum(chosen, last_possible)


def row_uniforms(generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One float64 uniform per row; rows sharing a generator take its next draws in row order."""
    rows_by_generator: dict[int, tuple[torch.Generator, list[int]]] = {}
    for row, generator in enumerate(generators):
        rows_by_generator.setdefault(id(generator), (generator, []))[1].append(row)
    uniforms = torch.empty(len(generators), dtype=torch.float64)
    for generator, rows in rows_by_generator.values():
        uniforms[rows] = torch.rand(len(rows), generator=generator, dtype=torch.float64)
    return uniforms


def token_logprobs(
    raw_logits: torch.Tensor, token_ids: Sequence[int], states: Sequence[SamplingState]
) -> list[Optional[TokenLogprobs]]:
    """Each asking row's sampled and top logprobs, from the log-softmax of the raw logits."""
    result: list[Optional[TokenLogprobs]] = [None] * len(states)
    asking = [i for i, state in enumerate(states) if state.params.logprobs is not None]
    if not asking:
        return result
    device = raw_logits.device
    logprobs = torch.log_softmax(raw_logits[torch.tensor(asking, device=device)], dim=-1)
    sampled_ids = torch.tensor([token_ids[i] for i in asking], device=device)[:, None]
    sampled = logprobs.gather(1, sampled_ids).squeeze(1).tolist()
    widest = min(max(states[i].params.logprobs for i in asking), logprobs.shape[-1])
    top_values, top_ids = (t.tolist() for t in logprobs.topk(widest, dim=-1))
    for row, i in enumerate(asking):
        count = states[i].params.logprobs
        top = list(zip(top_ids[row][:count], top_values[row][:count]))
        result[i] = TokenLogprobs(sampled[row], top)
    return result


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-row parameter values as a float tensor on `like`'s device."""
    return torch.tensor(values, dtype=like.dtype, device=like.device)
