"""Keys: admin keys guard /admin, API keys guard /v1 when set."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Optional, Union

from ..config import SecurityConfig
from ..errors import AdminClosed, Unauthorized
from ..status.access import access_for, kind_of
from .common import PROBES, Reject, Req, Resp, fingerprint, refuse
from .common import is_admin as admin_path

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def client_address(req: Req) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    """The peer's address from the ASGI scope (an IPv4-mapped IPv6 address as IPv4), or None
    when the scope names no client (a Unix socket)."""
    if req.scope.get("client") is None:
        return None
    try:
        # Falcon reads scope["client"] (any iterable, as ASGI allows) once and caches it.
        addr = ipaddress.ip_address(req.remote_addr)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class Auth:
    """Admin keys guard /admin (closed when none is set); API keys guard /v1 when set. With
    security.metrics_allow, the metrics path answers without a key only to those networks; the
    status page follows `status.access` (the admin key, or loopback read-only without one)."""

    def __init__(self, cfg: SecurityConfig, reject: Reject, metrics_path: str) -> None:
        self.admin = [_digest(k) for k in cfg.admin_keys]
        self.api = [_digest(k) for k in cfg.api_keys]
        self.admin_env = cfg.admin_keys_env
        self.security = cfg
        # Probes and /metrics are open unless configured closed; closed, they take any
        # configured key (API or admin), and stay closed when there is none.
        self.open_paths: set[str] = set()
        self.closed_paths: set[str] = set()
        (self.open_paths if cfg.open_probes else self.closed_paths).update(PROBES)
        self.metrics_path = metrics_path
        self.metrics_allow: list[Network] = [
            ipaddress.ip_network(c, strict=False) for c in cfg.metrics_allow
        ]
        if not self.metrics_allow:
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
        if path == self.metrics_path and self.metrics_allow:
            addr = client_address(req)
            if addr is not None and any(addr in net for net in self.metrics_allow):
                return
            if is_admin or self._match(key, self.api):
                return
            refuse(req, self.reject, "unauthorized")
            raise Unauthorized(
                f"{path} answers without a key only to security.metrics_allow "
                f"({', '.join(map(str, self.metrics_allow))}); {addr} is not in it: send "
                "Authorization: Bearer <key> or X-API-Key"
            )
        status_kind = kind_of(path)
        if status_kind is not None:
            # The status page: its own rules (status/access.py), whatever the API keys.
            access = access_for(req, status_kind, self.security)
            if not access.allowed:
                refuse(req, self.reject, "unauthorized")
                if access.status == 401:
                    raise Unauthorized(access.message)
                raise AdminClosed(access.message)
            return
        if admin_path(req):
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
