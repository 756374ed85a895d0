"""One answer's text as its tokens arrive: where a stop sequence cuts it, and which part is safe to stream.

Pure string logic over a `decode(ids) -> str` function, so it is tested without a model. A streamed answer
joined together equals the non-streamed one: text is held back while it could still turn out to be the start
of a stop sequence, an incomplete UTF-8 character, or (for chat, which strips answers like `tunesmith chat`
and `eval` do) trailing whitespace.
"""
from __future__ import annotations

from typing import Callable

INCOMPLETE = "\ufffd"  # what decoding shows for a multi-byte character whose last bytes have not arrived yet


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop sequence starts in `text` (None: none occurs)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could be the beginning of a stop sequence."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def safe_prefix(text: str, stops: list[str], strip: bool) -> str:
    """The part of an unfinished answer that no later token can change."""
    text = text.rstrip(INCOMPLETE)
    text = text[: len(text) - held_back(text, stops)]
    return text.rstrip() if strip else text


class AnswerText:
    """The text of one answer being generated. `add` a token, get the new text to stream; `finish` for the rest."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str], strip: bool):
        self.decode = decode
        self.stops = stops
        self.strip = strip
        self.ids: list[int] = []
        self.emitted = ""
        self.final: str | None = None  # set when a stop sequence ended the answer

    @property
    def stopped(self) -> bool:
        return self.final is not None

    def _visible(self) -> str:
        text = self.decode(self.ids)
        return text.lstrip() if self.strip else text

    def _emit(self, text: str) -> str:
        if not text.startswith(self.emitted):  # decoding revised text already sent: send nothing, keep going
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self._visible()
        cut = first_stop(text, self.stops)
        if cut is not None:
            self.final = text[:cut].rstrip() if self.strip else text[:cut]
            return self._emit(self.final)
        return self._emit(safe_prefix(text, self.stops, self.strip))

    def finish(self) -> str:
        """The text not streamed yet, once no more tokens come."""
        if self.final is None:
            text = self._visible()
            self.final = text.rstrip() if self.strip else text
        return self._emit(self.final)

    @property
    def text(self) -> str:
        return self.final if self.final is not None else self.emitted
