"""What a generation thread is told between steps, in one definition for every engine.

The same commands go into a thread's inbox, down an engine process's socket (they pickle) and to
the other ranks of a distributed group, so each kind of engine reads one vocabulary. A request
is named by its `rid`, unique within its worker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

from .types import SamplingParams


@dataclass(frozen=True, slots=True)
class Submit:
    """Join the batch at the next step."""

    rid: int
    prompt: list[int]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class Cancel:
    """Leave the batch (client gone, stop string seen, timeout)."""

    rid: int


@dataclass(frozen=True, slots=True)
class Call:
    """Run fn(model, tokenizer) between steps (embeddings, cache trims); its result is answered
    under `cid`."""

    cid: int
    fn: Callable[[Any, Any], Any]


@dataclass(frozen=True, slots=True)
class Fault:
    """Testing only: raise `message` on the generation thread, as a real failure there would."""

    message: str


@dataclass(frozen=True, slots=True)
class Stop:
    """Unload: fail what is in flight and end the thread."""


Command = Union[Submit, Cancel, Call, Fault, Stop]
