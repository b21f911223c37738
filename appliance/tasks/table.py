"""The maintenance tasks, by name. Each entry makes, from the shared `TaskContext`, the coroutine
function of one run; `TaskRunner` calls it every `maintenance.<name>.interval_s`.

Runs happen on the event loop and must not block it: MLX work goes to a model's own thread
(`ModelWorker.call`), file and other blocking work to `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import psutil

from ..config import AppConfig
from ..engine.memory import mlx_active
from ..engine.service import Engine
from ..helper_nodes import HelperNodes
from ..state import StateStore

log = logging.getLogger("appliance.tasks")

Run = Callable[[], Awaitable[None]]


@dataclass
class TaskContext:
    """What the tasks work on; `degraded` holds reasons the health report shows."""

    cfg: AppConfig
    engine: Engine
    state: Optional[StateStore] = None
    helpers: Optional[HelperNodes] = None
    degraded: dict[str, str] = field(default_factory=dict)

    def health(self) -> list[tuple[str, str]]:
        return [("degraded", reason) for reason in self.degraded.values()]


def _ignore_model(fn: Callable[[], Any], model: Any, tok: Any) -> Any:
    return fn()


def trim_mlx_cache(max_cache_bytes: int) -> int:
    """Clear MLX's buffer cache if it holds more than max_cache_bytes; the bytes it held, or 0."""
    import mlx.core as mx

    cached = int(mx.get_cache_memory())
    if cached <= max_cache_bytes:
        return 0
    mx.clear_cache()
    return cached


def cache_trim(ctx: TaskContext) -> Run:
    """Clear MLX's buffer cache when it holds more than `max_cache_bytes`."""
    t = ctx.cfg.maintenance.cache_trim
    trim = functools.partial(trim_mlx_cache, t.max_cache_bytes)

    async def run() -> None:
        # On each model's generation thread, between steps (a model in an engine process of
        # its own has its own cache); in a worker thread when no model is loaded.
        reg = ctx.engine.registry
        workers = [w for w in map(reg.worker, reg.loaded()) if w is not None]
        freed = 0 if workers else await asyncio.to_thread(trim)
        for worker in workers:
            fut = worker.call(functools.partial(_ignore_model, trim))
            freed += await asyncio.wait_for(asyncio.wrap_future(fut), max(t.interval_s, 5.0))
        if freed:
            log.info(
                "cache_trim: cleared %d bytes of MLX buffer cache (limit %d)",
                freed,
                t.max_cache_bytes,
            )

    return run


def idle_eviction(ctx: TaskContext) -> Run:
    """Unload models unused for their catalog `ttl_s` (0: never); auto_load ones may be pinned."""
    t = ctx.cfg.maintenance.idle_eviction

    async def run() -> None:
        reg = ctx.engine.registry
        pinned = set(ctx.cfg.models.auto_load) if t.pin_auto_load else set()
        now = time.time()
        for name in reg.loaded():
            ttl = reg.spec(name).ttl_s
            worker = reg.worker(name)
            if ttl <= 0 or name in pinned or worker is None or worker.active_count:
                continue
            info = reg.info(name)
            idle = now - (info.last_used or info.loaded_at or now)
            if idle >= ttl:
                log.info("idle_eviction: unloading %s, idle for %.0f s (ttl_s %g)", name, idle, ttl)
                await reg.unload(name, timeout_s=5.0)

    return run


def memory_watchdog(ctx: TaskContext) -> Run:
    """Log and report degraded health when memory nears the shedding thresholds."""
    t = ctx.cfg.maintenance.memory_watchdog

    async def run() -> None:
        shed = ctx.engine.limits_in_force.now  # safe mode sheds earlier: warn earlier too
        percent = psutil.virtual_memory().percent
        warn_at = shed.memory_percent - t.warn_margin_percent
        reasons = []
        if percent >= warn_at:
            reasons.append(
                f"system memory {percent:.0f}% is within {t.warn_margin_percent:g}% of the "
                f"shedding threshold {shed.memory_percent:g}%"
            )
        if shed.mlx_active_bytes:
            active = mlx_active()
            if active >= shed.mlx_active_bytes * (1 - t.warn_margin_percent / 100):
                reasons.append(
                    f"MLX active memory {active} bytes is within {t.warn_margin_percent:g}% of "
                    f"shedding.mlx_active_bytes {shed.mlx_active_bytes}"
                )
        reason = "; ".join(reasons)
        before = ctx.degraded.get("memory_watchdog")
        if reason:
            if before is None:
                log.warning("memory_watchdog: %s", reason)
            ctx.degraded["memory_watchdog"] = reason
        elif before is not None:
            del ctx.degraded["memory_watchdog"]
            log.info("memory_watchdog: memory back below the warning level (%.0f%%)", percent)

    return run


def state_snapshot(ctx: TaskContext) -> Run:
    """Write the runtime state file (models loaded, start history)."""

    async def run() -> None:
        if ctx.state is not None:
            models = ctx.state.current_models()  # the registry is read on the loop
            await asyncio.to_thread(ctx.state.save, models)

    return run


def helper_probe(ctx: TaskContext) -> Run:
    """GET /healthz on every helper node: up/down in health and metrics."""

    async def run() -> None:
        if ctx.helpers is not None:
            await ctx.helpers.probe_all()

    return run


TASKS: dict[str, Callable[[TaskContext], Run]] = {
    "cache_trim": cache_trim,
    "idle_eviction": idle_eviction,
    "memory_watchdog": memory_watchdog,
    "state_snapshot": state_snapshot,
    "helper_probe": helper_probe,
}
