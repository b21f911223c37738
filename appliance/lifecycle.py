"""The process's life: the start/drain gate, safe mode, background tasks, the ASGI lifespan.

Whoever refuses work while draining takes the `Lifecycle` (the inference front-ends, /readyz, the
server's signal handling); whoever needs something started with the server or stopped after it
registers it here (`on_startup`, `on_shutdown`, `spawn`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Optional

from .errors import Draining

log = logging.getLogger("appliance")


class Lifecycle:
    """Start/drain gate and lifespan hooks; Falcon middleware for the ASGI lifespan events."""

    def __init__(self, safe_mode_reason: Optional[str] = None) -> None:
        self.draining = False
        self.started_at = time.time()
        # Why the appliance runs in safe mode (a crash loop), or None.
        self.safe_mode_reason = safe_mode_reason
        self._startup: list[Callable[[], Any]] = []
        self._shutdown: list[Callable[[], Any]] = []
        self._tasks: list[asyncio.Task[Any]] = []

    @property
    def uptime_s(self) -> float:
        return time.time() - self.started_at

    def check(self) -> None:
        """Raise Draining (503) once the drain has begun: no new inference."""
        if self.draining:
            raise Draining("the server is shutting down; retry on another instance", retry_after=5)

    def on_startup(self, fn: Callable[[], Any]) -> None:
        """Run fn (a function or coroutine function) when the server starts, in order."""
        self._startup.append(fn)

    def on_shutdown(self, fn: Callable[[], Any]) -> None:
        """Run fn when the server stops, in order, after the background tasks are cancelled."""
        self._shutdown.append(fn)

    def spawn(self, make: Callable[[], Awaitable[Any]], name: str) -> None:
        """Start a background task with the server; it is cancelled when the server stops."""
        self._startup.append(lambda: self.adopt(asyncio.ensure_future(make()), name))

    def adopt(self, task: asyncio.Future[Any], name: str = "") -> None:
        """Cancel this running task when the server stops."""
        if name and isinstance(task, asyncio.Task):
            task.set_name(name)
        self._tasks.append(task)  # type: ignore[arg-type]

    async def process_startup(self, scope: Any, event: Any) -> None:
        for fn in self._startup:
            result = fn()
            if asyncio.iscoroutine(result):
                await result

    async def process_shutdown(self, scope: Any, event: Any) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for fn in self._shutdown:
            try:
                result = fn()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("shutdown step failed")
