"""How much memory a model or a KV cache may still take, on any MLX backend."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Optional

import psutil

from .mlx_ext.cuda import on_cuda

SYSTEM_TTL_S = 0.05  # one /proc/meminfo read serves every request within 50 ms
_system: tuple[float, Any] = (0.0, None)


def system_memory() -> Any:
    """psutil.virtual_memory(), read at most every SYSTEM_TTL_S: the load-shedding check and the
    memory guard each wanted a read per request (~50-100 us each on a 2-core x86 CPU)."""
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

        if on_cuda():
            info = mx.device_info()
            value = info.get("total_memory") or info.get("memory_size")
            return int(value) if isinstance(value, int) else 0
    except Exception:  # no MLX backend, or an MLX without device_info
        pass
    return 0


# MLX memory of the models in engine processes of their own (models.catalog.NAME.
# engine_process), as each last reported it: model name -> (active, peak, cache) bytes.
_engines: dict[str, tuple[int, int, int]] = {}


def report_engine(name: str, active: int, peak: int, cache: int) -> None:
    _engines[name] = (active, peak, cache)


def forget_engine(name: str) -> None:
    _engines.pop(name, None)


def mlx_memory() -> Optional[tuple[int, int, int]]:
    """MLX's active, peak and cache bytes through backend-neutral calls: this process's plus
    each engine process's last report (a sum of peaks, not the peak of the sum). None when
    there is no MLX here and no engine process."""
    try:
        import mlx.core as mx

        mine = (int(mx.get_active_memory()), int(mx.get_peak_memory()), int(mx.get_cache_memory()))
    except Exception:  # no MLX backend here
        if not _engines:
            return None
        mine = (0, 0, 0)
    active, peak, cache = mine
    for a, p, c in list(_engines.values()):
        active, peak, cache = active + a, peak + p, cache + c
    return active, peak, cache


def mlx_active() -> int:
    """MLX's active bytes here and in engine processes; one MLX call (the memory guard asks
    per request, and needs neither peak nor cache)."""
    try:
        import mlx.core as mx

        active = int(mx.get_active_memory())
    except Exception:  # no MLX backend here
        active = 0
    return active + sum(a for a, _, _ in list(_engines.values()))


def free_bytes() -> int:
    """On CUDA, the device's memory less what MLX holds on it (in this process and in engine
    processes); elsewhere, the system memory available (Metal shares it with the system)."""
    total = _cuda_total()
    if total:
        return total - mlx_active()
    return int(system_memory().available)


def total_bytes() -> int:
    """The most memory MLX could use on this machine: the device's on CUDA, the system's
    elsewhere (Metal shares it with the system; the CPU backend uses it)."""
    return _cuda_total() or int(system_memory().total)


def prompt_cache_budget(configured: Optional[int]) -> int:
    """Each model's prompt-cache budget: the configured bytes, else a quarter of the memory MLX
    may use here (agents' conversations are tens of thousands of tokens each; the memory
    governor evicts the cache before it refuses a request)."""
    return int(configured) if configured is not None else total_bytes() // 4


@dataclass(frozen=True)
class MemoryStats:
    """Memory at one moment: the process's RSS, MLX's active / peak / cache bytes (None where
    there is no MLX) and the system's use in percent."""

    rss: int
    mlx_active: Optional[int]
    mlx_peak: Optional[int]
    mlx_cache: Optional[int]
    system_percent: float


def snapshot() -> MemoryStats:
    mlx = mlx_memory()
    active, peak, cache = mlx if mlx is not None else (None, None, None)
    return MemoryStats(
        psutil.Process().memory_info().rss,
        active,
        peak,
        cache,
        float(psutil.virtual_memory().percent),
    )
