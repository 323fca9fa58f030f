"""Streamed answers: one request's tokens turned into the text deltas of its stream."""

from __future__ import annotations

from collections.abc import Sequence


class TextStream:
    """One request's tokens turned into the text deltas of its stream.

    The deltas add up to exactly the text a non-streamed request returns: whitespace at the
    end is held back until more text follows (the answer is stripped), as is any tail that
    could be the start of a stop string; the text ends where a stop string begins. Tokens are
    decoded in a short window (the last emitted tokens as context), and a window ending in a
    partial UTF-8 character waits for the next token."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self._tok = tokenizer
        self.stops = [s for s in stop if s]
        self.tokens: list[int] = []
        self._prefix = 0  # tokens[_prefix:_read] is the context already in ``raw``
        self._read = 0
        self.raw = ""
        self.sent = ""
        self._scanned = 0  # ``raw`` before this index holds no stop string

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def feed(self, token: int) -> None:
        self.tokens.append(token)
        before = self._decode(self.tokens[self._prefix : self._read])
        after = self._decode(self.tokens[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.raw += after[len(before) :]
            self._prefix, self._read = self._read, len(self.tokens)

    def feed_text(self, piece: str) -> None:
        """Text decoded elsewhere (another engine's stream), instead of tokens."""
        self.raw += piece

    def advance(self, final: bool = False) -> tuple[str, bool]:
        """(new text to send, whether a stop string ended the answer). ``final``: the answer is
        complete, so nothing is held back (and the whole answer is decoded at once)."""
        text = self._decode(self.tokens) if final and self.tokens else self.raw
        cut = None
        start = 0 if final else max(0, self._scanned - max((len(s) for s in self.stops), default=0))
        for s in self.stops:
            i = text.find(s, start)
            if i >= 0 and (cut is None or i < cut):
                cut = i
        self._scanned = len(text)
        if cut is not None:
            text = text[:cut]
        elif not final:
            text = text[: len(text) - self._held_tail(text)]
        visible = text.strip()
        delta = visible[len(self.sent) :] if visible.startswith(self.sent) else ""
        self.sent += delta
        return delta, cut is not None

    def _held_tail(self, text: str) -> int:
        """Length of the longest end of ``text`` that a stop string starts with (not all of it)."""
        for k in range(min(len(text), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) and len(s) > k for s in self.stops):
                return k
        return 0
