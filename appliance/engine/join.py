"""When requests waiting for the batch join it: a pure policy, with no MLX and no threads.

Requests that arrive together should be prefilled together: each prefill call stalls every
running stream, and groups that join apart end apart and come back apart. So a waiting request
waits (within `window_s`) while fewer have arrived than just ended (closed-loop clients send their
next request as soon as one ends: an end counts as a client about to come back for RETURN_S),
and (up to ARRIVING_WAIT_S) while the HTTP front still holds requests on their way here; an idle
engine nobody is expected back to also waits SETTLE_S after each arrival for the next. A full
prefill batch joins at once.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Optional

# An ended sequence counts as a client about to come back (see the window) this long.
RETURN_S = 0.5
# While the HTTP front holds requests on their way to the engine (arrivals.py), a waiting
# request waits for them this long at most (the window if longer), looking every POLL_S.
ARRIVING_WAIT_S = 0.1
POLL_S = 0.002
# An idle engine that nobody is expected back to waits this long after the latest arrival for
# another (up to ARRIVING_WAIT_S in all): a burst reaches the front over several loop turns, and
# requests still in the sockets are in no count.
SETTLE_S = 0.005
IDLE_S = 0.5  # an idle thread looks at its inbox at least this often


class JoinPolicy:
    """Decides, from arrival and end times, when the waiting requests join the batch."""

    def __init__(self, window_s: float, prefill_batch: int, completion_batch: int) -> None:
        self.window = window_s
        self.longest = max(window_s, ARRIVING_WAIT_S)  # the wait for requests still in the front
        self.prefill_batch = prefill_batch
        self.completion_batch = completion_batch
        self.ended: collections.deque[float] = collections.deque()
        self.coming = 0  # requests on their way from the HTTP front, as last read

    def timeout(self, now: float, active: int, waiting: Sequence[float]) -> Optional[float]:
        """How long the thread may block on its inbox: None (don't block) while it has rows to
        step; else until the oldest waiting request's window (or the oldest end's RETURN_S) is
        up, polling every POLL_S while requests are on their way."""
        if active:
            return None
        if not waiting:
            return IDLE_S
        timeout = waiting[0] + self.window - now
        if self.ended:  # or until the oldest end stops holding them
            timeout = min(timeout, self.ended[0] + RETURN_S - now)
        if self.coming:
            return min(POLL_S, waiting[0] + self.longest - now)
        if not self.ended:  # settling: until SETTLE_S after the latest arrival
            return min(waiting[-1] + SETTLE_S, waiting[0] + self.longest) - now
        return timeout

    def idle(self) -> None:
        """Nothing ran or waited for a while: nobody is coming back."""
        self.ended.clear()

    def ended_at(self, t: float) -> None:
        self.ended.append(t)

    def ready(
        self, now: float, active: int, waiting: Sequence[float], arriving: Callable[[], int]
    ) -> bool:
        """Whether the waiting requests (their arrival times, oldest first) join now.
        `arriving()` counts requests the HTTP front holds on their way here."""
        while self.ended and now - self.ended[0] > RETURN_S:
            self.ended.popleft()
        self.coming = 0
        settling = False
        if waiting and self.window > 0 and active + len(waiting) < self.completion_batch:
            self.coming = arriving()
            settling = not active and not self.ended and now - waiting[-1] < SETTLE_S
        if not waiting:
            return False
        held = self.coming or settling
        return (
            self.window <= 0
            or len(waiting) >= self.prefill_batch
            or now - waiting[0] >= (self.longest if held else self.window)
            or (not held and len(waiting) >= max(1, len(self.ended)))
        )

    def joined(self, n: int) -> None:
        """n requests joined: as many of the ends they answer stop holding others."""
        for _ in range(min(n, len(self.ended))):
            self.ended.popleft()
