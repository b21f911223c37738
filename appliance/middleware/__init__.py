"""The middleware table: names in `middleware:` map to classes here, never to import strings.

One module per middleware; each class takes only its own config section (and, where it refuses
requests, a callback that counts the refusal by reason). Requests meet them in the configured
order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

from ..config import MIDDLEWARE_NAMES, AppConfig
from ..engine.limits import Limits, LimitsInForce
from .access_log import AccessLog
from .auth import Auth
from .body_limit import BodyLimit
from .common import Reject, fingerprint, is_loopback
from .cors import Cors
from .host_guard import HostGuard
from .load_shedding import LoadShedding
from .rate_limit import RateLimit
from .request_id import RequestId


def stack(
    cfg: AppConfig,
    reject: Reject,
    mlx_active: Callable[[], Optional[int]],
    in_force: Optional[LimitsInForce] = None,
) -> list[Any]:
    """The configured middleware, in order. `reject(reason)` counts a refusal; `mlx_active`
    reads MLX's active bytes and `in_force` holds the shedding thresholds (load shedding)."""
    limits = in_force or LimitsInForce(Limits.of(cfg.limits, cfg.shedding))
    table: dict[str, Callable[[], Any]] = {
        "request_id": RequestId,
        "access_log": lambda: AccessLog(cfg.metrics.path),
        "host_guard": lambda: HostGuard(cfg.server, reject),
        "body_limit": lambda: BodyLimit(cfg.limits, reject),
        "cors": lambda: Cors(cfg.security),
        "load_shedding": lambda: LoadShedding(limits, reject, mlx_active),
        "auth": lambda: Auth(cfg.security, reject, cfg.metrics.path),
        "rate_limit": lambda: RateLimit(cfg.rate_limits, reject),
    }
    assert set(table) == set(MIDDLEWARE_NAMES)
    return [table[name]() for name in cfg.middleware]


__all__ = [
    "AccessLog",
    "Auth",
    "BodyLimit",
    "Cors",
    "HostGuard",
    "LoadShedding",
    "RateLimit",
    "RequestId",
    "fingerprint",
    "is_loopback",
    "stack",
]
