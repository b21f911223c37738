"""An incremental scanner of one JSON value, for streaming tool-call arguments.

`JsonScan.push(ch)` takes one character at a time and says whether the value goes on, is
complete, or cannot be JSON. Beside validating, it keeps what should be streamed:

- `out`: the characters seen, with one repair: a raw control character inside a string (a model
  writing code with real newlines) is written as its JSON escape, so the result stays valid;
- `safe`: the length of `out` that may be sent now, and `tail`: the shortest suffix that turns
  `out[:safe]` into valid JSON. A comma is held until what follows it is decided, a key until
  its colon, a number or literal until it ends, an escape until it is whole; so a value cut off
  at any point is completed by closing strings and containers (plus `null` after a dangling
  colon) without taking back anything already sent.
"""

from __future__ import annotations

import json
import re
from typing import Optional

__all__ = ["CONT", "DONE", "END", "ERR", "JsonScan"]

CONT = 0  # consumed; the value goes on
DONE = 1  # consumed; the value is complete
END = 2  # the value was complete before this character, which is not consumed
ERR = 3  # this character cannot follow; not consumed

_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\Z")
_NUM_CHARS = frozenset("0123456789+-.eE")
_WS = frozenset(" \t\n\r")
_ESC = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}
_HEX = frozenset("0123456789abcdefABCDEF")

# States
_VALUE = 0  # a value is expected (start, after ':' or after ',' in an array)
_OBJ_OPEN = 1  # after '{': a key or '}'
_KEY = 2  # after ',' in an object: a key
_IN_KEY = 3
_COLON = 4
_IN_STR = 5
_NUMBER_ST = 6
_LITERAL = 7
_AFTER = 8  # after a value: ',' or a closer
_ARR_OPEN = 9  # after '[': a value or ']'
_DONE = 10


