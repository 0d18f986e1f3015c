"""IncrementalDetokenizer against full decodes with SmolLM2's byte-level BPE tokenizer.

The reference is `tokenizer.decode(output_ids)`: after `flush()` the incremental text must
equal it, and the streamed pieces must add up to the text. Sequences come from real
sentences (with characters of 2, 3 and 4 UTF-8 bytes, split across tokens by the tokenizer),
from single-byte tokens built by hand, and from random ids mixing vocabulary, byte and
special tokens.
"""
import random

import pytest

from fuselm.models.tokenizer import byte_alphabet
from fuselm.runtime.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer

SENTENCES = [
    "Hello world, the answer is 42.",
    "Café crème brûlée, s'il vous plaît: é è ê ë.",
    "日本語のテキストです。東京は大きい。",
    "Emoji time 🙂🚀 and more 🎉👍🏽 done.",
    "Mixed: naïve façade — 中文, Ελληνικά, русский, עברית 🙂",
    "  leading spaces\n\ttabs and\nnewlines  ",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2.tokenizer


def byte_token_ids(tokenizer, text: str) -> list[int]:
    """One single-byte token per UTF-8 byte of `text`."""
    alphabet = byte_alphabet()
    return [tokenizer.token_to_id(alphabet[b]) for b in text.encode("utf-8")]


def stream(tokenizer, ids, prompt=(), **options):
    """Feed `ids` one by one, calling stream_piece after each; returns (detokenizer, pieces, stops)."""
    detokenizer = IncrementalDetokenizer(tokenizer, list(prompt), **options)
    pieces, stops = [], []
    for token_id in ids:
        stops.append(detokenizer.add_token(token_id))
        pieces.append(detokenizer.stream_piece())
        if stops[-1] is not None:
            break
    pieces.append(detokenizer.flush())
    return detokenizer, pieces, stops


# -- equality with a full decode --------------------------------------------------------

@pytest.mark.parametrize("sentence", SENTENCES)
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_text_follows_full_decode_on_sentences(tokenizer, sentence, skip_special_tokens):
    ids = tokenizer.encode(sentence, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("Say something:"),
                                         skip_special_tokens=skip_special_tokens)
    for count, token_id in enumerate(ids, start=1):
        detokenizer.add_token(token_id)
        assert detokenizer.text == text_so_far(tokenizer, ids[:count])
    detokenizer.flush()
    assert detokenizer.text == sentence == tokenizer.decode(ids)


def text_so_far(tokenizer, ids) -> str:
    """What `text` must be after `ids` of valid UTF-8: their decode, less the last token's
    text while that ends in a partial character (the whole token's text waits)."""
    full = tokenizer.decode(ids)
    if not full.endswith(REPLACEMENT_CHAR):
        return full
    return text_so_far(tokenizer, ids[:-1])


def random_ids(tokenizer, rng: random.Random, length: int) -> list[int]:
    """Vocabulary, single-byte (mostly non-ASCII) and special tokens, mixed."""
    alphabet = byte_alphabet()
    byte_ids = [i for i in map(tokenizer.token_to_id, map(alphabet.get, range(128, 256))) if i is not None]
    pick = [lambda: rng.randrange(17, tokenizer.vocab_size), lambda: rng.choice(byte_ids),
            lambda: rng.randrange(0, 17)]
    return [rng.choice(pick)() for _ in range(length)]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_text_equals_full_decode_on_random_ids(tokenizer, skip_special_tokens):
    rng = random.Random(0)
    for _ in range(300):
        ids = random_ids(tokenizer, rng, rng.randrange(1, 40))
        detokenizer, pieces, _ = stream(tokenizer, ids, prompt=random_ids(tokenizer, rng, 6),
                                        skip_special_tokens=skip_special_tokens)
        assert detokenizer.text == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), ids
        assert "".join(pieces) == detokenizer.text


