"""The admin API (admin key): models, load / unload, health, the redacted config, safe-mode exit.

The auth middleware refuses /admin without the admin key. The resources check again
(`req.context.is_admin`), so a `middleware:` list without `auth` leaves the admin API closed,
never open.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, Optional

import falcon
import falcon.asgi
import orjson

from ..config import AppConfig, ConfigError, SecurityConfig, redacted
from ..config.models import SETTINGS, model_spec, settings_of, with_preset
from ..engine.service import Engine
from ..errors import AdminClosed, InsufficientMemory, InvalidRequest, ModelLoadError
from ..health import Health
from ..lifecycle import Lifecycle

log = logging.getLogger("appliance.admin")

ADMIN_BODY_MAX = 64 * 1024
UNLOAD_TIMEOUT_S = 30.0
UNLOAD_TIMEOUT_MAX_S = 3600.0


def _require_admin(req: falcon.asgi.Request, sec: SecurityConfig) -> None:
    if getattr(req.context, "is_admin", False):
        return
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


async def _read_object(
    req: falcon.asgi.Request, allowed: tuple[str, ...], *, allow_empty: bool = False
) -> dict[str, Any]:
    """The body as a JSON object with only `allowed` keys; InvalidRequest otherwise. With
    `allow_empty`, no body at all reads as {}."""
    chunks, size = [], 0
    async for chunk in req.stream:
        size += len(chunk)
        if size > ADMIN_BODY_MAX:
            raise InvalidRequest(f"the body is over {ADMIN_BODY_MAX} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip() and allow_empty:
        return {}
    if not raw.strip():
        raise InvalidRequest(
            'the body must be a JSON object such as {"model": "NAME"}', param="model"
        )
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest('the body must be a JSON object such as {"model": "NAME"}')
    extra = sorted(set(body) - set(allowed))
    if extra:
        raise InvalidRequest(
            f"unknown field {extra[0]!r}; allowed: {', '.join(allowed) or 'none'}",
            param=extra[0],
        )
    return body


def _model_name(body: dict[str, Any]) -> str:
    name = body.get("model")
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequest("'model' must be the name of a catalog model", param="model")
    return name


class _Admin:
    """What every admin resource takes: the engine and the config."""

    def __init__(self, engine: Engine, cfg: AppConfig) -> None:
        self.engine = engine
        self.cfg = cfg

    def model_view(self, name: str) -> dict[str, Any]:
        reg = self.engine.registry
        models = self.cfg.models
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
            "source": reg.source(name),
            "settings": settings_of(spec),
            "context_length": spec.context_length,
            "max_tokens": spec.max_tokens,
            "ttl_s": spec.ttl_s,
            "memory_estimate_bytes": info.memory_estimate_bytes,
            "loaded_at": info.loaded_at,
            "last_load_seconds": info.load_seconds,
            "last_used": info.last_used,
            "requests_served": info.requests_served,
            "in_flight": worker.active_count if worker is not None else 0,
            "error": info.error,
            "extra": info.extra,
        }


class AdminModels(_Admin):
    """GET /admin/models: every catalog model with its state and usage."""

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        _require_admin(req, self.cfg.security)
        reg = self.engine.registry
        _json(
            resp,
            {
                "object": "list",
                "data": [self.model_view(info.name) for info in reg.infos()],
                "loaded": reg.loaded(),
                "default": self.cfg.models.default,
            },
        )


LOAD_FIELDS = ("model", "path", "alias", *(k for k in SETTINGS if k != "path"))


def _runtime_name(body: dict[str, Any]) -> str:
    """The name a model loaded by path is served under: `alias`, else `model`, else the file
    or folder name (a hub id's name part)."""
    name = body.get("alias") or body.get("model")
    param = "alias" if body.get("alias") else "model"
    if name is None:
        stem = Path(str(body["path"]).rstrip("/")).name
        name = stem[: -len(".gguf")] if stem.lower().endswith(".gguf") else stem
        param = "path"
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}", name):
        raise InvalidRequest(
            f"{param} gives the model name {name!r}: use letters, digits, '.', '_', '-', ':'",
            param=param,
        )
    return name


