"""Incremental detokenization and stop strings for streamed text. Torch-free.

:class:`IncrementalDetokenizer` turns a growing list of token ids into text deltas. It decodes a short
window of tokens (from ``prefix_offset``) twice, with and without the newest tokens, and hands out the
difference only when that text does not end in U+FFFD: a byte-level tokenizer can split one UTF-8
character over several tokens, and the replacement character means "the rest of this character has not
arrived yet". Decoding a window instead of the whole output keeps the cost per token constant and lets
tokenizers that change a token's leading space by context (SentencePiece) see that context.

:class:`StopStringMatcher` sits after it: it holds back the longest tail of the text that could still
become a stop string, so a stop string is never streamed out, and reports where the first one ends the
text (the stop string itself is not part of the output, as in OpenAI's API).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHARACTER = "\ufffd"


class IncrementalDetokenizer:
    """``push(new_token_ids) -> text delta``; ``flush() -> the text still held back`` (at the end)."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # start of the decoding window
        self.read_offset = 0  # tokens before this have been turned into text already
        self.text = ""  # everything handed out so far

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def push(self, new_token_ids: Sequence[int]) -> str:
        if self.tokenizer is None or not new_token_ids:
            self.token_ids.extend(new_token_ids)
            return ""
        self.token_ids.extend(new_token_ids)
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHARACTER):
            return ""  # an incomplete character (or nothing visible yet): wait for more tokens
        delta = full_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of the request: whatever is still held back (an incomplete character included)."""
        if self.tokenizer is None or self.read_offset == len(self.token_ids):
            return ""
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset:])
        delta = full_text[len(prefix_text):] if full_text.startswith(prefix_text) else ""
        self.prefix_offset = self.read_offset = len(self.token_ids)
        self.text += delta
        return delta


class StopStringMatcher:
    """``push(delta) -> (text safe to emit, stopped)``; ``flush() -> held-back text`` when the request
    ends without a stop string. After ``stopped`` the output ends before the first stop string."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = tuple(s for s in stop if s)
        self.pending = ""  # text not yet emitted: it may be the start of a stop string
        self.stopped = False

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest

    def push(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stop:
            return delta, False
        text = self.pending + delta
        first = min((index for index in (text.find(stop) for stop in self.stop) if index >= 0), default=-1)
        if first >= 0:
            self.pending = ""
            self.stopped = True
            return text[:first], True
        keep = self._held_back(text)
        self.pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        pending, self.pending = self.pending, ""
        return "" if self.stopped else pending
