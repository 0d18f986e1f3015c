"""The sampling layer on synthetic logits: parameter checks, greedy, seeds, penalties,
logprobs, and the distributions of the sampled rows.

The distribution tests draw 20000 tokens from a fixed 12-token logits vector (one
batch of identical rows) and compare the counts with a reference distribution computed
here in plain Python, by a chi-square test at p = 0.001; tokens the reference excludes
must never be drawn.
"""
import math

import numpy as np
import pytest
import torch

from fuselm.runtime.sampler import Sampler, SamplingState, apply_penalties
from fuselm.sampling_params import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOGITS = [3.0, 2.6, 2.2, 1.9, 1.5, 1.1, 0.8, 0.4, 0.0, -0.4, -0.9, -1.5]
SAMPLES = 20000


def states_for(params: SamplingParams, rows: int, prompt=()) -> list[SamplingState]:
    return [SamplingState.create(params, prompt) for _ in range(rows)]


# -- SamplingParams -------------------------------------------------------------------

INVALID = [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("temperature", "hot"), ("top_k", -2), ("top_k", 1.5), ("top_k", True),
    ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.1), ("min_p", 1.1),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5), ("presence_penalty", -3.0), ("frequency_penalty", 2.1),
    ("seed", "1"), ("seed", 1.5), ("seed", 2**64), ("max_tokens", 0), ("max_tokens", "5"),
    ("logprobs", -1), ("stop", ""), ("stop", ["a", ""]), ("stop", 5),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["a"]), ("ignore_eos", "yes"),
]


@pytest.mark.parametrize("name,value", INVALID, ids=[f"{n}={v!r}" for n, v in INVALID])
def test_invalid_parameter_is_named(name, value):
    with pytest.raises(ValueError, match=name) as error:
        SamplingParams(**{name: value})
    assert repr(value) in str(error.value)


def test_range_message_states_the_rule():
    with pytest.raises(ValueError, match=r"^top_p must be in \(0, 1\], got 1.5$"):
        SamplingParams(top_p=1.5)


def test_edge_values_are_accepted_and_normalized():
    params = SamplingParams(
        temperature=0, top_k=-1, top_p=1, min_p=1, max_tokens=None, logprobs=0,
        seed=np.int64(3), stop="###", stop_token_ids=[2, 7],
    )
    assert (params.stop, params.stop_token_ids) == (("###",), (2, 7))
    assert type(params.seed) is int and type(params.temperature) is float
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams().stop == () and SamplingParams().stop_token_ids == ()


def test_greedy_property():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(top_k=1).greedy
    assert not SamplingParams().greedy and not SamplingParams(top_k=2).greedy


# -- greedy and seeds -----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_and_top_k_one_take_the_argmax(device):
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(0)).to(device)
    expected = logits.argmax(dim=-1).tolist()
    for params in (SamplingParams(temperature=0), SamplingParams(top_k=1, temperature=1.0)):
        assert Sampler(seed=0)(logits, states_for(params, 8)).token_ids == expected


def sample_steps(sampler, logits, states, steps=20) -> list[list[int]]:
    """Each row's tokens over `steps` steps, appending them to the states as an engine does."""
    per_row = [[] for _ in states]
    for _ in range(steps):
        for state, tokens, token in zip(states, per_row, sampler(logits, states).token_ids):
            state.output_token_ids.append(token)
            tokens.append(token)
    return per_row


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_row_is_the_same_alone_and_in_a_batch(device):
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(1)).to(device)
    seeded = SamplingParams(seed=7, temperature=0.9, top_p=0.95, presence_penalty=0.5)
    alone = sample_steps(Sampler(), logits[1:2], [SamplingState.create(seeded, [1, 2])])[0]
    batch = [
        SamplingState.create(SamplingParams(repetition_penalty=1.3), [3]),
        SamplingState.create(seeded, [1, 2]),
        SamplingState.create(SamplingParams(temperature=0), []),
        SamplingState.create(SamplingParams(seed=8, top_k=5, min_p=0.1), []),
    ]
    assert sample_steps(Sampler(), logits, batch)[1] == alone


