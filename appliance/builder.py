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
from .api import status as api_status
from .api.anthropic import CountTokens, Messages
from .api.embeddings import Embeddings, Rerank
from .api.generation import Generate
from .api.openai import ChatCompletions, Completions, Models
from .api.openapi import OpenAPI
from .api.probes import Live, Ready
from .api.responses import ResponseById, Responses
from .api.responses_store import ResponseStore
from .api.seal import Seal
from .config import AppConfig, safe_mode_overlay
from .config.models import model_spec, settings_of
from .engine import cpu, memory
from .engine.distributed import GroupStatus, world
from .engine.limits import Limits, LimitsInForce
from .engine.service import Engine
from .health import Health
from .helper_nodes import HelperNodes
from .lifecycle import Lifecycle
from .metrics import Metrics, RequestCounter
from .middleware import is_loopback
from .state import StateStore
from .status import History, RecentErrors, StatusBoard, Traffic, refresh_interval
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
    safe: Optional[AppConfig] = None,
) -> Service:
    """Assemble the appliance from the typed config; nothing starts until the lifespan runs.

    `safe_mode_reason`: start in safe mode (a crash loop); `safe`: the safe-mode profile merged
    over the config, whose limits are in force until safe mode ends (default: the config with
    the safe-mode profile's file merged over it)."""
    if safe_mode_reason is not None and safe is None:
        safe = safe_mode_config(cfg)
    in_force = LimitsInForce(
        Limits.of(cfg.limits, cfg.shedding),
        Limits.of(safe.limits, safe.shedding) if safe is not None else None,
        safe_mode=safe_mode_reason is not None,
    )
    engine = engine or Engine(cfg.models, cfg.limits, in_force)
    if engine.limits_in_force is not in_force:  # an engine made by the caller (tests)
        in_force = engine.limits_in_force
    lifecycle = Lifecycle(safe_mode_reason, cfg.state.stable_after_s)
    _safe_mode(lifecycle, engine, in_force, state)
    metrics = Metrics(cfg.metrics, registry)
    health = Health(engine, lifecycle)
    metrics.watch(health.vitals)
    engine.observe(metrics.on_request)
    engine.registry.subscribe(metrics.on_model)

    app = falcon.asgi.App(middleware=[], cors_enable=False)
    recent_errors = RecentErrors(app)
    stack: list[Any] = [
        lifecycle,
        RequestCounter(metrics, app),
        recent_errors,
        *middleware.stack(cfg, metrics.reject, memory.mlx_active, in_force),
    ]
    for mw in stack:
        app.add_middleware(mw)
    api_errors.install(app)
    app.req_options.strip_url_path_trailing_slash = True

    lifecycle.spawn(lambda: engine.start_up(load_models=not lifecycle.safe_mode), "auto-load")
    lifecycle.spawn(metrics.watch_loop_lag, "loop-lag")
    gen = Generate(engine, lifecycle, cfg.limits.max_body_bytes)
    app.add_route("/healthz", Live())
    app.add_route("/readyz", Ready(engine, lifecycle))
    app.add_route(cfg.metrics.path, MetricsResource(metrics))
    app.add_route("/openapi.json", OpenAPI(cfg))
    app.add_route("/v1/models", Models(engine))
    app.add_route("/v1/chat/completions", ChatCompletions(gen))
    app.add_route("/v1/completions", Completions(gen))
    seal = Seal()  # thinking signatures, sealed reasoning: valid for this process's life
    app.add_route("/v1/messages", Messages(gen, seal))
    app.add_route("/v1/messages/count_tokens", CountTokens(gen))
    store = ResponseStore(cfg.responses)
    app.add_route("/v1/responses", Responses(gen, store, seal))
    app.add_route("/v1/responses/{response_id}", ResponseById(store))
    api_admin.add_routes(app, engine, health, cfg, lifecycle)
    _status_page(app, engine, health, lifecycle, recent_errors, cfg)

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
        _state(state, engine, health)
    lifecycle.spawn(
        lambda: lifecycle.watch_stable(
            (lambda: asyncio.to_thread(state.mark_stable)) if state is not None else _nothing
        ),
        "stable",
    )
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


def _status_page(
    app: falcon.asgi.App,
    engine: Engine,
    health: Health,
    lifecycle: Lifecycle,
    recent_errors: RecentErrors,
    cfg: AppConfig,
) -> None:
    """GET /status and /status.json: per-model traffic from the engine's request events, a
    chart history sampled in the background, the recent errors counted by the middleware."""
    traffic = Traffic()
    engine.observe(traffic.on_request)
    history = History(traffic, engine.stats)
    lifecycle.spawn(history.run, "status-history")
    board = StatusBoard(engine, health, cfg.models, cfg.limits, traffic, history, recent_errors)
    api_status.add_routes(app, board, cfg.security, refresh_interval(cfg.rate_limits.admin))


def _safe_mode(
    lifecycle: Lifecycle, engine: Engine, in_force: LimitsInForce, state: Optional[StateStore]
) -> None:
    """Safe mode holds loads nobody asked for and keeps its limits until it ends; then the
    normal limits come into force and the auto_load models load, without a restart."""
    engine.load_guard = lifecycle.guard_load

    def ended(how: str) -> None:
        in_force.use(safe_mode=False)
        if state is not None:
            lifecycle.adopt(asyncio.ensure_future(asyncio.to_thread(state.safe_mode_ended, how)))
        lifecycle.adopt(asyncio.ensure_future(engine.load_auto()), "auto-load")

    lifecycle.on_safe_mode_exit(ended)


def _nothing() -> None:
    return None


def safe_mode_config(cfg: AppConfig) -> AppConfig:
    """The safe-mode profile's file merged over a typed config."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(cfg), safe_mode_overlay())
    safe = OmegaConf.to_object(merged)
    assert isinstance(safe, AppConfig)
    return safe


def _state(state: StateStore, engine: Engine, health: Health) -> None:
    """The state file: what is loaded, recovery after an unclean exit, lifetime counters."""
    reg = engine.registry
    state.attach(
        reg.subscribe,
        reg.loaded,
        lambda: {name: settings_of(spec) for name, spec in reg.added().items()},
    )
    if state.boot is not None:
        engine.recover = list(state.boot.recover)
        for name, settings in state.boot.runtime.items():  # loaded by path before the restart
            try:
                reg.add(name, model_spec(settings, f"state.runtime.{name}"))
            except Exception as exc:  # a model the profile now names, or a bad entry
                log.warning("model %s loaded at run time is not restored: %s", name, exc)
                continue
            if name in state.boot.runtime_loaded and name not in engine.recover:
                engine.recover.append(name)
    health.add_check(lambda: _state_reasons(state))
    health.add_section("state", state.health)
    health.add_gauges(state.lifetime)


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
