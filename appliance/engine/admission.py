"""Admission control on the event loop: running slots, a bounded queue, a bounded wait."""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import Optional

from ..config import LimitsConfig
from ..errors import QueueFull
from .limits import Limits, LimitsInForce


class Admission:
    """At most `max_running` in the batches and `max_queued` waiting, across every model.

    A request that finds the queue full is refused at once; one that waits longer than
    `queue_timeout_s` is refused then. Both are `QueueFull` (429, code server_busy). A high
    priority request (admin key only) goes to the front of the queue and is not refused for
    a full queue, since only operators can send one.

    The limits are read from `LimitsInForce` at each request: when safe mode ends and
    `max_running` grows, waiting requests are admitted at once.
    """

    def __init__(self, limits: LimitsConfig | LimitsInForce) -> None:
        self.limits = (
            limits if isinstance(limits, LimitsInForce) else LimitsInForce(Limits.of(limits))
        )
        self.running = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self.limits.on_change(lambda _: self._fill())

    @property
    def max_running(self) -> int:
        return self.limits.now.max_running

    @property
    def max_queued(self) -> int:
        return self.limits.now.max_queued

    @property
    def queue_timeout_s(self) -> float:
        return self.limits.now.queue_timeout_s

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def would_wait(self) -> bool:
        """True when a request now would queue (or be refused) rather than start at once."""
        return self.running >= self.max_running or bool(self._waiting)

    def retry_after(self) -> int:
        return max(1, math.ceil(min(self.queue_timeout_s, 5.0)))

    async def acquire(self, high_priority: bool = False) -> float:
        """Take a slot, waiting in the queue if needed; returns the seconds spent queued."""
        if self.running < self.max_running and not self._waiting:
            self.running += 1
            return 0.0
        if len(self._waiting) >= self.max_queued and not high_priority:
            raise QueueFull(
                "the server is busy: every slot and queue place is taken; retry later",
                retry_after=self.retry_after(),
            )
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        timeout = self.queue_timeout_s
        if high_priority:
            self._waiting.appendleft(fut)
        else:
            self._waiting.append(fut)
        start = loop.time()
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            if fut.done() and not fut.cancelled():
                self.release()  # a slot was handed over just as we gave up: pass it on
            else:
                fut.cancel()
                try:
                    self._waiting.remove(fut)
                except ValueError:
                    pass
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise QueueFull(
                f"the server is busy: no slot freed within {timeout:g} s; retry later",
                retry_after=self.retry_after(),
            ) from None
        return loop.time() - start

    def release(self) -> None:
        """Give a slot back: to the first waiter while slots are free, else to the pool."""
        self.running = max(0, self.running - 1)
        self._fill()

    def _fill(self) -> None:
        # After a release, or when max_running grew: admit waiters while slots are free. After
        # it shrank, running drains down to the new limit before anyone else starts.
        while self._waiting and self.running < self.max_running:
            fut: Optional[asyncio.Future[None]] = self._waiting.popleft()
            if fut is not None and not fut.done():
                self.running += 1
                fut.set_result(None)
