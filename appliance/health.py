"""How the appliance is doing: one snapshot (`Vitals`) for /admin/health, /metrics and the
status page, and the health report with its reasons.

Parts that know of trouble add a check (`add_check`: None, one (status, reason) or several) and
parts with more to say add a section of the report (`add_section`), so this module knows none of
them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from . import __version__
from .config import SheddingConfig
from .engine import memory
from .engine.service import Engine
from .engine.types import EngineStats
from .lifecycle import Lifecycle

log = logging.getLogger("appliance.health")

# What a check returns: None when all is well, one (status, reason) or several. status is "ok",
# "degraded" or "failing"; the worst one found decides the overall status.
CheckResult = Union[None, tuple[str, str], Iterable[tuple[str, str]]]
HealthCheck = Callable[[], CheckResult]
STATUSES = ("ok", "degraded", "failing")


@dataclass(frozen=True)
class Vitals:
    """Everything live the appliance reports, read at one moment."""

    engine: EngineStats
    memory: memory.MemoryStats
    uptime_s: float
    draining: bool
    safe_mode_reason: Optional[str]
    shedding_memory_percent: float
    backend: str
    version: str = __version__
    # Gauges other parts contribute by name (helper nodes, a distributed group).
    extra: dict[str, Any] = field(default_factory=dict)


def backend() -> str:
    try:
        import mlx.core as mx

        return str(mx.default_device())
    except Exception:
        return "none"


GB = 10**9


def _gb(n: Optional[int]) -> Optional[float]:
    """Bytes in GB (10^9 bytes), 3 decimals; None stays None (no MLX here)."""
    return None if n is None else round(n / GB, 3)


def _normalise(result: CheckResult) -> list[tuple[str, str]]:
    if result is None:
        return []
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], str):
        items: list[Any] = [result]
    else:
        items = list(result)
    return [(s if s in STATUSES else "degraded", str(r)) for s, r in items]


class Health:
    """Vitals, checks and the health report."""

    def __init__(
        self, engine: Engine, lifecycle: Lifecycle, shedding: Optional[SheddingConfig] = None
    ) -> None:
        # The shedding thresholds are read from the engine's limits in force (safe mode has its
        # own); `shedding` is accepted for callers that still pass the config section.
        self.engine = engine
        self.lifecycle = lifecycle
        self._checks: list[HealthCheck] = []
        self._sections: dict[str, Callable[[], Any]] = {}
        self._gauges: list[Callable[[], dict[str, Any]]] = []
        self._backend: Optional[str] = None

    def add_check(self, fn: HealthCheck) -> None:
        self._checks.append(fn)

    def add_section(self, name: str, fn: Callable[[], Any]) -> None:
        """A section of the health report, by name (the state file, maintenance tasks, ...)."""
        self._sections[name] = fn

    def add_gauges(self, fn: Callable[[], dict[str, Any]]) -> None:
        """More live figures for `Vitals.extra` (read by the metrics collector)."""
        self._gauges.append(fn)

    def vitals(self) -> Vitals:
        if self._backend is None:
            self._backend = backend()
        extra: dict[str, Any] = {}
        for fn in self._gauges:
            extra.update(fn())
        lc = self.lifecycle
        return Vitals(
            engine=self.engine.stats(),
            memory=memory.snapshot(),
            uptime_s=lc.uptime_s,
            draining=lc.draining,
            safe_mode_reason=lc.safe_mode_reason,
            shedding_memory_percent=self.engine.limits_in_force.now.memory_percent,
            backend=self._backend,
            extra=extra,
        )

    def checks(self, v: Vitals) -> list[tuple[str, str]]:
        """The built-in checks, then every added one."""
        out: list[tuple[str, str]] = []
        infos = self.engine.registry.infos()
        if not v.engine.models_loaded:
            loading = [i.name for i in infos if i.state == "loading"]
            if loading:
                out.append(("degraded", f"no model is loaded yet; loading: {', '.join(loading)}"))
            else:
                out.append(("failing", "no model is loaded"))
        for info in infos:
            if info.state == "failed":
                out.append(("degraded", f"model {info.name} failed: {info.error}"))
        if v.draining:
            out.append(("degraded", "draining before exit: new inference is refused"))
        if v.safe_mode_reason:
            out.append(("degraded", f"safe mode: {v.safe_mode_reason}"))
        shed = self.engine.limits_in_force.now
        percent = v.memory.system_percent
        if percent >= shed.memory_percent:
            out.append(
                (
                    "degraded",
                    f"shedding inference: system memory {percent:.0f}% >= {shed.memory_percent:g}%",
                )
            )
        active = v.memory.mlx_active
        if (
            shed.mlx_active_bytes is not None
            and active is not None
            and (active >= shed.mlx_active_bytes)
        ):
            out.append(
                (
                    "degraded",
                    f"shedding inference: MLX active memory {active} >= "
                    f"{shed.mlx_active_bytes} bytes",
                )
            )
        if v.engine.max_queued and v.engine.waiting >= v.engine.max_queued:
            out.append(("degraded", "the admission queue is full: new requests get 429"))
        for fn in self._checks:
            try:
                out.extend(_normalise(fn()))
            except Exception as exc:  # a broken check must not break the health report
                log.exception("health check failed")
                out.append(
                    ("degraded", f"health check {getattr(fn, '__name__', fn)!s} failed: {exc}")
                )
        return out

    def report(self) -> dict[str, Any]:
        v = self.vitals()
        checks = self.checks(v)
        worst = max((STATUSES.index(s) for s, _ in checks), default=0)
        e, m = v.engine, v.memory
        sections: dict[str, Any] = {}
        for name, fn in self._sections.items():
            try:
                sections[name] = fn()
            except Exception as exc:  # one broken section must not break the report
                sections[name] = {"error": str(exc)}
        lc = self.lifecycle
        ends_in = lc.safe_mode_ends_in_s()
        return {
            "status": STATUSES[worst],
            "reasons": [{"status": s, "reason": r} for s, r in checks if s != "ok"],
            "system_memory_percent": m.system_percent,
            # The hardening plan's names, beside the ones above (dashboards read both).
            "memory_usage_percent": m.system_percent,
            "metal": {
                "active_memory_gb": _gb(m.mlx_active),
                "peak_memory_gb": _gb(m.mlx_peak),
                "cache_memory_gb": _gb(m.mlx_cache),
            },
            "in_flight_requests": e.running + e.waiting,
            "memory_bytes": {
                "rss": m.rss,
                "mlx_active": m.mlx_active,
                "mlx_peak": m.mlx_peak,
                "mlx_cache": m.mlx_cache,
            },
            "models_loaded": list(e.models_loaded),
            "requests": {
                "running": e.running,
                "waiting": e.waiting,
                "max_running": e.max_running,
                "max_queued": e.max_queued,
            },
            "generation_threads_alive": e.threads_alive,
            "helpers": sections.pop("helpers", {}),
            "uptime_s": round(v.uptime_s, 3),
            "version": v.version,
            "backend": v.backend,
            "safe_mode": bool(v.safe_mode_reason),
            "safe_mode_reason": v.safe_mode_reason,
            "safe_mode_exit": {
                "how": "POST /admin/safe-mode/exit with the admin key, or stable running",
                "automatic_in_s": None if ends_in is None else round(ends_in, 1),
                "ended": lc.safe_mode_exit,
            },
            "limits_in_force": {
                "profile": "safe-mode" if self.engine.limits_in_force.safe_mode else "normal",
                **self.engine.limits_in_force.now.as_dict(),
            },
            "draining": v.draining,
            **sections,
        }
