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

Counted: HTTP requests uvicorn has accepted whose handler has not started yet (any path: they
start within a loop iteration), plus inference requests whose body has been read and parsed and
that have not yet been handed to the engine (or refused). Not counted: a request still sending its
body (a stalled client would hold every join), admitted requests, requests queued for a slot (they
wait for capacity, not for the front), requests waiting for their model to load, everything else
in flight. One count for all models: a request on its way to one model also holds the others'
joins, for as long as the front takes to hand it over. Read from the generation threads without
a lock: a stale count can move a join by a poll, or let one start without a request about to
arrive. An engine in a process of its own (`engine_process: true`) does not see the count.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

_FLAG = "appliance.arriving"  # set in an inference request's ASGI scope while it is counted

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

    def __call__(self) -> int:
        return max(0, self.in_flight() - self.started) + self.pending

    def on_the_way(self, scope: Scope) -> None:
        """An inference request, its body read and parsed, is on its way to an engine."""
        if not scope.get(_FLAG):
            scope[_FLAG] = True
            self.pending += 1

    def admitting(self, scope: Scope) -> None:
        """The request is in an engine's inbox, queued for a slot, waiting for a load or
        refused: no longer on its way. Idempotent."""
        if scope.pop(_FLAG, False):
            self.pending -= 1

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """The ASGI app, counting the requests it is running."""

        async def counted(scope: Scope, receive: Any, send: Any) -> None:
            if scope.get("type") != "http":
                await app(scope, receive, send)
                return
            self.started += 1
            try:
                await app(scope, receive, send)
            finally:
                self.started -= 1

        return counted
