"""Runs each enabled maintenance task every interval on the event loop.

A run that raises is logged and counted, and the task runs again at its next interval; the
server is never taken down. Each run's duration and failures go to metrics. The tasks are
asyncio tasks the lifespan cancels at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from ..config import TASK_NAMES, MaintenanceConfig
from ..metrics import Metrics
from .table import TASKS, Run, TaskContext

log = logging.getLogger("appliance.tasks")


@dataclass
class TaskStats:
    runs: int = 0
    failures: int = 0
    last_run_at: Optional[float] = None
    last_duration_s: Optional[float] = None
    last_error: Optional[str] = None


class TaskRunner:
    """The enabled tasks of `maintenance`, each on its own interval."""

    def __init__(
        self,
        cfg: MaintenanceConfig,
        ctx: TaskContext,
        metrics: Optional[Metrics] = None,
        table: Optional[dict[str, Callable[[TaskContext], Run]]] = None,
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.metrics = metrics
        table = TASKS if table is None else table
        self.runs: dict[str, Run] = {}
        self.stats: dict[str, TaskStats] = {}
        for name in TASK_NAMES:
            if name in table and getattr(cfg, name).enabled:
                self.runs[name] = table[name](ctx)
                self.stats[name] = TaskStats()
        self._faults: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def interval(self, name: str) -> float:
        return float(getattr(self.cfg, name).interval_s)

    def start(self) -> list[asyncio.Task[None]]:
        """Start one asyncio task per enabled maintenance task (call on the event loop)."""
        self._tasks = [
            asyncio.create_task(self._loop(name), name=f"task-{name}") for name in self.runs
        ]
        if self.runs:
            log.info(
                "maintenance tasks: %s",
                ", ".join(f"{n} every {self.interval(n):g} s" for n in self.runs),
            )
        return self._tasks

    async def _loop(self, name: str) -> None:
        interval = self.interval(name)
        while True:
            await asyncio.sleep(interval)
            await self.run_once(name)

    def inject_fault(self, name: str, times: int = 1) -> None:
        """Testing only (APPLIANCE_FAULT_INJECTION): the next `times` runs of `name` raise."""
        if name not in self.runs:
            raise KeyError(name)
        self._faults[name] = self._faults.get(name, 0) + times

    async def run_once(self, name: str) -> bool:
        """One run of `name`: True when it succeeded. Never raises (except cancellation)."""
        stats = self.stats[name]
        t0 = time.perf_counter()
        ok = True
        try:
            if self._faults.get(name):
                self._faults[name] -= 1
                raise RuntimeError("injected fault (APPLIANCE_FAULT_INJECTION)")
            await self.runs[name]()
            stats.last_error = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            ok = False
            stats.failures += 1
            stats.last_error = f"{type(exc).__name__}: {exc}"
            log.exception(
                "maintenance task %s failed (runs again in %g s)", name, self.interval(name)
            )
            if self.metrics is not None:
                self.metrics.task_failures.labels(name).inc()
        finally:
            seconds = time.perf_counter() - t0
            stats.runs += 1
            stats.last_run_at = time.time()
            stats.last_duration_s = seconds
            if self.metrics is not None:
                self.metrics.task_runs.labels(name).inc()
                self.metrics.task_duration.labels(name).observe(seconds)
        return ok

    def status(self) -> dict[str, Any]:
        """Per task: interval, runs, failures, last run, for /admin/health."""
        return {
            name: {
                "interval_s": self.interval(name),
                "runs": s.runs,
                "failures": s.failures,
                "last_run_at": s.last_run_at,
                "last_duration_s": None
                if s.last_duration_s is None
                else round(s.last_duration_s, 4),
                "last_error": s.last_error,
            }
            for name, s in self.stats.items()
        }

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
