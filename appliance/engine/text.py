"""Incremental detokenisation with stop strings, run on the event loop per request."""

from __future__ import annotations

from typing import Any, Optional


class TextStream:
    """Turns token ids into text pieces, holding back what could start a stop string.

    `feed(tokens)` returns the text safe to send now; `stopped` is True once a stop string
    was seen (the text is cut before it), and `used` is then the number of tokens up to the one
    that completed it (tokens after it in the same feed are not part of the answer).
    `flush()` returns what was held back at the end.
    """

    __slots__ = ("_detok", "_stops", "_hold", "_pending", "stopped", "stop_hit", "text_len", "used")

    def __init__(self, tokenizer: Any, stops: tuple[str, ...] = ()) -> None:
        self._detok = tokenizer.detokenizer
        self._stops = tuple(s for s in stops if s)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""
        self.stopped = False
        self.stop_hit: Optional[str] = None  # the stop string that ended the text
        self.text_len = 0
        self.used = 0

    def feed(self, tokens: list[int]) -> str:
        if self.stopped:
            return ""
        detok = self._detok
        if not self._stops:
            for t in tokens:
                detok.add_token(t)
            self.used += len(tokens)
            piece = detok.last_segment
            self.text_len += len(piece)
            return piece
        # With stop strings, token by token: the one that completes a stop string is the last.
        out = []
        for t in tokens:
            detok.add_token(t)
            self.used += 1
            out.append(self._scan(detok.last_segment))
            if self.stopped:
                break
        return "".join(out)

    def _scan(self, piece: str) -> str:
        buf = self._pending + piece
        cut = -1
        for s in self._stops:
            i = buf.find(s)
            if i != -1 and (cut == -1 or i < cut):
                cut, self.stop_hit = i, s
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
