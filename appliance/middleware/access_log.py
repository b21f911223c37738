"""One log line per request, written when the answer is complete (a stream: at its end)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Optional

from .common import PROBES, Req, Resp

log = logging.getLogger("appliance.access")


def api_of(path: str, metrics_path: str = "/metrics") -> str:
    """Which API a path belongs to: openai, anthropic, responses (OpenAI's Responses API),
    admin, probe or other."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    if path == "/v1/responses" or path.startswith("/v1/responses/"):
        return "responses"
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
            resp.sse = self._logged_stream(resp.sse, req, resp.status_code)
            return
        self.write(req, resp.status_code, stream=False)

    async def _logged_stream(
        self, events: AsyncIterator[Any], req: Req, status: int
    ) -> AsyncIterator[Any]:
        # Falcon drops a stream whose client left without closing it: this generator is then
        # finalised at once (it holds no reference back to the response, so no cycle delays
        # it), closes the inner one (which frees the batch slot) and writes the line.
        try:
            async for event in events:
                yield event
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:  # the stream's own end already went wrong; log the line
                    pass
            self.write(req, status, stream=True)

    def write(self, req: Req, status: int, *, stream: bool) -> None:
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
            status,
            extra={
                "request_id": getattr(ctx, "request_id", None),
                "api": api_of(req.path, self.metrics_path),
                "method": req.method,
                "path": req.path,
                "status": status,
                "model": getattr(ctx, "model", None),
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "latency_ms": round((time.perf_counter() - t0) * 1000, 2) if t0 else None,
                "key": getattr(ctx, "key_fingerprint", None),
                "client": req.remote_addr,
                "stream": stream,
            },
        )