class CountingTokenizer:
    """Records how many ids each decode call was given."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.window_sizes = []

    def decode(self, ids, skip_special_tokens=False):
        self.window_sizes.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_each_step_decodes_a_few_tokens_only(tokenizer):
    ids = tokenizer.encode(" ".join(SENTENCES * 10), add_special_tokens=False)
    counting = CountingTokenizer(tokenizer)
    detokenizer, _, _ = stream(counting, ids, prompt=tokenizer.encode("Say:"))
    assert len(ids) > 500
    assert detokenizer.text == tokenizer.decode(ids)
    assert max(counting.window_sizes) <= 8
    assert len(counting.window_sizes) <= 2 * len(ids) + 3


# -- stop strings -----------------------------------------------------------------------

@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_two_tokens(tokenizer, include):
    ids = tokenizer.encode("Hello world, the answer is 42.", add_special_tokens=False)
    pieces_of = [tokenizer.decode([i]) for i in ids]
    assert pieces_of[4:6] == [" answer", " is"]  # "wer is" starts in one token, ends in the next
    detokenizer, pieces, stops = stream(tokenizer, ids, stop=["wer is"], include_stop_str_in_output=include)
    assert stops == [None] * 5 + ["wer is"]
    assert detokenizer.stop_string == "wer is"
    assert detokenizer.text == ("Hello world, the answer is" if include else "Hello world, the ans")
    assert "".join(pieces) == detokenizer.text
    with pytest.raises(RuntimeError):
        detokenizer.add_token(ids[6])


@pytest.mark.parametrize("stop, expected", [
    (("mat", "for", "tion"), " in"),      # earliest start wins, whatever the list order
    (("tion", "mat", "for"), " in"),
    (("form", "for"), " in"),             # same start: the shorter, which ends first
    (("ion", "nform"), " i"),
])
def test_earliest_of_several_stop_strings_within_one_token(tokenizer, stop, expected):
    ids = tokenizer.encode(" information", add_special_tokens=False)
    assert len(ids) == 1
    detokenizer, _, _ = stream(tokenizer, ids, stop=stop)
    assert detokenizer.text == expected


def test_first_completed_stop_string_across_tokens(tokenizer):
    ids = tokenizer.encode("Hello world, the answer is 42.", add_special_tokens=False)
    detokenizer, _, stops = stream(tokenizer, ids, stop=["42", "answer", "world, the"])
    assert stops[-1] == "world, the" and detokenizer.text == "Hello "


def test_stream_holds_back_a_possible_stop_string_until_it_fails(tokenizer):
    ids = tokenizer.encode("the answer is 41.", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=[" is 42"])
    streamed = []
    for token_id in ids:
        assert detokenizer.add_token(token_id) is None
        streamed.append(detokenizer.stream_piece())
    assert streamed == ["the", " answer", "", "", "", " is 41", "."]
    assert detokenizer.flush() == ""


@pytest.mark.parametrize("include", [False, True])
def test_stream_never_emits_a_stop_prefix_that_later_matches(tokenizer, include):
    rng = random.Random(1)
    for sentence in SENTENCES:
        ids = tokenizer.encode(sentence, add_special_tokens=False)
        full = tokenizer.decode(ids)
        for _ in range(20):
            start = rng.randrange(len(full))
            stop = full[start:start + rng.randrange(1, 8)]
            check_streaming_with_stop(tokenizer, ids, full, stop, include)


def check_streaming_with_stop(tokenizer, ids, full, stop, include):
    index = full.find(stop)
    expected = full[:index + len(stop)] if include else full[:index]
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=[stop], include_stop_str_in_output=include)
    streamed = ""
    for token_id in ids:
        returned = detokenizer.add_token(token_id)
        streamed += detokenizer.stream_piece()
        assert expected.startswith(streamed), (stop, streamed)
        if returned is not None:
            break
    assert returned == stop
    streamed += detokenizer.flush()
    assert streamed == detokenizer.text == expected


# -- multi-byte characters and special tokens ------------------------------------------

def test_emoji_split_across_tokens_never_streams_replacement_char(tokenizer):
    ids = tokenizer.encode("🙂🚀 ok 🎉", add_special_tokens=False)
    assert len(ids) > 3  # each emoji is split into several tokens
    detokenizer, pieces, _ = stream(tokenizer, ids)
    assert all(REPLACEMENT_CHAR not in piece for piece in pieces)
    assert "".join(pieces) == detokenizer.text == "🙂🚀 ok 🎉"


def test_single_byte_tokens_emit_whole_characters_only(tokenizer):
    text = "日本語 é🙂"
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    texts = []
    for token_id in byte_token_ids(tokenizer, text):
        detokenizer.add_token(token_id)
        assert REPLACEMENT_CHAR not in detokenizer.stream_piece()
        texts.append(detokenizer.text)
    assert texts == ["", "", "日", "日", "日", "日本", "日本", "日本", "日本語", "日本語 ", "日本語 ",
                     "日本語 é", "日本語 é", "日本語 é", "日本語 é", "日本語 é🙂"]


def test_stop_string_of_a_multibyte_character(tokenizer):
    ids = byte_token_ids(tokenizer, "日本語")
    detokenizer, pieces, stops = stream(tokenizer, ids, stop=["本"])
    assert stops == [None] * 5 + ["本"]
    assert "".join(pieces) == detokenizer.text == "日"


def test_flush_decodes_an_incomplete_character_as_full_decode_does(tokenizer):
    ids = byte_token_ids(tokenizer, "a日")[:3]  # "a" and two of the three bytes of "日"
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    for token_id in ids:
        detokenizer.add_token(token_id)
    assert detokenizer.text == "a"
    assert detokenizer.stream_piece() == "a"
    assert detokenizer.flush() == REPLACEMENT_CHAR
    assert detokenizer.text == tokenizer.decode(ids) == "a" + REPLACEMENT_CHAR


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens(tokenizer, skip_special_tokens):
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_ids[0]
    ids = [start, *tokenizer.encode("assistant\nHi 🙂", add_special_tokens=False), end]
    detokenizer, pieces, _ = stream(tokenizer, ids, skip_special_tokens=skip_special_tokens)
    expected = ("assistant\nHi 🙂" if skip_special_tokens
                else "<|im_start|>assistant\nHi 🙂<|im_end|>")
    assert "".join(pieces) == detokenizer.text == expected


def test_special_token_inside_a_split_character_is_skipped(tokenizer):
    first, *rest = byte_token_ids(tokenizer, "日")
    ids = [first, tokenizer.eos_token_ids[0], *rest]
    detokenizer, pieces, _ = stream(tokenizer, ids)
    assert "".join(pieces) == detokenizer.text == tokenizer.decode(ids, skip_special_tokens=True) == "日"


def test_prompt_is_context_only(tokenizer):
    prompt = tokenizer.encode("Hello", add_special_tokens=False)
    detokenizer, _, _ = stream(tokenizer, tokenizer.encode(" world", add_special_tokens=False), prompt=prompt)
    assert detokenizer.text == " world"
    # a prompt ending inside a character does not complete the output's first bytes
    emoji = byte_token_ids(tokenizer, "🙂")
    detokenizer, _, _ = stream(tokenizer, emoji[2:], prompt=emoji[:2])
    assert detokenizer.text == tokenizer.decode(emoji[2:])
    assert detokenizer.output_token_ids == emoji[2:]
