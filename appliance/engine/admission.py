"""Admission control on the event loop: running slots, a bounded queue, a bounded wait."""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass
from typing import Optional, Protocol

from ..config import LimitsConfig
from ..errors import InsufficientMemory, QueueFull
from .limits import Limits, LimitsInForce


class Room(Protocol):
    """What admission asks about memory (the memory governor, through the engine)."""

    def fits(self, need: int) -> bool:
        """True when a request reserving `need` KV bytes could start now."""
        ...

    async def make_room(self, need: int) -> None:
        """Free memory for a request that waits for it (evict prompt caches)."""
        ...


@dataclass
class _Waiter:
    fut: asyncio.Future[None]
    need: int


class Admission:
    """At most `max_running` in the batches and `max_queued` waiting, across every model.

    A request that finds the queue full is refused at once; one that waits longer than
    `queue_timeout_s` is refused then. Both are `QueueFull` (429, code server_busy). A high
    priority request (admin key only) goes to the front of the queue and is not refused for
    a full queue, since only operators can send one.

    With `room` set, a request also needs its KV bytes (`need`) to fit: the first in the queue
    waits for memory as for a slot (and nobody passes it, so a large request is not starved),
    asking `room` to make some every POLL_S; one that times out so is `InsufficientMemory`
    (503). `reserved` counts the KV bytes of the requests holding slots.

    The limits are read from `LimitsInForce` at each request: when safe mode ends and
    `max_running` grows, waiting requests are admitted at once.
    """

    POLL_S = 0.1  # memory frees on the generation threads, not at release(): look again

    def __init__(self, limits: LimitsConfig | LimitsInForce) -> None:
        self.limits = (
            limits if isinstance(limits, LimitsInForce) else LimitsInForce(Limits.of(limits))
        )
        self.running = 0
        self.reserved = 0
        self.room: Optional[Room] = None
        self._waiting: deque[_Waiter] = deque()
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

    def would_wait(self, need: int = 0) -> bool:
        """True when a request now would queue (or be refused) rather than start at once."""
        return self.running >= self.max_running or bool(self._waiting) or not self._fits(need)

    def retry_after(self) -> int:
        return max(1, math.ceil(min(self.queue_timeout_s, 5.0)))

    def _fits(self, need: int) -> bool:
        return not need or self.room is None or self.room.fits(need)

    def _grant(self, need: int) -> None:
        self.running += 1
        self.reserved += need

    async def acquire(self, high_priority: bool = False, need: int = 0) -> float:
        """Take a slot (and `need` KV bytes), waiting in the queue if needed; returns the
        seconds spent queued."""
        if self.running < self.max_running and not self._waiting and self._fits(need):
            self._grant(need)
            return 0.0
        if len(self._waiting) >= self.max_queued and not high_priority:
            raise QueueFull(
                "the server is busy: every slot and queue place is taken; retry later",
                retry_after=self.retry_after(),
            )
        loop = asyncio.get_running_loop()
        me = _Waiter(loop.create_future(), need)
        timeout = self.queue_timeout_s
        if high_priority:
            self._waiting.appendleft(me)
        else:
            self._waiting.append(me)
        start = loop.time()
        try:
            await self._wait(me, start + timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            fut = me.fut
            if fut.done() and not fut.cancelled():
                self.release(need)  # a slot was handed over just as we gave up: pass it on
            else:
                fut.cancel()
                try:
                    self._waiting.remove(me)
                except ValueError:
                    pass
                self._fill()  # the next one may fit where this one did not
            if isinstance(exc, asyncio.CancelledError):
                raise
            if need and self.running < self.max_running and not self._fits(need):
                raise InsufficientMemory(
                    f"not enough memory for this request: its KV cache needs {need} bytes and "
                    f"none freed within {timeout:g} s; lower max_tokens or retry later",
                    retry_after=self.retry_after(),
                ) from None
            raise QueueFull(
                f"the server is busy: no slot freed within {timeout:g} s; retry later",
                retry_after=self.retry_after(),
            ) from None
        return loop.time() - start

    async def _wait(self, me: _Waiter, deadline: float) -> None:
        """Until a slot is handed over; while first in the queue with a slot free but no room,
        ask for room and look again every POLL_S. TimeoutError at the deadline."""
        loop = asyncio.get_running_loop()
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise asyncio.TimeoutError
            blocked = self.room is not None and me.need and self._blocked_on_memory(me)
            if blocked and self.room is not None:
                await self.room.make_room(me.need)
                self._fill()
            if me.fut.done():
                return
            wait = min(left, self.POLL_S) if self.room is not None else left
            try:
                await asyncio.wait_for(asyncio.shield(me.fut), wait)
                return
            except asyncio.TimeoutError:
                if loop.time() >= deadline:
                    raise
                self._fill()

    def _blocked_on_memory(self, me: _Waiter) -> bool:
        return (
            bool(self._waiting)
            and self._waiting[0] is me
            and self.running < self.max_running
            and not self._fits(me.need)
        )

    def release(self, need: int = 0) -> None:
        """Give a slot (and its KV bytes) back: to the first waiter while slots are free and
        it fits, else to the pool."""
        self.running = max(0, self.running - 1)
        self.reserved = max(0, self.reserved - need)
        self._fill()

    def _fill(self) -> None:
        # After a release, or when max_running grew: admit waiters while slots are free and the
        # first one's KV bytes fit. After it shrank, running drains down to the new limit first.
        while self._waiting and self.running < self.max_running:
            head = self._waiting[0]
            if head.fut.done():
                self._waiting.popleft()
                continue
            if not self._fits(head.need):
                return
            self._waiting.popleft()
            self._grant(head.need)
            head.fut.set_result(None)
