"""How many requests the HTTP front holds that are on their way to an engine.

When a wave of clients sends requests together (agents fanning out, or closed-loop clients
whose streams ended in the same step), the front parses, templates and admits them one after
another on the event loop: on an H200 host about a millisecond each, so 64 reach the
generation thread over some 60 ms. A generation thread that prefilled whatever had reached it
took such a wave in 3-4 prefill calls, each a stall for every running stream, and the groups
then ended in different steps and came back apart again (10 joins for 3 waves of 64 in
`make bench` on an H200). Knowing that more requests are in the front, the generation thread
waits for them (join.py, up to ARRIVING_WAIT_S) and prefills them together. Requests still in
the sockets are in no count: an idle engine that nobody is expected back to also waits
SETTLE_S after each arrival for the next (join.py).

Counted: HTTP requests uvicorn has accepted whose handler has not started yet (any path: they start
within a loop iteration), generation POSTs (GENERATION_PATHS) whose handler started less than
READING_S ago and whose body is not parsed yet, and inference requests whose body has been read and
parsed and that have not yet been handed to the engine (or refused). Between a handler's start and
the parse a request was once in no count: a generation thread that looked then saw nobody coming
and started a join alone, and on two CPU cores the others reached it 190 ms later, beside a prefill
(an agent's follow-up turns, three sent together). Not counted: a request still sending its body
after READING_S (a stalled client would hold every join), admitted requests, requests queued for a
slot (they wait for capacity, not for the front), requests waiting for their model to load,
everything else in flight. One count for all models: a request on its way to one model also holds
the others' joins, for as long as the front takes to hand it over. Read from the generation threads
without a lock: a stale count can move a join by a poll, or let one start without a request about
to arrive. An engine in a process of its own (`engine_process: true`) does not see the count.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

_FLAG = "appliance.arriving"  # set in an inference request's ASGI scope while it is counted
# How long a generation POST counts while its body is read (a body already sent is parsed within a
# loop iteration or two; join.py waits for arrivals this long at most anyway)
READING_S = 0.1
# The routes whose POSTs go to an engine's batch (each hands its request over, or refuses it)
GENERATION_PATHS = frozenset(
    ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses")
)

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]


class Arrivals:
    """The count, for the generation threads (calling it) and the front (keeping it)."""

    def __init__(self) -> None:
        # HTTP requests in flight in the server (set by server.py: uvicorn's tasks); none when
        # no server is attached (the engine driven in-process, as tests and steptrace do).
        self.in_flight: Callable[[], int] = lambda: 0
        self.started = 0  # requests whose handler is running (any path)
        self.pending = 0  # inference requests parsed and not yet admitted or refused
        self.reading: dict[int, float] = {}  # generation POSTs not parsed: id(scope) -> start

    def __call__(self) -> int:
        now = time.perf_counter()
        reading = sum(1 for t in list(self.reading.values()) if now - t < READING_S)
        return max(0, self.in_flight() - self.started) + self.pending + reading

    def on_the_way(self, scope: Scope) -> None:
        """An inference request, its body read and parsed, is on its way to an engine."""
        self.reading.pop(id(scope), None)
        if not scope.get(_FLAG):
            scope[_FLAG] = True
            self.pending += 1

    def admitting(self, scope: Scope) -> None:
        """The request is in an engine's inbox, queued for a slot, waiting for a load or
        refused: no longer on its way. Idempotent."""
        self.reading.pop(id(scope), None)
        if scope.pop(_FLAG, False):
            self.pending -= 1

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """The ASGI app, counting the requests it is running."""

        async def counted(scope: Scope, receive: Any, send: Any) -> None:
            if scope.get("type") != "http":
                await app(scope, receive, send)
                return
            self.started += 1
            path = str(scope.get("path", "")).rstrip("/")
            if scope.get("method") == "POST" and path in GENERATION_PATHS:
                self.reading[id(scope)] = time.perf_counter()
            try:
                await app(scope, receive, send)
            finally:
                self.started -= 1
                self.reading.pop(id(scope), None)

        return counted
