"""The process's life: the start/drain gate, safe mode, background tasks, the ASGI lifespan.

Whoever refuses work while draining takes the `Lifecycle` (the inference front-ends, /readyz, the
server's signal handling); whoever needs something started with the server or stopped after it
registers it here (`on_startup`, `on_shutdown`, `spawn`).

Safe mode is a state of the running process: it holds every load that nobody asked for (auto-load,
recovery, a request naming a model that is not loaded) and puts the safe-mode limits in force. It
ends when an admin says so (`exit_safe_mode("admin")`) or after `stable_after_s` of clean running
(`watch_stable`), without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Optional

from .errors import Draining, SafeModeOn

log = logging.getLogger("appliance")

EXIT_ROUTE = "POST /admin/safe-mode/exit"
SAFE_MODE_HEADER = "X-Safe-Mode"


class Lifecycle:
    """Start/drain gate, safe mode and lifespan hooks; Falcon middleware for the ASGI lifespan
    events (and the X-Safe-Mode header while safe mode is on)."""

    def __init__(self, safe_mode_reason: Optional[str] = None, stable_after_s: float = 300.0):
        self.draining = False
        self.started_at = time.time()
        # Why the appliance runs in safe mode (a crash loop), or None.
        self.safe_mode_reason = safe_mode_reason
        self.stable_after_s = stable_after_s
        # How and when safe mode ended ("admin" or "stable"), for health and the state file.
        self.safe_mode_exit: Optional[dict[str, Any]] = None
        self._normal_since = None if safe_mode_reason else self.started_at
        self._on_exit: list[Callable[[str], Any]] = []
        self._exited: Optional[asyncio.Event] = None  # made on the loop that waits for it
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

    # -- safe mode
    @property
    def safe_mode(self) -> bool:
        return self.safe_mode_reason is not None

    def safe_mode_ends_in_s(self) -> Optional[float]:
        """Seconds until safe mode ends by itself (stable running), or None when it is off."""
        if not self.safe_mode:
            return None
        return max(0.0, self.stable_after_s - self.uptime_s)

    def guard_load(self, name: str) -> None:
        """Refuse a load nobody asked for while safe mode is on (the engine's `load_guard`)."""
        if not self.safe_mode:
            return
        left = self.safe_mode_ends_in_s() or 0.0
        raise SafeModeOn(
            f"safe mode is on ({self.safe_mode_reason}): model {name!r} is not loaded and safe "
            "mode loads no model by itself. An admin can load it (POST /admin/models/load) or "
            f"end safe mode ({EXIT_ROUTE} with the admin key); otherwise safe mode ends by itself "
            f"after {self.stable_after_s:g} s of stable running (in about {math.ceil(left)} s).",
            param="model",
            retry_after=max(1.0, left),
        )

    def on_safe_mode_exit(self, fn: Callable[[str], Any]) -> None:
        """Call fn(how) when safe mode ends: "admin" or "stable"."""
        self._on_exit.append(fn)

    def exit_safe_mode(self, how: str) -> bool:
        """End safe mode now (normal limits, loads allowed); False when it was not on."""
        if not self.safe_mode:
            return False
        reason, self.safe_mode_reason = self.safe_mode_reason, None
        now = time.time()
        self._normal_since = now
        self.safe_mode_exit = {"at": now, "by": how, "reason": reason}
        if self._exited is not None:
            self._exited.set()
        log.warning(
            "safe mode ended (%s) after %.0f s: normal limits and loads from now on",
            "by an admin" if how == "admin" else "stable running",
            self.uptime_s,
        )
        for fn in self._on_exit:
            try:
                fn(how)
            except Exception:  # one listener must not keep safe mode half on
                log.exception("safe-mode exit step failed")
        return True

    async def watch_stable(self, mark_stable: Callable[[], Any]) -> None:
        """End safe mode after `stable_after_s` of clean running; then, after `stable_after_s`
        of normal running, call mark_stable (the crash-loop history is cleared). A run that
        ends safe mode and then crashes still counts as a crash."""
        if self.safe_mode:
            self._exited = asyncio.Event()
            # asyncio.wait, not wait_for: wait_for (3.11) can swallow a cancel that comes as the
            # event is set, and the task would then outlive the server's shutdown.
            waiter = asyncio.ensure_future(self._exited.wait())
            try:
                done, _ = await asyncio.wait({waiter}, timeout=self.safe_mode_ends_in_s() or 0.0)
            finally:
                waiter.cancel()
            if not done:
                self.exit_safe_mode("stable")
        since = self._normal_since if self._normal_since is not None else time.time()
        await asyncio.sleep(max(0.0, self.stable_after_s - (time.time() - since)))
        result = mark_stable()
        if asyncio.iscoroutine(result):
            await result

    async def process_response(self, req: Any, resp: Any, resource: Any, ok: bool) -> None:
        if self.safe_mode_reason is not None:
            resp.set_header(SAFE_MODE_HEADER, "on")

    # -- lifespan
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
        tasks, self._tasks = self._tasks, []  # a later start (tests) begins with none
        self._exited = None  # the stable-running watch ends with them
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for fn in self._shutdown:
            try:
                result = fn()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("shutdown step failed")
