"""The admin API (admin key): models, load / unload, health and the redacted config.

The auth middleware refuses /admin without the admin key. The resources check again
(`req.context.is_admin`), so a `middleware:` list without `auth` leaves the admin API closed,
never open.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Optional, Union

import falcon
import falcon.asgi
import orjson

from .. import __version__
from ..config import redacted
from ..errors import AdminClosed, InvalidRequest

if TYPE_CHECKING:
    from ..builder import Appliance

log = logging.getLogger("appliance.admin")

# What a health contributor returns: None when all is well, one (status, reason) or several.
# status is "ok", "degraded" or "failing"; the worst one found decides the overall status.
HealthResult = Union[None, tuple[str, str], Iterable[tuple[str, str]]]
HealthContributor = Callable[[], HealthResult]
STATUSES = ("ok", "degraded", "failing")

ADMIN_BODY_MAX = 64 * 1024
UNLOAD_TIMEOUT_S = 30.0
UNLOAD_TIMEOUT_MAX_S = 3600.0


def _require_admin(req: falcon.asgi.Request, appliance: Appliance) -> None:
    if getattr(req.context, "is_admin", False):
        return
    sec = appliance.cfg.security
    if not sec.admin_keys:
        raise AdminClosed(
            f"the admin API is closed: no admin key is set; set {sec.admin_keys_env} "
            "(or security.admin_keys) and restart"
        )
    # Only reachable when the auth middleware is not in the stack: stay closed.
    raise AdminClosed("the admin API is closed: add 'auth' to the middleware list")


def _json(resp: falcon.asgi.Response, data: Any) -> None:
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps(data)


async def _read_object(req: falcon.asgi.Request, allowed: tuple[str, ...]) -> dict[str, Any]:
    """The body as a JSON object with only `allowed` keys; InvalidRequest otherwise."""
    chunks, size = [], 0
    async for chunk in req.stream:
        size += len(chunk)
        if size > ADMIN_BODY_MAX:
            raise InvalidRequest(f"the body is over {ADMIN_BODY_MAX} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise InvalidRequest('the body must be a JSON object such as {"model": "NAME"}', param="model")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest('the body must be a JSON object such as {"model": "NAME"}')
    extra = sorted(set(body) - set(allowed))
    if extra:
        raise InvalidRequest(
            f"unknown field {extra[0]!r}; allowed: {', '.join(allowed)}", param=extra[0]
        )
    return body


def _model_name(body: dict[str, Any]) -> str:
    name = body.get("model")
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequest("'model' must be the name of a catalog model", param="model")
    return name


class _Admin:
    def __init__(self, appliance: Appliance) -> None:
        self.a = appliance

    def model_view(self, name: str) -> dict[str, Any]:
        reg = self.a.engine.registry
        models = self.a.cfg.models
        spec = reg.spec(name)
        info = reg.info(name)
        worker = reg.worker(name)
        return {
            "name": name,
            "path": info.path,
            "state": info.state,
            "loaded": worker is not None,
            "default": name == models.default,
            "auto_load": name in models.auto_load,
            "context_length": spec.context_length,
            "max_tokens": spec.max_tokens,
            "ttl_s": spec.ttl_s,
            "memory_estimate_bytes": info.memory_estimate_bytes,
            "loaded_at": info.loaded_at,
            "last_used": info.last_used,
            "requests_served": info.requests_served,
            "in_flight": worker.active_count if worker is not None else 0,
            "error": info.error,
            "extra": info.extra,
        }


class AdminModels(_Admin):
    """GET /admin/models: every catalog model with its state and usage."""

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        _require_admin(req, self.a)
        reg = self.a.engine.registry
        _json(
            resp,
            {
                "object": "list",
                "data": [self.model_view(info.name) for info in reg.infos()],
                "loaded": reg.loaded(),
                "default": self.a.cfg.models.default,
            },
        )


class AdminLoad(_Admin):
    """POST /admin/models/load {"model": NAME}: load a catalog model (no-op when loaded)."""

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        _require_admin(req, self.a)
        name = _model_name(await _read_object(req, ("model",)))
        reg = self.a.engine.registry
        reg.spec(name)  # 404 before any work
        was_loaded = reg.worker(name) is not None
        t0 = time.perf_counter()
        await reg.load(name)
        seconds = round(time.perf_counter() - t0, 3)
        log.info("admin: model %s %s", name, "already loaded" if was_loaded else "loaded")
        _json(resp, {"model": self.model_view(name), "already_loaded": was_loaded, "seconds": seconds})


class AdminUnload(_Admin):
    """POST /admin/models/unload {"model": NAME, "timeout_s": 30}: wait for in-flight
    requests of that model up to timeout_s, then fail the rest and stop it."""

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        _require_admin(req, self.a)
        body = await _read_object(req, ("model", "timeout_s"))
        name = _model_name(body)
        timeout = body.get("timeout_s", UNLOAD_TIMEOUT_S)
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not 0 <= timeout <= UNLOAD_TIMEOUT_MAX_S
        ):
            raise InvalidRequest(
                f"'timeout_s' must be a number of seconds in 0..{UNLOAD_TIMEOUT_MAX_S:g}",
                param="timeout_s",
            )
        reg = self.a.engine.registry
        reg.spec(name)
        worker = reg.worker(name)
        in_flight = worker.active_count if worker is not None else 0
        t0 = time.perf_counter()
        await reg.unload(name, timeout_s=float(timeout))
        seconds = round(time.perf_counter() - t0, 3)
        log.info("admin: model %s unloaded (%d in flight at the call)", name, in_flight)
        _json(
            resp,
            {
                "model": self.model_view(name),
                "was_loaded": worker is not None,
                "in_flight_at_start": in_flight,
                "seconds": seconds,
            },
        )


def _normalise(result: HealthResult) -> list[tuple[str, str]]:
    if result is None:
        return []
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], str):
        items: list[Any] = [result]
    else:
        items = list(result)
    out = []
    for item in items:
        status, reason = item
        out.append((status if status in STATUSES else "degraded", str(reason)))
    return out


class AdminHealth(_Admin):
    """GET /admin/health: ok / degraded / failing with reasons, and the figures behind them."""

    def checks(self, live: dict[str, Any]) -> list[tuple[str, str]]:
        """The built-in checks, then every contributor on `Appliance.health_contributors`."""
        a = self.a
        out: list[tuple[str, str]] = []
        infos = a.engine.registry.infos()
        if live["models_loaded"] == 0:
            loading = [i.name for i in infos if i.state == "loading"]
            if loading:
                out.append(("degraded", f"no model is loaded yet; loading: {', '.join(loading)}"))
            else:
                out.append(("failing", "no model is loaded"))
        for info in infos:
            if info.state == "failed":
                out.append(("degraded", f"model {info.name} failed: {info.error}"))
        if a.gate.draining:
            out.append(("degraded", "draining before exit: new inference is refused"))
        if a.cfg.safe_mode_reason:
            out.append(("degraded", f"safe mode: {a.cfg.safe_mode_reason}"))
        shed = a.cfg.shedding
        percent = live["system_memory_percent"]
        if percent >= shed.memory_percent:
            out.append(
                ("degraded", f"shedding inference: system memory {percent:.0f}% >= {shed.memory_percent:g}%")
            )
        active = live["memory"].get("mlx_active")
        if shed.mlx_active_bytes is not None and active is not None and active >= shed.mlx_active_bytes:
            out.append(
                ("degraded", f"shedding inference: MLX active memory {active} >= {shed.mlx_active_bytes} bytes")
            )
        if live["max_queued"] and live["waiting"] >= live["max_queued"]:
            out.append(("degraded", "the admission queue is full: new requests get 429"))
        for fn in a.health_contributors:
            try:
                out.extend(_normalise(fn()))
            except Exception as exc:  # a broken check must not break the health report
                log.exception("health contributor failed")
                out.append(("degraded", f"health check {getattr(fn, '__name__', fn)!s} failed: {exc}"))
        return out

    @staticmethod
    def _sections(providers: dict[str, Callable[[], Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, fn in providers.items():
            try:
                out[name] = fn()
            except Exception as exc:  # one broken section must not break the report
                out[name] = {"error": str(exc)}
        return out

    def report(self) -> dict[str, Any]:
        a = self.a
        live = a.live()
        checks = self.checks(live)
        worst = max((STATUSES.index(s) for s, _ in checks), default=0)
        mem = live["memory"]
        return {
            "status": STATUSES[worst],
            "reasons": [{"status": s, "reason": r} for s, r in checks if s != "ok"],
            "system_memory_percent": live["system_memory_percent"],
            "memory_bytes": {
                "rss": mem.get("rss"),
                "mlx_active": mem.get("mlx_active"),
                "mlx_peak": mem.get("mlx_peak"),
                "mlx_cache": mem.get("mlx_cache"),
            },
            "models_loaded": a.engine.registry.loaded(),
            "requests": {
                "running": live["running"],
                "waiting": live["waiting"],
                "max_running": live["max_running"],
                "max_queued": live["max_queued"],
            },
            "generation_threads_alive": live["threads_alive"],
            "helpers": self._sections(a.helper_status),
            "uptime_s": round(live["uptime"], 3),
            "version": __version__,
            "backend": live["build"].get("backend"),
            "safe_mode": bool(a.cfg.safe_mode_reason),
            "safe_mode_reason": a.cfg.safe_mode_reason,
            "draining": a.gate.draining,
            # Sections other parts add (state file and recovery, maintenance tasks, ...).
            **self._sections(a.health_details),
        }

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        _require_admin(req, self.a)
        _json(resp, self.report())


_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
# Field names that hold secrets wherever they appear (helpers' api_key, a token, a password).
_SECRET_NAME = re.compile(r"(?:^|_)(?:key|keys|token|secret|secrets|password|passwd)$")


def _scrub(obj: Any, secrets: list[str]) -> Any:
    """Belt and braces over config.redacted(): no configured key anywhere, no URL password."""
    if isinstance(obj, dict):
        return {
            k: _redact_all(v) if _SECRET_NAME.search(str(k).lower()) else _scrub(v, secrets)
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [_scrub(v, secrets) for v in obj]
    if isinstance(obj, str):
        # Exact match, or contained (a key of 8+ characters: shorter ones would hit anything).
        if any(obj == s or (len(s) >= 8 and s in obj) for s in secrets):
            return "<redacted>"
        return _URL_USERINFO.sub("<redacted>@", obj)
    return obj


def _redact_all(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_redact_all(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _redact_all(v) for k, v in obj.items()}
    return "<redacted>" if obj not in (None, "") else obj


class AdminConfig(_Admin):
    """GET /admin/config: the composed config with every secret redacted."""

    def __init__(self, appliance: Appliance) -> None:
        super().__init__(appliance)
        self._body: Optional[bytes] = None  # the config does not change while the process runs

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        _require_admin(req, self.a)
        if self._body is None:
            sec = self.a.cfg.security
            secrets = [k for k in (*sec.admin_keys, *sec.api_keys) if k]
            self._body = orjson.dumps(_scrub(redacted(self.a.cfg), secrets))
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self._body


def add_routes(app: falcon.asgi.App, appliance: Appliance) -> None:
    """Register every /admin route."""
    app.add_route("/admin/models", AdminModels(appliance))
    app.add_route("/admin/models/load", AdminLoad(appliance))
    app.add_route("/admin/models/unload", AdminUnload(appliance))
    app.add_route("/admin/health", AdminHealth(appliance))
    app.add_route("/admin/config", AdminConfig(appliance))


__all__ = [
    "AdminConfig",
    "AdminHealth",
    "AdminLoad",
    "AdminModels",
    "AdminUnload",
    "HealthContributor",
    "HealthResult",
    "add_routes",
]
