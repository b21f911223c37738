"""The middleware table: names in `middleware:` map to classes here, never to import strings.

Each class takes only its own config section (and, where it refuses requests, a callback that
counts the refusal by reason). Requests meet them in the configured order.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from typing import Any, Optional

import falcon
import falcon.asgi

from ..config import LimitsConfig, RateLimitsConfig, SecurityConfig, ServerConfig, SheddingConfig
from ..engine.memory import system_memory
from ..errors import (
    AdminClosed,
    BodyTooLarge,
    ForbiddenHost,
    RateLimited,
    Shedding,
    Unauthorized,
)
from ..logs import new_id, request_id

Reject = Callable[[str], None]
Req = falcon.asgi.Request
Resp = falcon.asgi.Response

log = logging.getLogger("appliance.access")

PROBES = ("/healthz", "/readyz")


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    return host in ("localhost", "::1") or host.startswith("127.")


def _is_inference(req: Req) -> bool:
    return req.path.startswith("/v1/")


def _is_admin(req: Req) -> bool:
    return req.path == "/admin" or req.path.startswith("/admin/")


def refuse(req: Req, reject: Reject, reason: str) -> None:
    """Count a refusal once: the metrics' response hook skips requests marked here."""
    req.context.rejected = reason
    reject(reason)