def test_different_seeds_differ_and_samplers_with_one_seed_agree():
    logits = torch.zeros(1, 100)
    by_seed = {seed: sample_steps(Sampler(), logits, states_for(SamplingParams(seed=seed), 1))
               for seed in (1, 2)}
    assert by_seed[1] != by_seed[2]
    unseeded = [sample_steps(Sampler(seed=5), logits, states_for(SamplingParams(), 1))
                for _ in range(2)]
    assert unseeded[0] == unseeded[1]


# -- penalties ------------------------------------------------------------------------


def reference_penalties(row, prompt, output, repetition, presence, frequency):
    row = list(row)
    for token in set(prompt) | set(output):
        row[token] = row[token] / repetition if row[token] > 0 else row[token] * repetition
    for token in set(output):
        row[token] -= presence + frequency * output.count(token)
    return row


def test_penalties_match_a_reference():
    logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(2))
    cases = [  # (prompt, output, repetition, presence, frequency)
        ([1, 2, 3], [3, 4, 4, 4], 1.5, 0.0, 0.0),
        ([0, 5], [5, 6, 6], 1.0, 0.7, 0.3),
        ([7, 8, 8], [], 1.0, 0.0, 0.0),  # no penalties: the row is left alone
        ([9], [9, 10, 10, 11], 0.8, -0.5, 1.2),
    ]
    states = [
        SamplingState(SamplingParams(repetition_penalty=r, presence_penalty=p, frequency_penalty=f),
                      prompt, output)
        for prompt, output, r, p, f in cases
    ]
    expected = [reference_penalties(row, *case) for row, case in zip(logits.tolist(), cases)]
    before = logits.clone()
    assert torch.allclose(apply_penalties(logits, states), torch.tensor(expected), atol=1e-6)
    assert torch.equal(logits, before)


def test_repetition_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[2.0, 1.8, -1.0]])
    state = SamplingState.create(SamplingParams(temperature=0, repetition_penalty=1.2), [0])
    assert Sampler()(logits, [state]).token_ids == [1]  # 2.0 / 1.2 < 1.8


# -- logprobs -------------------------------------------------------------------------


def test_logprobs_come_from_the_raw_logits():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(3))
    asked = [5, 0, None, 100]
    states = [
        SamplingState.create(
            SamplingParams(logprobs=n, temperature=0.5, repetition_penalty=2.0), [0, 1]
        )
        for n in asked
    ]
    output = Sampler(seed=0)(logits, states)
    rows = logits.double().numpy()
    reference = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
    for row, (n, token, result) in enumerate(zip(asked, output.token_ids, output.logprobs)):
        if n is None:
            assert result is None
            continue
        assert result.sampled_logprob == pytest.approx(reference[row, token], abs=1e-5)
        ids = [token_id for token_id, _ in result.top]
        assert ids == list(np.argsort(-reference[row])[: min(n, 30)])
        values = [value for _, value in result.top]
        assert values == sorted(values, reverse=True)
        assert values == pytest.approx(reference[row, ids], abs=1e-5)


# -- distributions --------------------------------------------------------------------