class AdminLoad(_Admin):
    """POST /admin/models/load: a catalog model by name ({"model": NAME}), or any model by path
    ({"path": FOLDER | FILE.gguf | HUB_ID, "alias": NAME, "preset": NAME, SETTINGS...}, the
    settings of a catalog entry). No-op when loaded with the same settings."""

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        _require_admin(req, self.cfg.security)
        body = await _read_object(req, LOAD_FIELDS)
        reg = self.engine.registry
        added = False
        if body.get("path") is None:
            name = _model_name(body)
            settings = sorted(k for k in body if k != "model")
            if settings:
                raise InvalidRequest(
                    f"{settings[0]} applies to a model loaded by path; a catalog model's "
                    "settings are the profile's",
                    param=settings[0],
                )
            reg.spec(name)  # 404 before any work
        else:
            name = _runtime_name(body)
            entry = {k: v for k, v in body.items() if k not in ("model", "alias")}
            try:
                entry = with_preset(entry, self.cfg.models.presets, "load")
                spec = model_spec(entry, "load")
            except ConfigError as exc:
                param = exc.key.removeprefix("load.")
                raise InvalidRequest(
                    f"{param}: {exc.value!r} is invalid; allowed: {exc.allowed}", param=param
                ) from None
            added = name not in reg.names
            reg.add(name, spec)
        was_loaded = reg.worker(name) is not None
        t0 = time.perf_counter()
        try:
            await reg.load(name)
        except InsufficientMemory as exc:
            if added:
                reg.remove(name)
            raise ModelLoadError(exc.message, code="insufficient_memory") from None
        except BaseException:
            if added:
                reg.remove(name)  # nothing half-loaded stays behind
            raise
        seconds = round(time.perf_counter() - t0, 3)
        log.info("admin: model %s %s", name, "already loaded" if was_loaded else "loaded")
        _json(
            resp, {"model": self.model_view(name), "already_loaded": was_loaded, "seconds": seconds}
        )


class AdminUnload(_Admin):
    """POST /admin/models/unload {"model": NAME, "timeout_s": 30}: wait for in-flight
    requests of that model up to timeout_s, then fail the rest and stop it."""

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        _require_admin(req, self.cfg.security)
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
        reg = self.engine.registry
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


class AdminHealth:
    """GET /admin/health: ok / degraded / failing with reasons, and the figures behind them."""

    def __init__(self, health: Health, security: SecurityConfig) -> None:
        self.health = health
        self.security = security

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        _require_admin(req, self.security)
        _json(resp, self.health.report())


class AdminSafeModeExit(_Admin):
    """POST /admin/safe-mode/exit: end safe mode now. The normal limits come into force and the
    auto_load models load, without a restart. Answers 200 whether or not it was on."""

    def __init__(self, engine: Engine, cfg: AppConfig, lifecycle: Lifecycle) -> None:
        super().__init__(engine, cfg)
        self.lifecycle = lifecycle

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        _require_admin(req, self.cfg.security)
        chunks, size = [], 0
        async for chunk in req.stream:
            size += len(chunk)
            if size > ADMIN_BODY_MAX:
                raise InvalidRequest(f"the body is over {ADMIN_BODY_MAX} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks).strip()
        if raw and raw.replace(b" ", b"") != b"{}":
            raise InvalidRequest("this route takes no body (or an empty JSON object)")
        reason = self.lifecycle.safe_mode_reason
        was_on = self.lifecycle.exit_safe_mode("admin")
        if was_on:
            log.warning("admin: safe mode ended by POST /admin/safe-mode/exit")
        _json(
            resp,
            {
                "safe_mode": self.lifecycle.safe_mode,
                "was_on": was_on,
                "reason": reason,
                "limits": self.engine.limits_in_force.now.as_dict(),
                "auto_load": list(self.cfg.models.auto_load) if was_on else [],
            },
        )


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

    def __init__(self, engine: Engine, cfg: AppConfig) -> None:
        super().__init__(engine, cfg)
        self._body: Optional[bytes] = None  # the config does not change while the process runs

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        _require_admin(req, self.cfg.security)
        if self._body is None:
            sec = self.cfg.security
            secrets = [k for k in (*sec.admin_keys, *sec.api_keys) if k]
            self._body = orjson.dumps(_scrub(redacted(self.cfg), secrets))
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self._body


def add_routes(
    app: falcon.asgi.App, engine: Engine, health: Health, cfg: AppConfig, lifecycle: Lifecycle
) -> None:
    """Register every /admin route."""
    app.add_route("/admin/models", AdminModels(engine, cfg))
    app.add_route("/admin/models/load", AdminLoad(engine, cfg))
    app.add_route("/admin/models/unload", AdminUnload(engine, cfg))
    app.add_route("/admin/health", AdminHealth(health, cfg.security))
    app.add_route("/admin/config", AdminConfig(engine, cfg))
    app.add_route("/admin/safe-mode/exit", AdminSafeModeExit(engine, cfg, lifecycle))
