"""The limits in force: admission slots, queue and shedding thresholds that can change at run time.

Safe mode runs under the safe-mode profile's limits and ends without a restart, so admission and
load shedding read the limits here on every request instead of copying config values at start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Optional

from ..config import LimitsConfig, SheddingConfig

log = logging.getLogger("appliance.engine")


@dataclass(frozen=True)
class Limits:
    """One set of limits: admission (slots, queue, wait) and shedding (memory thresholds)."""

    max_running: int
    max_queued: int
    queue_timeout_s: float
    memory_percent: float = 95.0
    mlx_active_bytes: Optional[int] = None
    retry_after_s: int = 5

    @classmethod
    def of(cls, limits: LimitsConfig, shedding: Optional[SheddingConfig] = None) -> Limits:
        shed = shedding or SheddingConfig()
        return cls(
            max_running=limits.max_running,
            max_queued=limits.max_queued,
            queue_timeout_s=limits.queue_timeout_s,
            memory_percent=shed.memory_percent,
            mlx_active_bytes=shed.mlx_active_bytes,
            retry_after_s=shed.retry_after_s,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class LimitsInForce:
    """The normal limits and the safe-mode ones, and which of them is in force now."""

    def __init__(self, normal: Limits, safe: Optional[Limits] = None, *, safe_mode: bool = False):
        self.normal = normal
        self.safe = safe or normal
        self.safe_mode = safe_mode
        self.now = self.safe if safe_mode else self.normal
        self._listeners: list[Callable[[Limits], None]] = []

    def on_change(self, fn: Callable[[Limits], None]) -> None:
        """Call fn(new limits) after every switch (admission hands out slots that opened)."""
        self._listeners.append(fn)

    def use(self, *, safe_mode: bool) -> None:
        """Put the safe-mode (True) or the normal limits in force."""
        if safe_mode == self.safe_mode:
            return
        self.safe_mode = safe_mode
        self.now = self.safe if safe_mode else self.normal
        log.info(
            "%s limits in force: max_running %d, max_queued %d, queue_timeout_s %g, "
            "shedding at %g%% memory",
            "safe-mode" if safe_mode else "normal",
            self.now.max_running,
            self.now.max_queued,
            self.now.queue_timeout_s,
            self.now.memory_percent,
        )
        for fn in self._listeners:
            fn(self.now)
