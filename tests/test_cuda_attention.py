"""CUDA workarounds (appliance/engine/cuda.py): the unfused prefill attention used instead of
cuDNN's per-shape graphs (the same numbers as MLX's fused attention, checked here on the CPU
backend, and routing by size), and MLX's cache-thrashing check turned off in the server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import pytest

from appliance.engine import cuda, memory


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    original = mx.fast.scaled_dot_product_attention
    yield
    mx.fast.scaled_dot_product_attention = original
    cuda._state.update(original=None, max_elements=0)
    memory.on_cuda.cache_clear()


def _qkv(b: int, hq: int, hk: int, lq: int, lk: int, dtype: Any = mx.float32) -> tuple[Any, ...]:
    mx.random.seed(7)
    return tuple(
        mx.random.normal(shape).astype(dtype)
        for shape in ((b, hq, lq, 64), (b, hk, lk, 64), (b, hk, lk, 64))
    )


@pytest.mark.parametrize("hq,hk", [(8, 8), (8, 2)])
@pytest.mark.parametrize("lq,lk", [(5, 5), (3, 11)])  # a prompt alone; a chunk after a cached prefix
def test_unfused_attention_matches_the_fused_kernel(hq: int, hk: int, lq: int, lk: int) -> None:
    q, k, v = _qkv(3, hq, hk, lq, lk)
    causal_array = mx.arange(lk - lq, lk)[:, None] >= mx.arange(lk)[None]
    padded = mx.broadcast_to(causal_array, (3, 1, lq, lk)) & (mx.arange(lk) >= 1)  # left padding
    additive = mx.where(padded, 0.0, -1e9).astype(mx.float32)
    for mask in ("causal", causal_array, padded, additive, None):
        want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
        got = cuda.unfused_attention(q, k, v, 0.125, mask)
        assert got.shape == want.shape
        assert mx.allclose(got, want, atol=1e-5, rtol=1e-4).item(), mask if isinstance(mask, str) else mask.shape


def test_only_cuda_is_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not cuda.install(1 << 27)  # this machine: the CPU backend
    assert cuda._state["original"] is None
    monkeypatch.setattr(memory, "on_cuda", lambda: True)
    assert not cuda.install(0)  # 0: off


def test_small_prefills_go_unfused_and_the_rest_to_mlx(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    fused = mx.fast.scaled_dot_product_attention

    def spy(q: Any, k: Any, v: Any, **kw: Any) -> Any:
        calls.append(tuple(q.shape))
        return fused(q, k, v, **kw)

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(memory, "on_cuda", lambda: True)
    assert cuda.install(2 * 8 * 16 * 16)
    assert cuda.install(2 * 8 * 16 * 16)  # twice: still one wrapper
    assert cuda._state["original"] is spy
    q, k, v = _qkv(2, 8, 2, 16, 16)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal")
    assert calls == []  # at the limit: unfused
    assert mx.allclose(out, fused(q, k, v, scale=0.125, mask="causal"), atol=1e-5).item()
    q, k, v = _qkv(2, 8, 2, 16, 17)  # one key more: past the limit
    mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal")
    q1, k1, v1 = _qkv(2, 8, 2, 1, 40)  # a decode step: MLX's vector kernel, never unfused
    mx.fast.scaled_dot_product_attention(q1, k1, v1, scale=0.125, mask=None)
    assert calls == [(2, 8, 16, 64), (2, 8, 1, 64)]


@pytest.mark.parametrize("name", ["MLX_ENABLE_CACHE_THRASHING_CHECK", "MLX_USE_CUDA_GRAPHS"])
@pytest.mark.parametrize("given,expected", [(None, "0"), ("1", "1")])
def test_the_server_sets_its_mlx_cuda_defaults_unless_told(
    name: str, given: Any, expected: str
) -> None:
    """Cache-thrashing errors and CUDA graphs off (see appliance/engine/cuda.py)."""
    env = {k: v for k, v in os.environ.items() if k != name}
    if given is not None:
        env[name] = given  # an operator's own value wins
    out = subprocess.run(
        [sys.executable, "-c", f"import os, appliance.__main__; print(os.environ[{name!r}])"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == expected
