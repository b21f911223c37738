"""CORS: listed origins only; preflights answered here."""

from __future__ import annotations

from typing import Any, Optional

import falcon

from ..config import SecurityConfig
from .common import Req, Resp


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