def reference_distribution(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The probabilities the sampler should draw from, step by step in plain Python."""
    probs = softmax([x / temperature for x in logits])
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept = set(order[:top_k] if top_k > 0 else order)
    probs = renormalized(probs, kept)
    if top_p < 1.0:
        mass, kept = 0.0, set()
        for token in order:
            if mass < top_p and probs[token] > 0:
                kept.add(token)
                mass += probs[token]
        probs = renormalized(probs, kept)
    floor = min_p * max(probs)
    return renormalized(probs, {i for i, p in enumerate(probs) if p >= floor and p > 0})


def softmax(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def renormalized(probs, kept):
    total = sum(probs[i] for i in kept)
    return [p / total if i in kept else 0.0 for i, p in enumerate(probs)]


def chi_square_critical(degrees_of_freedom: int, z: float = 3.090232) -> float:
    """The chi-square value exceeded with probability 0.001 (z = its normal quantile),
    by the Wilson–Hilferty approximation."""
    k = degrees_of_freedom
    return k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3


def fits(counts, probs) -> bool:
    expected = [SAMPLES * p for p in probs if p > 0]
    observed = [c for c, p in zip(counts, probs) if p > 0]
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    return statistic < chi_square_critical(len(expected) - 1)


def sampled_counts(params: SamplingParams, device="cpu", seed=0) -> list[int]:
    logits = torch.tensor([LOGITS], device=device).expand(SAMPLES, -1)
    tokens = Sampler(seed=seed)(logits, states_for(params, SAMPLES)).token_ids
    return np.bincount(tokens, minlength=len(LOGITS)).tolist()


DISTRIBUTIONS = {
    "temperature": dict(temperature=0.7),
    "top_k": dict(top_k=5),
    "top_p": dict(top_p=0.8),
    "min_p": dict(min_p=0.1),
    # top-k changes what top-p keeps (8 tokens without it, 7 with), then min-p drops one
    "combined": dict(temperature=0.8, top_k=9, top_p=0.97, min_p=0.08),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(DISTRIBUTIONS))
def test_samples_follow_the_reference_distribution(case, device):
    settings = DISTRIBUTIONS[case]
    probs = reference_distribution(LOGITS, **settings)
    counts = sampled_counts(SamplingParams(**settings), device)
    assert all(c == 0 for c, p in zip(counts, probs) if p == 0), (counts, probs)
    assert fits(counts, probs), (counts, probs)


def test_chi_square_check_rejects_a_wrong_distribution():
    counts = sampled_counts(SamplingParams(temperature=0.7))
    assert not fits(counts, reference_distribution(LOGITS, temperature=1.0))


def test_reference_cuts_are_the_intended_ones():
    """The chosen settings keep these token counts, away from any rounding boundary."""
    kept = {case: sum(p > 0 for p in reference_distribution(LOGITS, **s))
            for case, s in DISTRIBUTIONS.items()}
    assert kept == {"temperature": 12, "top_k": 5, "top_p": 5, "min_p": 7, "combined": 6}


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_rows_keep_their_own_cuts(device):
    """Rows with different settings, interleaved, each draw only from their own support;
    a -inf logit (a masked vocabulary entry) is never drawn."""
    logits = LOGITS[:-1] + [float("-inf")]
    settings = [dict(top_k=3), dict(top_k=50), dict(top_p=0.5), dict(min_p=0.2), dict()]
    rows = 500 * len(settings)
    states = [SamplingState.create(SamplingParams(**settings[i % len(settings)]), [])
              for i in range(rows)]
    batch = torch.tensor([logits], device=device).expand(rows, -1)
    tokens = Sampler(seed=1)(batch, states).token_ids
    for index, setting in enumerate(settings):
        support = {i for i, p in enumerate(reference_distribution(logits, **setting)) if p > 0}
        assert set(tokens[index::len(settings)]) <= support, setting


def test_half_precision_logits_and_a_wrong_batch_size():
    logits = torch.randn(3, 10).half()
    states = states_for(SamplingParams(temperature=0, logprobs=1), 3)
    output = Sampler()(logits, states)
    assert output.token_ids == logits.float().argmax(dim=-1).tolist()
    with pytest.raises(ValueError, match="shape"):
        Sampler()(logits, states[:2])


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached():
    logits = torch.zeros(1, 10)
    logits[0, 3], logits[0, 5], logits[0, 7] = 9.0, 8.0, 7.0  # 3 is EOS, 5 a stop token id
    params = SamplingParams(temperature=0, min_tokens=2, max_tokens=4, stop_token_ids=[5])
    state = SamplingState.create(params, [1, 2], eos_token_ids=[3])
    assert Sampler(seed=0)(logits, [state]).token_ids == [7]
    state.output_token_ids += [7, 7]
    assert Sampler(seed=0)(logits, [state]).token_ids == [3]
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)
