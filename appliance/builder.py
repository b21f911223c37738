"""The only place that wires: typed config -> engine, metrics, tasks, middleware, resources -> app.

Every part gets what it needs by constructor; none of them reaches into another through this
module. `build` returns the few parts the server itself drives (`Service`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Optional

import falcon
import falcon.asgi
from prometheus_client import CollectorRegistry

from . import middleware
from .api import admin as api_admin
from .api import errors as api_errors
from .api import faults as api_faults
from .api.embeddings import Embeddings, Rerank
from .api.generation import Generate
from .api.openai import ChatCompletions, Completions, Models
from .api.openapi import OpenAPI
from .api.probes import Live, Ready
from .config import AppConfig
from .engine import cpu, memory
from .engine.distributed import GroupStatus, world
from .engine.service import Engine
from .health import Health
from .helper_nodes import HelperNodes
from .lifecycle import Lifecycle
from .metrics import Metrics, RequestCounter
from .middleware import is_loopback
from .state import StateStore
from .tasks import TaskContext, TaskRunner

log = logging.getLogger("appliance")


@dataclass
class Service:
    """What `build` made that the server drives: the ASGI app, the engine to drain, the
    lifecycle (gate and hooks), and the state file to mark clean at exit."""

    cfg: AppConfig
    app: falcon.asgi.App
    engine: Engine
    lifecycle: Lifecycle
    health: Health
    metrics: Metrics
    state: Optional[StateStore] = None
    group: Optional[GroupStatus] = None  # rank 0 of a distributed group


class MetricsResource:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = "text/plain; version=0.0.4; charset=utf-8"
        resp.data = self.metrics.render()


def build(
    cfg: AppConfig,
    *,
    engine: Optional[Engine] = None,
    registry: Optional[CollectorRegistry] = None,
    state: Optional[StateStore] = None,
    safe_mode_reason: Optional[str] = None,
) -> Service:
    """Assemble the appliance from the typed config; nothing starts until the lifespan runs."""
    engine = engine or Engine(cfg.models, cfg.limits)
    lifecycle = Lifecycle(safe_mode_reason)
    metrics = Metrics(cfg.metrics, registry)
    health = Health(engine, lifecycle, cfg.shedding)
    metrics.watch(health.vitals)
    engine.observe(metrics.on_request)
    engine.registry.subscribe(metrics.on_model)

    app = falcon.asgi.App(middleware=[], cors_enable=False)
    stack: list[Any] = [
        lifecycle,
        RequestCounter(metrics, app),
        *middleware.stack(cfg, metrics.reject, memory.mlx_active),
    ]
    for mw in stack:
        app.add_middleware(mw)
    api_errors.install(app)
    app.req_options.strip_url_path_trailing_slash = True

    lifecycle.spawn(engine.start_up, "auto-load")
    lifecycle.spawn(metrics.watch_loop_lag, "loop-lag")
    gen = Generate(engine, lifecycle, cfg.limits.max_body_bytes)
    app.add_route("/healthz", Live())
    app.add_route("/readyz", Ready(engine, lifecycle))
    app.add_route(cfg.metrics.path, MetricsResource(metrics))
    app.add_route("/openapi.json", OpenAPI(cfg))
    app.add_route("/v1/models", Models(engine))
    app.add_route("/v1/chat/completions", ChatCompletions(gen))
    app.add_route("/v1/completions", Completions(gen))
    api_admin.add_routes(app, engine, health, cfg)

    helpers = HelperNodes(
        cfg.helpers, lambda role, status: metrics.helper_requests.labels(role, status).inc()
    )
    health.add_check(helpers.health)
    health.add_section("helpers", lambda: {r: n.status() for r, n in helpers.nodes.items()})
    health.add_gauges(helpers.live)
    app.add_route(
        "/v1/embeddings", Embeddings(engine, lifecycle, helpers, cfg.limits.max_body_bytes)
    )
    app.add_route("/v1/rerank", Rerank(engine, lifecycle, helpers, cfg.limits.max_body_bytes))
    blas = cpu.current(cfg.engine.cpu_blas).as_dict()  # fixed for the process's life
    health.add_section("cpu_blas", lambda: blas)
    if state is not None:
        _state(state, engine, health, lifecycle, cfg.state.stable_after_s)
    runner = TaskRunner(cfg.maintenance, TaskContext(cfg, engine, state, helpers), metrics)
    health.add_check(runner.ctx.health)
    health.add_section("maintenance", runner.status)
    lifecycle.on_startup(runner.start)
    lifecycle.on_shutdown(runner.stop)
    lifecycle.on_shutdown(helpers.close)
    lifecycle.on_shutdown(engine.close)
    if api_faults.enabled():
        log.warning(
            "%s=1: fault injection is on at POST %s (tests only)", api_faults.ENV, api_faults.PATH
        )
        app.add_route(api_faults.PATH, api_faults.Faults(engine, runner))

    group = None
    if world()[1] > 1:
        group = GroupStatus(cfg.distributed.backend)
        health.add_section("distributed", group.health)
        health.add_check(group.reasons)
        health.add_gauges(lambda: {"group_size": group.size, "group_healthy": group.healthy_ranks})
    _warn_exposure(cfg)
    return Service(cfg, app, engine, lifecycle, health, metrics, state, group)


def _state(
    state: StateStore, engine: Engine, health: Health, lifecycle: Lifecycle, stable_after_s: float
) -> None:
    """The state file: what is loaded, recovery after an unclean exit, the stable-run mark."""
    state.attach(engine.registry.subscribe, engine.registry.loaded)
    if state.boot is not None:
        engine.recover = list(state.boot.recover)
    health.add_check(lambda: _state_reasons(state))
    health.add_section("state", state.health)

    async def stable() -> None:
        await asyncio.sleep(stable_after_s)
        await asyncio.to_thread(state.mark_stable)

    lifecycle.spawn(stable, "stable")


def _state_reasons(state: StateStore) -> list[tuple[str, str]]:
    out = []
    if not state.writable:
        out.append(("degraded", f"state file: {state.problem}"))
    if state.pending:
        out.append(
            ("degraded", f"recovering models after an unclean shutdown: {', '.join(state.pending)}")
        )
    for name, err in state.recovery_failed.items():
        out.append(("degraded", f"model {name} was not recovered after an unclean shutdown: {err}"))
    return out


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
