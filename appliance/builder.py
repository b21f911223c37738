"""The only place that wires: typed config -> engine, metrics, tasks, middleware, resources -> app."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import falcon
import falcon.asgi
import psutil
from prometheus_client import CollectorRegistry

from . import __version__
from .api import admin as api_admin
from .api import errors as api_errors
from .api import faults as api_faults
from .api.embeddings import Embeddings, Rerank
from .api.openai import ChatCompletions, Completions, Gate, Generate, Models
from .api.openapi import OpenAPI
from .api.probes import Health, Ready
from .config import AppConfig
from .engine import memory
from .engine.distributed import GroupStatus, world
from .engine.service import Engine
from .helpers import Helpers
from .metrics import Metrics, RequestCounter
from .middleware import (
    AccessLog,
    Auth,
    BodyLimit,
    Cors,
    HostGuard,
    LoadShedding,
    RateLimit,
    RequestId,
    is_loopback,
)
from .state import StateStore
from .tasks import TaskContext, TaskRunner

log = logging.getLogger("appliance")


def mlx_memory() -> dict[str, Optional[int]]:
    """MLX active / peak / cache bytes (engine processes included); None where unavailable."""
    mem = memory.mlx_memory()
    if mem is None:
        return {"mlx_active": None, "mlx_peak": None, "mlx_cache": None}
    return {"mlx_active": mem[0], "mlx_peak": mem[1], "mlx_cache": mem[2]}


@dataclass
class Appliance:
    """Everything `build` made; `app` is the ASGI callable uvicorn serves."""

    cfg: AppConfig
    app: falcon.asgi.App
    engine: Engine
    metrics: Metrics
    gate: Gate
    started_at: float = field(default_factory=time.time)
    background: list[asyncio.Task[Any]] = field(default_factory=list)
    on_startup: list[Callable[[], Any]] = field(default_factory=list)
    on_shutdown: list[Callable[[], Any]] = field(default_factory=list)
    # Checks that add reasons to /admin/health: each returns None, (status, reason) or a list.
    health_contributors: list[api_admin.HealthContributor] = field(default_factory=list)
    # Helper node name -> its status for /admin/health (filled by the helper clients).
    helper_status: dict[str, Callable[[], dict[str, Any]]] = field(default_factory=dict)
    # Resilience (issue 5): the state file (recovery, crash loop), maintenance tasks, helpers;
    # health_details are extra sections of /admin/health, by name.
    state: Optional[StateStore] = None
    tasks: Optional[TaskRunner] = None
    helpers: Optional[Helpers] = None
    health_details: dict[str, Callable[[], Any]] = field(default_factory=dict)
    group: Optional[GroupStatus] = None  # set on rank 0 of a distributed group

    def live(self) -> dict[str, Any]:
        """Live state for the metrics collector and the health report."""
        eng = self.engine
        mem: dict[str, Optional[int]] = {"rss": psutil.Process().memory_info().rss}
        mem.update(mlx_memory())
        caches = {}
        joins = {}
        for name in eng.registry.loaded():
            w = eng.registry.worker(name)
            if w is not None and w.prompt_cache is not None:
                caches[name] = w.prompt_cache.nbytes
            if w is not None:
                joins[name] = (w.stats["joins"], w.stats["joined"])
        return {
            "running": eng.admission.running,
            "waiting": eng.admission.waiting,
            "max_running": eng.admission.max_running,
            "max_queued": eng.admission.max_queued,
            "models_loaded": len(eng.registry.loaded()),
            "threads_alive": eng.registry.threads_alive(),
            "safe_mode": 1 if self.cfg.safe_mode_reason else 0,
            "draining": 1 if self.gate.draining else 0,
            "uptime": time.time() - self.started_at,
            "memory": mem,
            "system_memory_percent": psutil.virtual_memory().percent,
            "shedding_memory_percent": self.cfg.shedding.memory_percent,
            "prompt_cache_bytes": caches,
            "batch_joins": joins,
            "build": {"version": __version__, "backend": _backend()},
            **(self.helpers.live() if self.helpers is not None else {}),
            **({"group_size": self.group.size, "group_healthy": self.group.healthy_ranks}
               if self.group is not None else {}),
        }


def _backend() -> str:
    try:
        import mlx.core as mx

        return str(mx.default_device())
    except Exception:
        return "none"


class _Lifecycle:
    """ASGI lifespan: load auto_load models in the background, stop everything at the end."""

    def __init__(self, appliance: Appliance) -> None:
        self.a = appliance

    async def process_startup(self, scope: Any, event: Any) -> None:
        a = self.a
        a.background.append(asyncio.create_task(a.engine.start_up(), name="auto-load"))
        for fn in a.on_startup:
            result = fn()
            if asyncio.iscoroutine(result):
                await result

    async def process_shutdown(self, scope: Any, event: Any) -> None:
        a = self.a
        for fn in a.on_shutdown:
            try:
                result = fn()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("shutdown step failed")
        for task in a.background:
            task.cancel()
        await asyncio.gather(*a.background, return_exceptions=True)
        await a.engine.close()


class MetricsResource:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = "text/plain; version=0.0.4; charset=utf-8"
        resp.data = self.metrics.render()


def _middleware(cfg: AppConfig, metrics: Metrics) -> list[Any]:
    reject = metrics.reject
    table: dict[str, Callable[[], Any]] = {
        "request_id": RequestId,
        "access_log": AccessLog,
        "host_guard": lambda: HostGuard(cfg.server, reject),
        "body_limit": lambda: BodyLimit(cfg.limits, reject),
        "cors": lambda: Cors(cfg.security),
        "load_shedding": lambda: LoadShedding(
            cfg.shedding, reject, lambda: mlx_memory()["mlx_active"]
        ),
        "auth": lambda: Auth(cfg.security, reject, cfg.metrics.path),
        "rate_limit": lambda: RateLimit(cfg.rate_limits, reject),
    }
    return [table[name]() for name in cfg.middleware]


def build(
    cfg: AppConfig,
    *,
    engine: Optional[Engine] = None,
    registry: Optional[CollectorRegistry] = None,
    state: Optional[StateStore] = None,
) -> Appliance:
    """Assemble the appliance from the typed config; nothing starts until the lifespan runs."""
    engine = engine or Engine(cfg.models, cfg.limits)
    metrics = Metrics(cfg.metrics, registry)
    gate = Gate()
    app = falcon.asgi.App(middleware=[], cors_enable=False)
    appliance = Appliance(cfg=cfg, app=app, engine=engine, metrics=metrics, gate=gate)
    metrics.attach_live(appliance.live)
    engine.observe(metrics.on_request)
    engine.registry.subscribe(metrics.on_model)

    stack: list[Any] = [_Lifecycle(appliance), RequestCounter(metrics, app), *_middleware(cfg, metrics)]
    for mw in stack:
        app.add_middleware(mw)
    api_errors.install(app)
    app.req_options.strip_url_path_trailing_slash = True

    gen = Generate(engine, gate, cfg.limits.max_body_bytes)
    app.add_route("/healthz", Health())
    app.add_route("/readyz", Ready(engine, gate))
    app.add_route(cfg.metrics.path, MetricsResource(metrics))
    app.add_route("/openapi.json", OpenAPI(cfg))
    app.add_route("/v1/models", Models(engine))
    app.add_route("/v1/chat/completions", ChatCompletions(gen))
    app.add_route("/v1/completions", Completions(gen))
    api_admin.add_routes(app, appliance)
    _resilience(appliance, state)
    if world()[1] > 1:
        group = GroupStatus(cfg.distributed.backend)
        appliance.group = group
        appliance.health_details["distributed"] = group.health
        appliance.health_contributors.append(group.reasons)
    _warn_exposure(cfg)
    return appliance


def _resilience(a: Appliance, state: Optional[StateStore]) -> None:
    """State file and recovery, maintenance tasks, helper nodes, /v1/embeddings and /v1/rerank."""
    cfg, engine = a.cfg, a.engine
    helpers = Helpers(cfg.helpers, lambda role, status: a.metrics.helper_requests.labels(role, status).inc())
    a.helpers = helpers
    for role, node in helpers.nodes.items():
        a.helper_status[role] = node.status
    a.health_contributors.append(helpers.health)
    if state is not None:
        a.state = state
        state.attach(engine.registry.subscribe, engine.registry.loaded)
        if state.boot is not None:
            engine.recover = list(state.boot.recover)
        a.health_contributors.append(lambda: _state_reasons(state))
        a.health_details["state"] = state.health
        a.on_startup.append(
            lambda: a.background.append(
                asyncio.create_task(_stable_after(state, cfg.state.stable_after_s), name="stable")
            )
        )
    ctx = TaskContext(cfg, engine, state, helpers)
    runner = TaskRunner(cfg.maintenance, ctx, a.metrics)
    a.tasks = runner
    a.health_contributors.append(ctx.health)
    a.health_details["maintenance"] = runner.status
    a.on_startup.append(lambda: a.background.extend(runner.start()))
    a.on_startup.append(lambda: a.background.append(
        asyncio.create_task(a.metrics.watch_loop_lag(), name="loop-lag")))
    a.on_shutdown.append(runner.stop)
    a.on_shutdown.append(helpers.close)
    a.app.add_route("/v1/embeddings", Embeddings(engine, a.gate, helpers, cfg.limits.max_body_bytes))
    a.app.add_route("/v1/rerank", Rerank(engine, a.gate, helpers, cfg.limits.max_body_bytes))
    if api_faults.enabled():
        log.warning("%s=1: fault injection is on at POST %s (tests only)", api_faults.ENV, api_faults.PATH)
        a.app.add_route(api_faults.PATH, api_faults.Faults(engine, runner))


def _state_reasons(state: StateStore) -> list[tuple[str, str]]:
    out = []
    if not state.writable:
        out.append(("degraded", f"state file: {state.problem}"))
    if state.pending:
        out.append(("degraded", f"recovering models after an unclean shutdown: {', '.join(state.pending)}"))
    for name, err in state.recovery_failed.items():
        out.append(("degraded", f"model {name} was not recovered after an unclean shutdown: {err}"))
    return out


async def _stable_after(state: StateStore, seconds: float) -> None:
    await asyncio.sleep(seconds)
    await asyncio.to_thread(state.mark_stable)


def _warn_exposure(cfg: AppConfig) -> None:
    sec, host = cfg.security, cfg.server.host
    local = is_loopback(host)
    if not sec.api_keys:
        # Always said at start; beyond loopback an open /v1 is worth a warning.
        (log.info if local else log.warning)(
            "no API key is set: /v1 is open to every client that can reach %s (set %s)",
            host,
            sec.api_keys_env,
        )
    if not sec.admin_keys:
        log.info("no admin key is set: the admin API is closed (set %s)", sec.admin_keys_env)
    if not local and not cfg.server.tls.certfile and not sec.behind_tls_proxy:
        log.warning("serving plain HTTP on %s: keys and prompts cross the network in clear", host)