class JsonScan:
    """Scans one JSON value character by character; see the module docstring."""

    __slots__ = (
        "stack",
        "state",
        "after_colon",
        "esc",
        "uni",
        "word",
        "num",
        "key",
        "out",
        "safe",
        "tail",
        "_top",
        "_sent",
    )

    def __init__(self, *, top: Optional[str] = None) -> None:
        # `top`: the characters the value may start with ("{" for arguments); None: any value.
        self.stack = ""  # 'o' object, 'a' array
        self.state = _VALUE
        self.after_colon = False
        self.esc = False
        self.uni = 0  # hex digits still expected after \u
        self.word = ""  # the rest of true/false/null
        self.num = ""
        self.key: list[str] = []  # the raw key being read (inside the quotes)
        self.out: list[str] = []
        self.safe = 0
        self.tail: Optional[str] = None  # None until the first safe point
        self._top = top
        self._sent = 0  # entries of `out` handed out by take()

    # -- results
    def text(self) -> str:
        return "".join(self.out)

    @property
    def done(self) -> bool:
        return self.state == _DONE

    def last_key(self) -> str:
        """The last key read (decoded), for the caller that tracks keys of the top object."""
        try:
            return str(json.loads('"' + "".join(self.key) + '"'))
        except ValueError:
            return "".join(self.key)

    def finish(self) -> bool:
        """At the end of input: True when the value is complete (a trailing number ends here)."""
        if self.state == _NUMBER_ST and _NUMBER.match(self.num):
            # A number cut by the end of input is taken as it stands.
            self.state = _AFTER if self.stack else _DONE
            self._mark_safe()
        return self.state == _DONE

    def take(self) -> str:
        """The text that became safe to send since the last call (`safe` counts `out` entries)."""
        if self.safe <= self._sent:
            return ""
        piece = "".join(self.out[self._sent : self.safe])
        self._sent = self.safe
        return piece

    def take_closed(self) -> str:
        """At the end: what is left to send so that everything sent is one valid JSON value."""
        return self.take() + self.completion()

    def completion(self) -> str:
        """What closes the value from the last safe point (`out[:safe] + completion()`)."""
        if self.state == _DONE:
            return ""
        return self.tail or ""

    # -- scanning
    def push(self, ch: str) -> int:
        st = self.state
        if st == _IN_STR or st == _IN_KEY:
            return self._in_string(ch, st == _IN_KEY)
        if st == _NUMBER_ST:
            if ch in _NUM_CHARS:
                self.num += ch
                self.out.append(ch)
                return CONT
            if not _NUMBER.match(self.num):
                return ERR
            self.state = _AFTER
            if not self.stack:
                self.state = _DONE
                self._mark_safe()
                return END
            self._mark_safe()
            return self.push(ch)
        if st == _LITERAL:
            if ch != self.word[0]:
                return ERR
            self.word = self.word[1:]
            self.out.append(ch)
            if not self.word:
                return self._value_end()
            return CONT
        if st == _DONE:
            return END
        if ch in _WS:
            if not self.out:
                return CONT  # leading whitespace is not part of the value
            self.out.append(ch)
            if st in (_AFTER, _OBJ_OPEN, _ARR_OPEN) or (st == _VALUE and self.after_colon):
                self._mark_safe()
            return CONT
        if st == _VALUE or st == _ARR_OPEN:
            if st == _ARR_OPEN and ch == "]":
                return self._close("a", ch)
            if not self.out and self._top is not None and ch not in self._top:
                return ERR
            return self._value_start(ch)
        if st == _OBJ_OPEN or st == _KEY:
            if ch == '"':
                self.state = _IN_KEY
                self.key = []
                self.out.append(ch)
                return CONT
            if ch == "}" and st == _OBJ_OPEN:
                return self._close("o", ch)
            return ERR
        if st == _COLON:
            if ch != ":":
                return ERR
            self.out.append(ch)
            self.state = _VALUE
            self.after_colon = True
            self._mark_safe()
            return CONT
        if st == _AFTER:
            top = self.stack[-1]
            if ch == ",":
                self.out.append(ch)
                self.state = _KEY if top == "o" else _VALUE
                self.after_colon = False
                return CONT
            if ch == "}" or ch == "]":
                return self._close("o" if ch == "}" else "a", ch)
            return ERR
        return ERR

    def _value_start(self, ch: str) -> int:
        self.after_colon = False
        if ch == "{":
            self.stack += "o"
            self.out.append(ch)
            self.state = _OBJ_OPEN
            self._mark_safe()
            return CONT
        if ch == "[":
            self.stack += "a"
            self.out.append(ch)
            self.state = _ARR_OPEN
            self._mark_safe()
            return CONT
        if ch == '"':
            self.out.append(ch)
            self.state = _IN_STR
            self.esc = False
            self.uni = 0
            self._mark_safe()
            return CONT
        if ch == "-" or ch.isdigit() and ch.isascii():
            self.num = ch
            self.out.append(ch)
            self.state = _NUMBER_ST
            return CONT
        for word in ("true", "false", "null"):
            if ch == word[0]:
                self.word = word[1:]
                self.out.append(ch)
                self.state = _LITERAL
                return CONT
        return ERR

    def _in_string(self, ch: str, is_key: bool) -> int:
        if self.uni:
            if ch not in _HEX:
                return ERR
            self.uni -= 1
            self.out.append(ch)
            if is_key:
                self.key.append(ch)
            if not self.uni and not is_key:
                self.safe = len(self.out)
            return CONT
        if self.esc:
            if ch not in '"\\/bfnrtu':
                return ERR
            self.esc = False
            self.out.append(ch)
            if is_key:
                self.key.append(ch)
            if ch == "u":
                self.uni = 4
            elif not is_key:
                self.safe = len(self.out)
            return CONT
        if ch == "\\":
            self.esc = True
            self.out.append(ch)
            if is_key:
                self.key.append(ch)
            return CONT
        if ch == '"':
            self.out.append(ch)
            if is_key:
                self.state = _COLON
                return CONT
            return self._value_end()
        if ch < " ":
            # A raw control character is not JSON: write its escape instead.
            rep = _ESC.get(ch) or f"\\u{ord(ch):04x}"
            self.out.append(rep)
            if is_key:
                self.key.append(rep)
        else:
            self.out.append(ch)
            if is_key:
                self.key.append(ch)
        if not is_key:
            self.safe = len(self.out)  # the tail ('"' and closers) was set at the opening quote
        return CONT

    def _value_end(self) -> int:
        if not self.stack:
            self.state = _DONE
            self._mark_safe()
            return DONE
        self.state = _AFTER
        self._mark_safe()
        return CONT

    def _close(self, kind: str, ch: str) -> int:
        if not self.stack or self.stack[-1] != kind:
            return ERR
        self.stack = self.stack[:-1]
        self.out.append(ch)
        return self._value_end()

    def _mark_safe(self) -> None:
        self.safe = len(self.out)
        closers = "".join("}" if c == "o" else "]" for c in reversed(self.stack))
        st = self.state
        if st == _IN_STR:
            self.tail = '"' + closers
        elif st == _VALUE and self.after_colon:
            self.tail = "null" + closers
        else:
            self.tail = closers
