"""How much memory a model or a KV cache may still take, on any MLX backend."""

from __future__ import annotations

import functools
import time
from typing import Any

import psutil

SYSTEM_TTL_S = 0.05  # one /proc/meminfo read serves every request within 50 ms
_system: tuple[float, Any] = (0.0, None)


def system_memory() -> Any:
    """psutil.virtual_memory(), read at most every SYSTEM_TTL_S: the load-shedding check and the
    memory guard each wanted a read per request (~50-100 us each on the 2-core machine)."""
    global _system
    now = time.monotonic()
    at, value = _system
    if value is None or now - at >= SYSTEM_TTL_S:
        value = psutil.virtual_memory()
        _system = (now, value)
    return value


@functools.cache
def _cuda_total() -> int:
    """The default device's own memory on CUDA (read once), else 0: Metal's memory is unified
    with the system's and the CPU backend uses system memory."""
    try:
        import mlx.core as mx

        if mx.default_device() == mx.gpu and mx.cuda.is_available():
            info = mx.device_info()
            value = info.get("total_memory") or info.get("memory_size")
            return int(value) if isinstance(value, int) else 0
    except Exception:  # no MLX backend, or an MLX without device_info
        pass
    return 0


def free_bytes() -> int:
    """On CUDA, the device's memory less what MLX holds on it; elsewhere, the system memory
    available (Metal shares it with the system)."""
    total = _cuda_total()
    if total:
        try:
            import mlx.core as mx

            return total - int(mx.get_active_memory())
        except Exception:  # pragma: no cover - MLX went away
            pass
    return int(system_memory().available)