def fingerprint(key: str) -> str:
    """A short, non-reversible name for a key, safe to log."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class RequestId:
    """Honours an incoming X-Request-ID (if sane), else makes one; echoes it back."""

    async def process_request(self, req: Req, resp: Resp) -> None:
        rid = req.get_header("X-Request-ID")
        if not rid or len(rid) > 128 or not rid.isprintable():
            rid = new_id()
        req.context.request_id = rid
        request_id.set(rid)

    async def process_response(self, req: Req, resp: Resp, resource: Any, ok: bool) -> None:
        rid = getattr(req.context, "request_id", None)
        if rid:
            resp.set_header("X-Request-ID", rid)


class AccessLog:
    """One JSON line per request: method, path, status, latency, request id, model, key."""

    async def process_request(self, req: Req, resp: Resp) -> None:
        req.context.t_start = time.perf_counter()

    async def process_response(self, req: Req, resp: Resp, resource: Any, ok: bool) -> None:
        t0 = getattr(req.context, "t_start", None)
        log.info(
            "%s %s %s",
            req.method,
            req.path,
            resp.status_code,
            extra={
                "method": req.method,
                "path": req.path,
                "status": resp.status_code,
                "latency_ms": round((time.perf_counter() - t0) * 1000, 2) if t0 else None,
                "model": getattr(req.context, "model", None),
                "key": getattr(req.context, "key_fingerprint", None),
                "client": req.remote_addr,
                "stream": resp.sse is not None,
            },
        )


class HostGuard:
    """DNS-rebinding defence: bound to loopback, only loopback Host names (or allowed_hosts)."""

    LOOPBACK = ("localhost", "127.0.0.1", "::1", "[::1]")

    def __init__(self, cfg: ServerConfig, reject: Reject) -> None:
        self.active = is_loopback(cfg.host)
        self.allowed = {h.lower() for h in cfg.allowed_hosts}
        self.reject = reject

    def _host_ok(self, host: str) -> bool:
        host = host.lower()
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") and "]:" in host else host
        if name.startswith("127.") or name in self.LOOPBACK or host in self.allowed or name in self.allowed:
            return True
        return name.endswith(".localhost")

    async def process_request(self, req: Req, resp: Resp) -> None:
        if not self.active:
            return
        host = req.get_header("Host") or ""
        if not self._host_ok(host):
            refuse(req, self.reject, "forbidden_host")
            raise ForbiddenHost(
                f"Host {host!r} is not allowed on a loopback-bound server; add it to "
                "server.allowed_hosts",
            )


class BodyLimit:
    """413 from Content-Length before any of the body is read (streamed bodies are capped too)."""

    def __init__(self, cfg: LimitsConfig, reject: Reject) -> None:
        self.max = cfg.max_body_bytes
        self.reject = reject

    async def process_request(self, req: Req, resp: Resp) -> None:
        n = req.content_length
        if n is not None and n > self.max:
            refuse(req, self.reject, "too_large")
            raise BodyTooLarge(f"the body is {n} bytes; the limit is {self.max}")


class Cors:
    """No origin allowed unless listed in security.cors_origins; preflights answered."""

    def __init__(self, cfg: SecurityConfig) -> None:
        self.origins = set(cfg.cors_origins)

    def _allowed(self, origin: Optional[str]) -> Optional[str]:
        """The origin to echo back, or None when it is not listed."""
        if origin and ("*" in self.origins or origin in self.origins):
            return origin
        return None

    async def process_request(self, req: Req, resp: Resp) -> None:
        if req.method != "OPTIONS" or not req.get_header("Access-Control-Request-Method"):
            return
        req.context.preflight = True
        allowed = self._allowed(req.get_header("Origin"))
        resp.set_header("Vary", "Origin")
        if allowed:
            resp.status = falcon.HTTP_204
            resp.set_header("Access-Control-Allow-Origin", allowed)
            resp.set_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
            resp.set_header(
                "Access-Control-Allow-Headers",
                "Authorization, Content-Type, X-API-Key, X-Request-ID",
            )
            resp.set_header("Access-Control-Max-Age", "600")
        else:
            resp.status = falcon.HTTP_403
            resp.content_type = falcon.MEDIA_JSON
            resp.data = (
                b'{"error":{"message":"origin not allowed; list it in security.cors_origins",'
                b'"type":"permission_error","param":null,"code":"cors_forbidden"}}'
            )
        resp.complete = True  # skips the rest of the stack (auth included) and routing

    async def process_response(self, req: Req, resp: Resp, resource: Any, ok: bool) -> None:
        if getattr(req.context, "preflight", False):
            return
        allowed = self._allowed(req.get_header("Origin"))
        if allowed:
            resp.set_header("Access-Control-Allow-Origin", allowed)
            resp.set_header(
                "Access-Control-Expose-Headers",
                "X-Request-ID, Retry-After, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset",
            )
        if self.origins:
            resp.set_header("Vary", "Origin")


class LoadShedding:
    """503 with Retry-After to inference when memory passes the thresholds."""

    def __init__(self, cfg: SheddingConfig, reject: Reject, mlx_active: Callable[[], Optional[int]]) -> None:
        self.cfg = cfg
        self.reject = reject
        self.mlx_active = mlx_active

    async def process_request(self, req: Req, resp: Resp) -> None:
        if not _is_inference(req) or req.method != "POST":
            return
        percent = system_memory().percent
        why = None
        if percent >= self.cfg.memory_percent:
            why = f"system memory is {percent:.0f}% used (limit {self.cfg.memory_percent:g}%)"
        elif self.cfg.mlx_active_bytes is not None:
            active = self.mlx_active()
            if active is not None and active >= self.cfg.mlx_active_bytes:
                why = f"MLX active memory is {active} bytes (limit {self.cfg.mlx_active_bytes})"
        if why:
            refuse(req, self.reject, "shed")
            raise Shedding(f"the server is shedding load: {why}", retry_after=self.cfg.retry_after_s)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Auth:
    """Admin keys guard /admin (closed when none is set); API keys guard /v1 when set."""

    def __init__(self, cfg: SecurityConfig, reject: Reject, metrics_path: str) -> None:
        self.admin = [_digest(k) for k in cfg.admin_keys]
        self.api = [_digest(k) for k in cfg.api_keys]
        self.admin_env = cfg.admin_keys_env
        # Probes and /metrics are open unless configured closed; closed, they take any
        # configured key (API or admin), and stay closed when there is none.
        self.open_paths: set[str] = set()
        self.closed_paths: set[str] = set()
        (self.open_paths if cfg.open_probes else self.closed_paths).update(PROBES)
        (self.open_paths if cfg.open_metrics else self.closed_paths).add(metrics_path)
        self.reject = reject

    @staticmethod
    def _presented(req: Req) -> Optional[str]:
        auth = req.get_header("Authorization")
        if auth:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        key = req.get_header("X-API-Key")
        return key.strip() if key else None

    @staticmethod
    def _match(key: Optional[str], digests: list[bytes]) -> bool:
        if key is None:
            return False
        d = _digest(key)
        found = False
        for ref in digests:  # no early exit: the time does not depend on which key matched
            found |= hmac.compare_digest(d, ref)
        return found

    async def process_request(self, req: Req, resp: Resp) -> None:
        # Only a preflight the CORS middleware already answered passes without a key: with
        # auth before cors in the stack, preflights meet auth first and get 401.
        if getattr(req.context, "preflight", False):
            return
        key = self._presented(req)
        is_admin = self._match(key, self.admin)
        req.context.is_admin = is_admin
        if key is not None:
            req.context.key_fingerprint = fingerprint(key)
        path = req.path
        if path in self.open_paths:
            return
        if _is_admin(req):
            if not self.admin:
                refuse(req, self.reject, "unauthorized")
                raise AdminClosed(
                    "the admin API is closed: no admin key is set; set "
                    f"{self.admin_env} (or security.admin_keys) and restart"
                )
            if not is_admin:
                refuse(req, self.reject, "unauthorized")
                raise Unauthorized(
                    "missing or wrong admin key: send Authorization: Bearer <key> or X-API-Key"
                )
            return
        if path in self.closed_paths:
            if not (is_admin or self._match(key, self.api)):
                refuse(req, self.reject, "unauthorized")
                raise Unauthorized(
                    f"{path} needs a key (security.open_probes / open_metrics is false): "
                    "send Authorization: Bearer <key> or X-API-Key"
                )
            return
        # /v1 and everything else not open: API keys when set (the admin key works too).
        if self.api and not (is_admin or self._match(key, self.api)):
            refuse(req, self.reject, "unauthorized")
            raise Unauthorized(
                "missing or wrong API key: send Authorization: Bearer <key> or X-API-Key"
            )


GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank")


class RateLimit:
    """Per key (else per client address) limits on POSTs to /v1 generation routes and /admin."""

    def __init__(self, cfg: RateLimitsConfig, reject: Reject) -> None:
        from limits import parse_many, storage, strategies

        self.store = storage.storage_from_string(cfg.storage)
        self.limiter = strategies.MovingWindowRateLimiter(self.store)
        self.inference = parse_many(cfg.inference) if cfg.inference else []
        self.admin = parse_many(cfg.admin) if cfg.admin else []
        self.reject = reject

    async def process_request(self, req: Req, resp: Resp) -> None:
        if req.method != "POST":
            return
        if req.path in GENERATION_ROUTES:
            scope, items = "inference", self.inference
        elif _is_admin(req):
            scope, items = "admin", self.admin
        else:
            return
        if not items:
            return
        who = getattr(req.context, "key_fingerprint", None) or f"addr:{req.remote_addr}"
        for item in items:
            if not self.limiter.hit(item, scope, who):
                stats = self.limiter.get_window_stats(item, scope, who)
                retry = max(1, int(stats.reset_time - time.time()) + 1)
                refuse(req, self.reject, "rate_limited")
                req.context.ratelimit = (item, 0, retry)
                raise RateLimited(
                    f"rate limit {item} exceeded for this key; retry in {retry} s",
                    retry_after=retry,
                )
            stats = self.limiter.get_window_stats(item, scope, who)
            req.context.ratelimit = (item, stats.remaining, max(0, int(stats.reset_time - time.time())))

    async def process_response(self, req: Req, resp: Resp, resource: Any, ok: bool) -> None:
        rl = getattr(req.context, "ratelimit", None)
        if rl:
            item, remaining, reset = rl
            resp.set_header("RateLimit-Limit", str(item.amount))
            resp.set_header("RateLimit-Remaining", str(remaining))
            resp.set_header("RateLimit-Reset", str(reset))
