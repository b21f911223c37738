"""Incremental detokenisation with stop strings, run on the event loop per request."""

from __future__ import annotations

from typing import Any


class TextStream:
    """Turns token ids into text pieces, holding back what could start a stop string.

    `feed(tokens)` returns the text safe to send now; `stopped` is True once a stop string
    was seen (the text is cut before it). `flush()` returns what was held back at the end.
    """

    __slots__ = ("_detok", "_stops", "_hold", "_pending", "stopped", "text_len")

    def __init__(self, tokenizer: Any, stops: tuple[str, ...] = ()) -> None:
        self._detok = tokenizer.detokenizer
        self._stops = tuple(s for s in stops if s)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""
        self.stopped = False
        self.text_len = 0

    def feed(self, tokens: list[int]) -> str:
        if self.stopped:
            return ""
        detok = self._detok
        for t in tokens:
            detok.add_token(t)
        piece = detok.last_segment
        if not self._stops:
            self.text_len += len(piece)
            return piece
        return self._scan(piece)

    def _scan(self, piece: str) -> str:
        buf = self._pending + piece
        cut = -1
        for s in self._stops:
            i = buf.find(s)
            if i != -1 and (cut == -1 or i < cut):
                cut = i
        if cut != -1:
            self.stopped = True
            self._pending = ""
            out = buf[:cut]
        else:
            # Keep back the longest tail that is a prefix of some stop string.
            keep = 0
            for n in range(min(self._hold, len(buf)), 0, -1):
                tail = buf[-n:]
                if any(s.startswith(tail) for s in self._stops):
                    keep = n
                    break
            out = buf[: len(buf) - keep]
            self._pending = buf[len(buf) - keep :]
        self.text_len += len(out)
        return out

    def flush(self) -> str:
        if self.stopped:
            return ""
        self._detok.finalize()
        piece = self._detok.last_segment
        if self._stops:
            out = self._scan(piece)
            if not self.stopped:
                out += self._pending
                self._pending = ""
            return out
        self.text_len += len(piece)
        return piece
