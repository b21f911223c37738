"""The status page's data: one snapshot of health, models, memory, the prompt cache, recent
errors and the charts' history, shaped from the parts that already know each of them."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import Any, Optional

from ..config import LimitsConfig, ModelsConfig, ModelSpec
from ..engine import memory
from ..engine.service import Engine
from ..engine.types import EngineStats, ModelInfo
from ..health import Health
from .access import Access
from .history import History, ModelCounts, Sample, Traffic
from .recent_errors import ErrorCount, RecentErrors

SETTING_CHARS = 80  # a long setting (a chat template) is cut for the page
ALWAYS_SHOWN = ("context_length", "max_tokens", "ttl_s")


def spec_settings(spec: Any) -> dict[str, Any]:
    """A model's settings worth showing: context_length, max_tokens, ttl_s, and every other
    setting that differs from its default (the path is shown on its own)."""
    out: dict[str, Any] = {}
    if not dataclasses.is_dataclass(spec):
        return out
    for f in dataclasses.fields(spec):
        if f.name == "path":
            continue
        value = getattr(spec, f.name)
        default: Any = dataclasses.MISSING
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        if f.name not in ALWAYS_SHOWN and value == default:
            continue
        if isinstance(value, str) and len(value) > SETTING_CHARS:
            value = value[: SETTING_CHARS - 1] + "…"
        out[f.name] = value
    return out


def readiness(draining: bool, reloading: Iterable[str], loaded: Iterable[str]) -> dict[str, Any]:
    """What /readyz would answer: ready, or why not."""
    reloading, loaded = list(reloading), list(loaded)
    if draining:
        reason: Optional[str] = "draining before exit"
    elif reloading:
        reason = f"reloading after a generation thread died: {', '.join(sorted(reloading))}"
    elif not loaded:
        reason = "no model is loaded yet"
    else:
        reason = None
    return {"ready": reason is None, "reason": reason}


def model_row(
    info: ModelInfo,
    spec: Optional[ModelSpec],
    *,
    running: int,
    waiting: int,
    counts: Optional[ModelCounts],
    tokens_per_s: float,
    ttft_p50_s: Optional[float],
    stats: EngineStats,
    default: bool,
    auto_load: bool,
) -> dict[str, Any]:
    """One model as the page shows it."""
    c = counts or ModelCounts()
    return {
        "name": info.name,
        "state": info.state,
        "loaded": info.state == "loaded",
        "default": default,
        "auto_load": auto_load,
        "path": info.path,
        "settings": spec_settings(spec) if spec is not None else {},
        "memory_estimate_bytes": info.memory_estimate_bytes,
        "running": running,
        "waiting": waiting,
        "requests_served": info.requests_served,
        "requests_finished": c.requests,
        "tokens_generated": c.tokens,
        "prompt_tokens": c.prompt_tokens,
        "tokens_per_s": round(tokens_per_s, 3),
        "ttft_p50_s": None if ttft_p50_s is None else round(ttft_p50_s, 6),
        "loaded_at": info.loaded_at,
        "last_used": info.last_used,
        "error": info.error,
        "prompt_cache_bytes": stats.prompt_cache_bytes.get(info.name),
        "prompt_cache_entries": stats.prompt_cache_entries.get(info.name),
    }


def memory_view(
    m: memory.MemoryStats, system_total: int, system_available: int, limit: Optional[int]
) -> dict[str, Any]:
    """Memory in bytes; `limit` is limits.mlx_memory_limit_bytes (None: MLX's own default)."""
    return {
        "system_total": system_total,
        "system_used": max(0, system_total - system_available),
        "system_available": system_available,
        "system_percent": m.system_percent,
        "rss": m.rss,
        "mlx_active": m.mlx_active,
        "mlx_cache": m.mlx_cache,
        "mlx_peak": m.mlx_peak,
        "limit": limit,
    }


def cache_view(
    stats: EngineStats, counts: dict[str, ModelCounts], budget_bytes: int
) -> dict[str, Any]:
    """The prompt caches of the loaded models, and how often a request found its prefix."""
    hits = sum(c.cache_hits for c in counts.values())
    misses = sum(c.cache_misses for c in counts.values())
    known = [
        stats.prompt_cache_entries[n]
        for n in stats.prompt_cache_bytes
        if n in stats.prompt_cache_entries
    ]
    return {
        "entries": sum(known) if len(known) == len(stats.prompt_cache_bytes) else None,
        "bytes": sum(stats.prompt_cache_bytes.values()),
        "budget_bytes_per_model": budget_bytes,
        "hits": hits,
        "misses": misses,
        "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
    }


def errors_view(items: list[ErrorCount], limit: int = 20) -> list[dict[str, Any]]:
    return [
        {
            "status": e.status,
            "path": e.path,
            "count": e.count,
            "code": e.code,
            "first_at": e.first_at,
            "last_at": e.last_at,
        }
        for e in items[:limit]
    ]


def history_view(samples: Iterable[Sample], interval_s: float, window_s: float) -> dict[str, Any]:
    return {
        "interval_s": interval_s,
        "window_s": window_s,
        "samples": [
            {
                "t": round(s.t, 3),
                "tokens_per_s": round(s.tokens_per_s, 3),
                "requests_per_s": round(s.requests_per_s, 4),
                "running": s.running,
                "waiting": s.waiting,
                "ttft_p50_s": None if s.ttft_p50_s is None else round(s.ttft_p50_s, 6),
            }
            for s in samples
        ],
    }


def access_view(access: Access, refresh_s: float) -> dict[str, Any]:
    return {
        "mode": access.mode,
        "admin_actions": access.admin,
        "note": access.message if not access.admin else "",
        "refresh_s": refresh_s,
    }


class StatusBoard:
    """Reads the parts at one moment into the snapshot /status.json serves."""

    def __init__(
        self,
        engine: Engine,
        health: Health,
        models: ModelsConfig,
        limits: LimitsConfig,
        traffic: Traffic,
        history: History,
        errors: RecentErrors,
    ) -> None:
        self.engine = engine
        self.health = health
        self.models = models
        self.limits = limits
        self.traffic = traffic
        self.history = history
        self.errors = errors

    def snapshot(self, access: Access, refresh_s: float) -> dict[str, Any]:
        report = self.health.report()
        stats = self.engine.stats()
        reg = self.engine.registry
        rows = []
        for info in reg.infos():
            worker = reg.worker(info.name)
            rows.append(
                model_row(
                    info,
                    self.models.catalog.get(info.name),
                    running=worker.active_count if worker is not None else 0,
                    waiting=stats.waiting_by_model.get(info.name, 0),
                    counts=self.traffic.models.get(info.name),
                    tokens_per_s=self.traffic.tokens_per_s(info.name),
                    ttft_p50_s=self.traffic.ttft_p50(info.name),
                    stats=stats,
                    default=info.name == self.models.default,
                    auto_load=info.name in self.models.auto_load,
                )
            )
        vm = memory.system_memory()
        m = memory.snapshot()
        return {
            "generated_at": time.time(),
            "version": report["version"],
            "backend": report["backend"],
            "uptime_s": report["uptime_s"],
            "health": {"status": report["status"], "reasons": report["reasons"]},
            "readiness": readiness(report["draining"], stats.reloading, stats.models_loaded),
            "draining": report["draining"],
            "safe_mode": {"on": report["safe_mode"], "reason": report["safe_mode_reason"]},
            "access": access_view(access, refresh_s),
            "requests": {
                "running": stats.running,
                "waiting": stats.waiting,
                "max_running": stats.max_running,
                "max_queued": stats.max_queued,
                "served": sum(i.requests_served for i in reg.infos()),
            },
            "models": rows,
            "default_model": self.models.default,
            "presets": sorted(getattr(self.models, "presets", None) or {}),
            "memory": memory_view(
                m, int(vm.total), int(vm.available), self.limits.mlx_memory_limit_bytes
            ),
            "prompt_cache": cache_view(
                stats,
                self.traffic.models,
                memory.prompt_cache_budget(self.models.prompt_cache_bytes),
            ),
            "errors": errors_view(self.errors.items()),
            "history": history_view(
                self.history.samples, self.history.interval_s, self.history.window_s
            ),
        }
