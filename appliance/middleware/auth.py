"""Keys: admin keys guard /admin, API keys guard /v1 when set."""

from __future__ import annotations

import hashlib
import hmac
from typing import Optional

from ..config import SecurityConfig
from ..errors import AdminClosed, Unauthorized
from ..status.access import access_for, kind_of
from .common import PROBES, Reject, Req, Resp, fingerprint, refuse
from .common import is_admin as admin_path


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Auth:
    """Admin keys guard /admin (closed when none is set); API keys guard /v1 when set; the
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


GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank")
