"""Which memory the checks count: the GPU's own on CUDA, the system's on Metal and CPU."""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx
import psutil
import pytest

from appliance.engine import memory


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    memory._cuda_total.cache_clear()  # the device is read once per process
    memory.on_cuda.cache_clear()
    yield
    memory._cuda_total.cache_clear()
    memory.on_cuda.cache_clear()


def test_cpu_counts_system_memory() -> None:
    assert mx.default_device() == mx.cpu  # this machine
    free = memory.free_bytes()
    assert abs(free - psutil.virtual_memory().available) < 512 * 2**20


def test_cuda_counts_the_devices_own_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    # What MLX's CUDA backend reports (mlx/backend/gpu/available.h: total_memory on CUDA).
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        mx, "device_info", lambda: {"device_name": "H200", "total_memory": 141 * 2**30}
    )
    monkeypatch.setattr(mx, "get_active_memory", lambda: 3 * 2**30)
    assert memory.free_bytes() == 138 * 2**30  # not the host's RAM
    # A model in an engine process of its own holds device memory this process's MLX can't see:
    # the engine reports it, and it counts until the engine is gone.
    memory.report_engine("big", 5 * 2**30, 6 * 2**30, 2**30)
    try:
        assert memory.free_bytes() == 133 * 2**30
        assert memory.mlx_memory() == (
            8 * 2**30,
            mx.get_peak_memory() + 6 * 2**30,
            mx.get_cache_memory() + 2**30,
        )
    finally:
        memory.forget_engine("big")
    assert memory.free_bytes() == 138 * 2**30


def test_metal_counts_system_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: False)  # a GPU that is not CUDA: Metal
    assert abs(memory.free_bytes() - psutil.virtual_memory().available) < 512 * 2**20


def test_system_memory_is_read_once_per_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = []
    clock = [1000.0]
    monkeypatch.setattr(memory, "_system", (0.0, None))
    monkeypatch.setattr(memory.psutil, "virtual_memory", lambda: reads.append(1) or len(reads))
    monkeypatch.setattr(memory.time, "monotonic", lambda: clock[0])
    # The shedding check and the memory guard of one request (and of its neighbours) share a read.
    assert memory.system_memory() == memory.system_memory() == 1
    clock[0] += memory.SYSTEM_TTL_S / 2
    assert memory.system_memory() == 1
    clock[0] += memory.SYSTEM_TTL_S
    assert memory.system_memory() == 2  # stale: read again
    assert len(reads) == 2
