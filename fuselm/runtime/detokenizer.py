"""Incremental detokenization with stop strings: token ids in, streamable text out.

A request's text grows one token at a time, and decoding all its output ids again at every
step would cost O(length) per token. Like vLLM's detokenizer, we decode a small window
instead and take the difference of two decodes:

    ids:   ... prompt ... | out out out out out
                 prefix_offset ^      read_offset ^
    prefix_text = decode(ids[prefix_offset:read_offset])   # already emitted, decoded again
    window_text = decode(ids[prefix_offset:])              # the same, plus the new tokens
    new text    = window_text[len(prefix_text):]

The prefix tokens are context: a decoder may spell a token differently at the start of a
text (SentencePiece drops a leading space), so the new tokens are never decoded alone. The
first window starts a few prompt tokens back for the same reason.

A byte-level BPE token may carry only part of a UTF-8 character. While the window's text
ends in U+FFFD (the decoder's stand-in for incomplete bytes) nothing is emitted and the
offsets stay put, so the window grows until the character is complete. Otherwise both
offsets move up: the tokens just read become the next step's context. Each step therefore
decodes only the last emitted chunk plus the pending tokens, and the concatenation of the
chunks equals `tokenizer.decode(output_ids)`. UTF-8 resynchronizes after every complete
character, which is why the difference is exact for byte-level BPE. Pending tokens are the
at most three that carry one character's bytes, plus skipped special tokens; only a run of
invalid bytes (each decoding to U+FFFD) keeps the window growing, as in vLLM.

Stop strings are searched for in the new text plus the `len(longest stop) - 1` characters
before it, since a match ending in the new text can start no earlier; a step costs O(1) in
the length of the text. The earliest-starting match in that region wins (the shorter one
on a tie) and the text is cut before it, or after it with `include_stop_str_in_output`.

Streaming holds back the longest suffix of the text that is a proper prefix of some stop
string, since the next token may complete the match and the stop string must not have been
sent. `text` never ends in a partial character, so the stream never shows U+FFFD for one.
`flush()` ends the request: bytes that never completed a character are decoded as U+FFFD
(as a full decode spells them) and everything not yet sent is returned.

`deferred=True` (a request with no stop strings whose text nobody reads before it ends,
as in `generate`) decodes nothing per token: `flush` decodes the whole output once, the
same text as the chunks would have made.
"""
from __future__ import annotations

from typing import Optional, Sequence

REPLACEMENT_CHAR = "\ufffd"  # what decoding yields for incomplete or invalid UTF-8
PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded as context for the first output tokens


class IncrementalDetokenizer:
    """One request's output text, built token by token, cut at the first stop string."""

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], *, skip_special_tokens: bool = True,
                 stop: Sequence[str] = (), include_stop_str_in_output: bool = False, deferred: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = tuple(dict.fromkeys(s for s in stop if s))
        self.deferred = deferred and not self.stop
        self.include_stop_str_in_output = include_stop_str_in_output
        self.text = ""
        self.stop_string: Optional[str] = None  # the stop string that ended the request
        self.finished = False
        self._max_stop_length = max(map(len, self.stop), default=0)
        self._ids = prompt_context(tokenizer, list(prompt_token_ids), skip_special_tokens)
        self._output_start = len(self._ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._emitted = 0  # characters of `text` handed out by stream_piece/flush

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._output_start:]

    def add_token(self, token_id: int) -> Optional[str]:
        """Append one generated token; returns the stop string if this token completed one (then
        `text` is cut: ending before the stop string, or right after it when include_stop_str_in_output)."""
        if self.finished:
            raise RuntimeError("the request has ended (stop string or flush): no more tokens")
        self._ids.append(token_id)
        if self.deferred:
            return None
        new_text = self._decode_new_text(final=False)
        return self._append_text(new_text) if new_text else None

    def stream_piece(self) -> str:
        """The new text that is safe to emit since the last call: it holds back any tail that could
        still be the start of a stop string (the longest suffix of the text that is a prefix of some
        stop string) and incomplete UTF-8."""
        safe_end = len(self.text) if self.finished else len(self.text) - self._stop_prefix_length()
        return self._emit_up_to(safe_end)

    def flush(self) -> str:
        """At the end of the request: everything not yet emitted (the held-back tail, since the request ended)."""
        if not self.finished:
            tail = self._decode_new_text(final=True)
            if tail:
                self._append_text(tail)
        self.finished = True
        return self._emit_up_to(len(self.text))

    # -- decoding -------------------------------------------------------------------

    def _decode(self, start: int, end: Optional[int] = None) -> str:
        return self.tokenizer.decode(self._ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def _decode_new_text(self, final: bool) -> str:
        """The text the pending tokens add, or "" while it may still end in a partial character."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        window_text = self._decode(self._prefix_offset)
        if len(window_text) <= len(prefix_text):  # e.g. a skipped special token
            return ""
        if window_text.endswith(REPLACEMENT_CHAR) and not final:
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return window_text[len(prefix_text):]

    # -- stop strings ---------------------------------------------------------------

    def _append_text(self, new_text: str) -> Optional[str]:
        search_start = max(0, len(self.text) - (self._max_stop_length - 1))
        self.text += new_text
        match = self._earliest_stop(search_start)
        if match is None:
            return None
        start, stop_string = match
        end = start + len(stop_string) if self.include_stop_str_in_output else start
        self.text = self.text[:end]
        self.stop_string = stop_string
        self.finished = True
        return stop_string

    def _earliest_stop(self, search_start: int) -> Optional[tuple[int, str]]:
        found = [(index, len(s), s) for s in self.stop if (index := self.text.find(s, search_start)) >= 0]
        if not found:
            return None
        index, _, stop_string = min(found)
        return index, stop_string

    def _stop_prefix_length(self) -> int:
        return max((stop_prefix_at_end(self.text, s) for s in self.stop), default=0)

    def _emit_up_to(self, end: int) -> str:
        piece = self.text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return piece


def stop_prefix_at_end(text: str, stop_string: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop_string`."""
    for length in range(min(len(stop_string) - 1, len(text)), 0, -1):
        if text.endswith(stop_string[:length]):
            return length
    return 0


def prompt_context(tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool) -> list[int]:
    """The last few prompt tokens, kept as decoding context for the first output tokens.

    None (empty) when the prompt ends inside a character: its tail would merge with the
    output's first bytes, and the output's text must decode as the output alone does."""
    context = prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]
    text = tokenizer.decode(context, skip_special_tokens=skip_special_tokens)
    return [] if text.endswith(REPLACEMENT_CHAR) else context
