"""503 with Retry-After to inference while memory is past the thresholds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

from ..config import SheddingConfig
from ..engine.memory import system_memory
from ..errors import Shedding
from .common import Reject, Req, Resp, is_inference, refuse


class LoadShedding:
    """503 with Retry-After to inference when memory passes the thresholds."""

    def __init__(
        self, cfg: SheddingConfig, reject: Reject, mlx_active: Callable[[], Optional[int]]
    ) -> None:
        self.cfg = cfg
        self.reject = reject
        self.mlx_active = mlx_active

    async def process_request(self, req: Req, resp: Resp) -> None:
        if not is_inference(req) or req.method != "POST":
            return
        percent = system_memory().percent
        why = None
        if percent >= self.cfg.memory_percent:
            why = f"system memory is {percent:.0f}% used (limit {self.cfg.memory_percent:g}%)"
        elif self.cfg.mlx_active_bytes is not None:
            active = self.mlx_active()
            if active is not None and active >= self.cfg.mlx_active_bytes:
                why = f"MLX active memory is {active} bytes (limit {self.cfg.mlx_active_bytes})"
        if why:
            refuse(req, self.reject, "shed")
            raise Shedding(
                f"the server is shedding load: {why}", retry_after=self.cfg.retry_after_s
            )
