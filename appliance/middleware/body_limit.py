"""413 for a body over limits.max_body_bytes, before it is read."""

from __future__ import annotations

from ..config import LimitsConfig
from ..errors import BodyTooLarge
from .common import Reject, Req, Resp, refuse


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
