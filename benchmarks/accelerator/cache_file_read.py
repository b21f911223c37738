"""Ways to read a prompt-cache file into MLX arrays, page cache warm, ms each.

    python3 -m benchmarks.accelerator.cache_file_read

Writes a file as the disk tier does (mlx-lm's save_prompt_cache; L layers of N tokens, 8 KV heads
of 64, bf16: 280 MB at the defaults L=16 N=8437, the 1B shape's 8k-token prefix), then reads it
three rounds: mx.load evaluated on its default stream ("plain"), the disk tier's own read
(disk_cache.read_caches) with its tensors spread over 4 or 8 CPU streams, numpy reads in 8 threads
(hashed as they come) copied into MLX arrays, and on CUDA mx.load on the GPU stream. Each is timed
for the load, a SHA-256 of every tensor (8 threads) and a first use on the default device (a sum of
every tensor).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache, save_prompt_cache

from appliance.engine import disk_cache

NP_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "I32": np.int32}
POOL = ThreadPoolExecutor(8)


def sync() -> None:
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        mx.synchronize()


def write(path: Path, layers: int, tokens: int) -> None:
    caches = []
    for _ in range(layers):
        c = KVCache()
        c.keys = mx.random.normal((1, 8, tokens, 64)).astype(mx.bfloat16)
        c.values = mx.random.normal((1, 8, tokens, 64)).astype(mx.bfloat16)
        c.offset = tokens
        caches.append(c)
    save_prompt_cache(str(path), caches, {"x": "y"})


def plain(path: Path) -> dict[str, Any]:
    arrays: dict[str, Any] = mx.load(str(path))  # type: ignore[assignment]
    mx.eval(list(arrays.values()))
    return arrays


def streams(k: int) -> Callable[[Path], dict[str, Any]]:
    """The disk tier's own read (disk_cache.read_caches) on `k` CPU streams."""

    def read(path: Path) -> dict[str, Any]:
        disk_cache.READ_STREAMS = k
        caches = disk_cache.read_caches(path)
        leaves: Any = tree_flatten([c.state for c in caches])
        return {n: a for n, a in leaves if isinstance(a, mx.array)}  # not the offsets

    return read


def gpu_stream(path: Path) -> dict[str, Any]:
    arrays: dict[str, Any] = mx.load(str(path), stream=mx.gpu)  # type: ignore[assignment]
    mx.eval(list(arrays.values()))
    return arrays


def numpy_threads(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    fd = os.open(path, os.O_RDONLY)
    start = 8 + n

    def read(item: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any], np.ndarray]:
        _, t = item
        lo, hi = t["data_offsets"]
        buf = np.empty(hi - lo, np.uint8)
        view, got = memoryview(buf), 0
        while got < len(buf):
            got += os.preadv(fd, [view[got:]], start + lo + got)
        hashlib.sha256(buf).digest()
        return item[0], t, buf

    try:
        done = list(POOL.map(read, [(k, v) for k, v in header.items() if k != "__metadata__"]))
    finally:
        os.close(fd)
    arrays = {}
    for name, t, buf in done:
        a = mx.array(buf.view(NP_DTYPES[t["dtype"]]).reshape(t["shape"]))
        arrays[name] = a.view(mx.bfloat16) if t["dtype"] == "BF16" else a
    mx.eval(list(arrays.values()))
    return arrays


def main() -> None:
    layers, tokens = int(os.environ.get("L", 16)), int(os.environ.get("N", 8437))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache.safetensors"
        write(path, layers, tokens)
        print(f"file {path.stat().st_size / 1e6:.0f} MB", flush=True)
        ways: list[tuple[str, Callable[[Path], dict[str, Any]]]] = [
            ("plain", plain),
            ("streams4", streams(4)),
            ("streams8", streams(8)),
            ("numpy8", numpy_threads),
        ]
        if hasattr(mx, "cuda") and mx.cuda.is_available():
            ways.append(("gpu", gpu_stream))
        for rnd in range(3):
            row = []
            for name, way in ways:
                sync()
                t0 = time.perf_counter()
                try:
                    arrays = way(path)
                except Exception as exc:  # a way this MLX does not offer
                    row.append(f"{name} failed: {str(exc)[:80]}")
                    continue
                t1 = time.perf_counter()
                if name != "numpy8":  # hashed as it read
                    list(
                        POOL.map(lambda a: hashlib.sha256(memoryview(a)).digest(), arrays.values())
                    )
                t2 = time.perf_counter()
                mx.eval([mx.sum(a.astype(mx.float32)) for a in arrays.values()])
                sync()
                t3 = time.perf_counter()
                row.append(
                    f"{name} load {1000 * (t1 - t0):.0f} hash {1000 * (t2 - t1):.0f} "
                    f"first use {1000 * (t3 - t2):.0f}"
                )
                del arrays
            print(f"round {rnd}: " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
