"""One log line per request."""

from __future__ import annotations

import logging
import time
from typing import Any

from .common import Req, Resp

log = logging.getLogger("appliance.access")


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
