"""One log line per request, written when the answer is complete (a stream: at its end)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Optional

from .common import PROBES, Req, Resp

log = logging.getLogger("appliance.access")


def api_of(path: str, metrics_path: str = "/metrics") -> str:
    """Which API a path belongs to: openai, anthropic, admin, probe or other."""
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/v1/"):
        return "openai"
    if path == "/admin" or path.startswith("/admin/"):
        return "admin"
    if path in PROBES or path == metrics_path:
        return "probe"
    return "other"


class AccessLog:
    """One line per request: request id, API, method, path, status, model, prompt and completion
    tokens (when a generation ran), latency, key fingerprint, client.

    A streamed answer is logged when its stream ends, so its line has the tokens generated and
    the whole stream's latency."""

    def __init__(self, metrics_path: str = "/metrics") -> None:
        self.metrics_path = metrics_path

    async def process_request(self, req: Req, resp: Resp) -> None:
        req.context.t_start = time.perf_counter()

    async def process_response(self, req: Req, resp: Resp, resource: Any, ok: bool) -> None:
        if resp.sse is not None:
            resp.sse = self._logged_stream(resp.sse, req, resp)
            return
        self.write(req, resp, stream=False)

    async def _logged_stream(
        self, events: AsyncIterator[Any], req: Req, resp: Resp
    ) -> AsyncIterator[Any]:
        # Falcon drops a stream whose client left without closing it: the line is then
        # written when the generator is finalised.
        try:
            async for event in events:
                yield event
        finally:
            self.write(req, resp, stream=True)

    def write(self, req: Req, resp: Resp, *, stream: bool) -> None:
        ctx = req.context
        t0 = getattr(ctx, "t_start", None)
        gen = getattr(ctx, "generation", None)
        prompt: Optional[int] = None
        completion: Optional[int] = None
        if gen is not None:
            prompt, completion = len(gen.prompt_tokens), len(gen.tokens)
        log.info(
            "%s %s %s",
            req.method,
            req.path,
            resp.status_code,
            extra={
                "request_id": getattr(ctx, "request_id", None),
                "api": api_of(req.path, self.metrics_path),
                "method": req.method,
                "path": req.path,
                "status": resp.status_code,
                "model": getattr(ctx, "model", None),
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "latency_ms": round((time.perf_counter() - t0) * 1000, 2) if t0 else None,
                "key": getattr(ctx, "key_fingerprint", None),
                "client": req.remote_addr,
                "stream": stream,
            },
        )
