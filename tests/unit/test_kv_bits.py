"""Quantized prompt-cache entries (kv_bits) on real MLX arrays, in memory and on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from appliance.engine.disk_cache import DiskCache
from appliance.engine.mlx_ext.prompt_cache import PromptCache, dequantize, group_size, quantize

pytestmark = pytest.mark.timeout(60)


def _cache(n: int, head_dim: int = 64) -> list[Any]:
    mx.random.seed(3)
    c = KVCache()
    c.update_and_fetch(mx.random.normal((1, 2, n, head_dim)), mx.random.normal((1, 2, n, head_dim)))
    return [c, c]


def test_group_sizes() -> None:
    assert (group_size(64), group_size(128), group_size(32), group_size(48)) == (64, 64, 32, None)


@pytest.mark.parametrize("bits", [8, 4])
def test_entries_are_kept_quantized_and_handed_out_plain(bits: int) -> None:
    tokens = list(range(1, 101))
    full = PromptCache(max_size=4)
    full.insert_cache("m", tokens, _cache(100))
    small = PromptCache(max_size=4, kv_bits=bits)
    small.insert_cache("m", tokens, _cache(100))
    # float32 values: (bits/8 + 8/64) bytes an element against 4
    assert small.nbytes <= full.nbytes * (bits / 32 + 1 / 32) + 1
    cache, rest = small.fetch_nearest_cache("m", tokens[:60] + [999])
    assert rest == [999] and all(type(c) is KVCache for c in cache)
    want = _cache(100)[0].keys[..., :60, :]
    assert cache[0].offset == 60 and cache[0].keys.shape == want.shape
    err = mx.abs(cache[0].keys - want).max().item()
    assert 0 < err < (0.05 if bits == 8 else 0.8)  # quantized, and close


def test_heads_no_group_divides_stay_as_they_are() -> None:
    (c, _) = quantize(_cache(10, head_dim=48), 8)
    assert type(c) is KVCache and dequantize([c])[0] is c


def test_quantized_entries_round_trip_through_disk_and_settings_keep_files_apart(
    tmp_path: Path,
) -> None:
    tokens = list(range(5, 85))
    q = quantize(_cache(80), 8)
    disk = DiskCache(tmp_path, 1 << 30, "m", "kv_bits=8")
    assert disk.write(tokens, q)
    again = DiskCache(tmp_path, 1 << 30, "m", "kv_bits=8")
    entry, _ = again.best(tokens)
    assert entry is not None
    loaded = again.load(entry)
    assert loaded is not None and type(loaded[0]) is QuantizedKVCache
    for a, b in zip(loaded[0].keys, q[0].keys, strict=True):
        assert mx.array_equal(a, b).item()
    # The same model with other KV settings: its files are not these; they are removed.
    other = DiskCache(tmp_path, 1 << 30, "m", "kv_bits=4")
    assert len(other) == 0 and other.removed == 1 and not any(tmp_path.iterdir())
