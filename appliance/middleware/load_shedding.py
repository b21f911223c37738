"""503 with Retry-After to inference while memory is past the thresholds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from ..engine.limits import LimitsInForce
from ..engine.memory import system_memory
from ..errors import Shedding
from .common import Reject, Req, Resp, is_inference, refuse


class LoadShedding:
    """503 with Retry-After to inference when memory passes the thresholds in force (the
    safe-mode profile's while safe mode is on)."""

    def __init__(
        self, limits: LimitsInForce, reject: Reject, mlx_active: Callable[[], Optional[int]]
    ) -> None:
        self.limits = limits
        self.reject = reject
        self.mlx_active = mlx_active

    async def process_request(self, req: Req, resp: Resp) -> None:
        if not is_inference(req) or req.method != "POST":
            return
        now = self.limits.now
        percent = system_memory().percent
        why = None
        if percent >= now.memory_percent:
            why = f"system memory is {percent:.0f}% used (limit {now.memory_percent:g}%)"
        elif now.mlx_active_bytes is not None:
            active = self.mlx_active()
            if active is not None and active >= now.mlx_active_bytes:
                why = f"MLX active memory is {active} bytes (limit {now.mlx_active_bytes})"
        if why:
            refuse(req, self.reject, "shed")
            raise Shedding(f"the server is shedding load: {why}", retry_after=now.retry_after_s)
