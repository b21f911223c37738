"""The request id: an incoming X-Request-ID (if sane) or a new one, echoed back."""

from __future__ import annotations

from typing import Any

from ..logs import new_id, request_id
from .common import Req, Resp


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
