"""What the output parser tells a front-end: small frozen events, in generation order.

- `Text(text)`: answer text, free of tool-call markup and of thinking.
- `Reasoning(text)`: thinking (`<think>...</think>`, harmony's analysis channel).
- `ToolCallStart(index, id, name)`: a call began; its name is known. `index` counts calls in
  this answer from 0.
- `ToolCallArgs(index, delta)`: a piece of that call's arguments, a JSON text.
- `ToolCallEnd(index, arguments)`: the call is complete; `arguments` is a JSON object text and
  equals the concatenation of the call's `ToolCallArgs` deltas, exactly.

A call's events are contiguous: Start, zero or more Args, End, before any later event.
Event boundaries depend on how the text arrived; their concatenation does not.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass
from typing import Callable, Union

__all__ = [
    "Event",
    "IdFactory",
    "Reasoning",
    "Text",
    "ToolCallArgs",
    "ToolCallEnd",
    "ToolCallStart",
    "new_call_id",
]

_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True, slots=True)
class Text:
    """Answer text."""

    text: str


@dataclass(frozen=True, slots=True)
class Reasoning:
    """Thinking text, kept apart from the answer."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """A tool call began: its index in this answer, its id and the function's name."""

    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolCallArgs:
    """A fragment of the arguments JSON text of call `index`."""

    index: int
    delta: str


@dataclass(frozen=True, slots=True)
class ToolCallEnd:
    """Call `index` is complete; `arguments` is the whole JSON object text."""

    index: int
    arguments: str


Event = Union[Text, Reasoning, ToolCallStart, ToolCallArgs, ToolCallEnd]
IdFactory = Callable[[], str]


def new_call_id(prefix: str = "call_") -> str:
    """A fresh tool-call id: `prefix` and 24 random letters and digits."""
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def merge(events: list[Event]) -> list[Event]:
    """Adjacent text, thinking and argument pieces of one call joined: fewer, larger events."""
    out: list[Event] = []
    run: list[str] = []
    for ev in events:
        last = out[-1] if out else None
        if type(ev) is type(last) and (
            isinstance(ev, (Text, Reasoning))
            or (isinstance(ev, ToolCallArgs) and ev.index == last.index)  # type: ignore[union-attr]
        ):
            run.append(ev.delta if isinstance(ev, ToolCallArgs) else ev.text)  # type: ignore[union-attr]
            continue
        if len(run) > 1:
            out[-1] = _joined(out[-1], run)
        out.append(ev)
        run = [ev.delta if isinstance(ev, ToolCallArgs) else getattr(ev, "text", "")]
    if len(run) > 1:
        out[-1] = _joined(out[-1], run)
    return out


def _joined(ev: Event, parts: list[str]) -> Event:
    s = "".join(parts)
    if isinstance(ev, ToolCallArgs):
        return ToolCallArgs(ev.index, s)
    return Reasoning(s) if isinstance(ev, Reasoning) else Text(s)
