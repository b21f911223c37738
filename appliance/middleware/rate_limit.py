"""Per-key rate limits on generation and admin POSTs (the `limits` library)."""

from __future__ import annotations

import time
from typing import Any

from ..config import RateLimitsConfig
from ..errors import RateLimited
from ..status.access import RATE_LIMITED as STATUS_PATHS
from .common import GENERATION_ROUTES, Reject, Req, Resp, is_admin, refuse


class RateLimit:
    """Per key (else per client address) limits on POSTs to /v1 generation routes and /admin;
    the admin limit also counts GETs of the status page and its data (it shows admin data)."""

    def __init__(self, cfg: RateLimitsConfig, reject: Reject) -> None:
        from limits import parse_many, storage, strategies

        self.store = storage.storage_from_string(cfg.storage)
        self.limiter = strategies.MovingWindowRateLimiter(self.store)
        self.inference = parse_many(cfg.inference) if cfg.inference else []
        self.admin = parse_many(cfg.admin) if cfg.admin else []
        self.reject = reject

    async def process_request(self, req: Req, resp: Resp) -> None:
        post = req.method == "POST"
        if post and req.path in GENERATION_ROUTES:
            scope, items = "inference", self.inference
        elif (post and is_admin(req)) or (req.method == "GET" and req.path in STATUS_PATHS):
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
            req.context.ratelimit = (
                item,
                stats.remaining,
                max(0, int(stats.reset_time - time.time())),
            )

    async def process_response(self, req: Req, resp: Resp, resource: Any, ok: bool) -> None:
        rl = getattr(req.context, "ratelimit", None)
        if rl:
            item, remaining, reset = rl
            resp.set_header("RateLimit-Limit", str(item.amount))
            resp.set_header("RateLimit-Remaining", str(remaining))
            resp.set_header("RateLimit-Reset", str(reset))
