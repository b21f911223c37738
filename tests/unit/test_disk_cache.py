"""The prompt cache's disk tier on real files and real MLX arrays (no model)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache

from appliance.engine import disk_cache
from appliance.engine.disk_cache import (
    MARGIN_TOKENS,
    SUFFIX,
    TMP_PREFIX,
    DiskCache,
    DiskTier,
    folder_for,
)

pytestmark = pytest.mark.timeout(60)


def _cache(n: int, seed: int = 0, layers: int = 2) -> list[Any]:
    """Caches of `n` positions, as a finished sequence leaves them (a buffer longer than n)."""
    mx.random.seed(seed)
    out = []
    for _ in range(layers):
        c = KVCache()
        c.update_and_fetch(mx.random.normal((1, 2, n, 32)), mx.random.normal((1, 2, n, 32)))
        out.append(c)
    return out


def _open(folder: Path, budget: int = 1 << 30, model: str = "m1") -> DiskCache:
    return DiskCache(folder, budget, model, "kv_bits=None")


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_file_is_read_on_the_gpus_stream_alone_on_cuda_else_by_the_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from appliance.engine.mlx_ext import cuda

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(cuda, "on_cuda", lambda: False)
    assert disk_cache.read_streams() == 4
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert disk_cache.read_streams() == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(cuda, "on_cuda", lambda: True)  # tensors straight into device memory
    assert disk_cache.read_streams() == 1
    monkeypatch.setattr(disk_cache, "READ_STREAMS", 3)  # a set value wins
    assert disk_cache.read_streams() == 3


@pytest.mark.parametrize("streams", [1, 3])
@pytest.mark.parametrize("bits", [None, 8])
def test_a_written_cache_is_found_after_a_restart_and_loads_equal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, streams: int, bits: Any
) -> None:
    monkeypatch.setattr(disk_cache, "READ_STREAMS", streams)  # tensors read on 1 or 3 streams
    tokens = list(range(100, 180))
    cache = _cache(len(tokens), layers=5)
    if bits:
        cache = [c.to_quantized(group_size=32, bits=bits) for c in cache]
    disk = _open(tmp_path)
    assert disk.write(tokens, cache)
    assert not disk.write(tokens, cache)  # already there
    assert [f.endswith(SUFFIX) for f in _files(tmp_path)] == [True]

    again = _open(tmp_path)  # a new index, from the headers alone
    assert len(again) == 1 and again.nbytes == disk.nbytes
    entry, common = again.best(tokens[:50] + [7, 7, 7])
    assert entry is not None and common == 50
    loaded = again.load(entry)
    assert loaded is not None and [c.offset for c in loaded] == [80] * 5
    for a, b in zip(loaded, cache, strict=True):
        assert type(a) is type(b) and getattr(a, "bits", None) == bits
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            for u, v in zip(*(t if bits else (t,) for t in (x, y)), strict=True):
                assert mx.array_equal(u, v[..., :80, :]).item()
    assert again.best([1, 2, 3]) == (None, 0)


def test_torn_foreign_and_unfinished_files_are_removed_at_start(tmp_path: Path) -> None:
    disk = _open(tmp_path)
    disk.write(list(range(10, 60)), _cache(50))
    disk.write(list(range(200, 260)), _cache(60, seed=1))
    torn, kept = sorted(tmp_path.iterdir(), key=lambda p: p.stat().st_size)
    torn.write_bytes(torn.read_bytes()[:-100])
    (tmp_path / f"{TMP_PREFIX}abc{SUFFIX}").write_bytes(b"half a write")
    (tmp_path / f"{'0' * 40}{SUFFIX}").write_bytes(b"\xff" * 64)  # not even a header
    other = _open(tmp_path / "other", model="m2")
    other.write(list(range(10, 60)), _cache(50))
    foreign = next((tmp_path / "other").iterdir())
    os.replace(foreign, tmp_path / foreign.name)

    again = _open(tmp_path)
    assert _files(tmp_path) == sorted(["other", kept.name])
    assert len(again) == 1 and again.removed == 4


def test_files_of_an_earlier_format_are_removed_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.engine import disk_cache

    with monkeypatch.context() as m:
        m.setattr(disk_cache, "FORMAT", "1")
        old = _open(tmp_path)
        assert old.write(list(range(10, 60)), _cache(50))
        assert len(_open(tmp_path)) == 1  # that format reads its own files
    again = _open(tmp_path)
    assert len(again) == 0 and again.removed == 1 and _files(tmp_path) == []


def test_a_corrupted_file_is_removed_on_read_and_never_loaded(tmp_path: Path) -> None:
    disk = _open(tmp_path)
    tokens = list(range(10, 90))
    disk.write(tokens, _cache(80))
    (path,) = tmp_path.iterdir()
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF  # one flipped byte in the last tensor: the header still parses
    path.write_bytes(bytes(data))
    again = _open(tmp_path)
    entry, _ = again.best(tokens)
    assert entry is not None
    assert again.load(entry) is None
    assert not path.exists() and len(again) == 0 and again.nbytes == 0


def test_the_budget_evicts_least_recently_used_and_prefixes_go(tmp_path: Path) -> None:
    one = _open(tmp_path)
    one.write(list(range(1000, 1064)), _cache(64))
    size = one.nbytes
    disk = _open(tmp_path, budget=int(size * 2.5))
    a, b, c = (list(range(s, s + 64)) for s in (1, 2000, 3000))
    disk.write(a, _cache(64))
    disk.write(b, _cache(64))
    entry, _ = disk.best(a)
    assert entry is not None and disk.load(entry) is not None  # a is now the most recent
    disk.write(c, _cache(64))
    assert disk.nbytes <= disk.budget
    assert disk.has(a) and disk.has(c) and not disk.has(b)
    # A longer sequence makes its strict prefix useless: only the longer one stays.
    disk.write(a + [5, 6, 7], _cache(67))
    assert disk.has(a + [5, 6, 7]) and not disk.has(a)
    assert len(_files(tmp_path)) == len(disk)
    # Something larger than the whole budget is never written.
    assert not disk.write(list(range(9000, 9400)), _cache(400))


def test_the_tier_loads_only_past_the_margin_and_spills_when_idle(tmp_path: Path) -> None:
    tier = DiskTier(_open(tmp_path), pending_bytes=1 << 30)
    tokens = list(range(10, 10 + 2 * MARGIN_TOKENS + 10))
    tier.spill(tokens, _cache(len(tokens)), 0)
    assert tier.disk.nbytes == 0  # nothing written until asked
    assert tier.write_some(lambda: [], None, deadline=float("inf"))
    assert tier.disk.has(tokens)
    # Memory already covers all but a few of the tokens the file holds: not worth a read.
    assert tier.lookup(tokens + [1], have=len(tokens) - 5) is None
    found = tier.lookup(tokens + [1], have=len(tokens) - MARGIN_TOKENS - 5)
    assert found is not None and found[0] == tokens


def test_model_folders_are_kept_apart(tmp_path: Path) -> None:
    assert folder_for(str(tmp_path), "demo") == tmp_path / "demo"
    a, b = folder_for(str(tmp_path), "x/y"), folder_for(str(tmp_path), "x_y")
    assert a != b and a.parent == tmp_path


def test_a_preload_reads_the_most_recent_files_that_fit_and_keeps_their_order(
    tmp_path: Path,
) -> None:
    disk = _open(tmp_path)
    a, b, c = (list(range(s, s + 64)) for s in (1, 2000, 3000))
    paths = []
    for tokens in (a, b, c):
        disk.write(tokens, _cache(64, seed=tokens[0]))
        paths.append(disk.folder / (disk.key(disk_cache._token_bytes(tokens)) + SUFFIX))
    one = sum(int(x.nbytes) for x in disk_cache.compact(_cache(64)) or [])  # as files hold it
    # b's file is broken: the preload removes it and goes on to a.
    path_b = paths[1]
    data = bytearray(path_b.read_bytes())
    data[-40] ^= 0xFF
    path_b.write_bytes(bytes(data))
    for i, path in enumerate(paths):  # c is the most recent
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    tier = DiskTier(_open(tmp_path), pending_bytes=0)
    order = [e.tokens.tolist() for e in tier.disk.recent()]
    assert order == [c, b, a]

    got = tier.preload(room=2 * one, deadline=float("inf"))
    assert [tokens for tokens, _ in got] == [c, a]
    want = _cache(64, seed=c[0])
    assert mx.array_equal(got[0][1][0].keys[..., :64, :], want[0].keys[..., :64, :])
    assert not path_b.exists() and not tier.disk.has(b)
    assert [e.tokens.tolist() for e in tier.disk.recent()] == [c, a]  # recency untouched
    # Room for one: the newest alone; no time left: nothing is read.
    assert [t for t, _ in tier.preload(room=one, deadline=float("inf"))] == [c]
    assert tier.preload(room=2 * one, deadline=0.0) == []
