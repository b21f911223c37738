"""Where the first turn after a restart spends its time: the disk tier against a cold prefill.

    python3 -m benchmarks.accelerator.restart_timeline write DIR
    python3 -m benchmarks.accelerator.restart_timeline read DIR
    python3 -m benchmarks.accelerator.restart_timeline cold DIR

The engine in this process (no HTTP), the 1B shape by default (SHAPE=demo for the demo model,
with V=200 for its vocabulary). `write` answers a turn of N (8,437) tokens with
`models.prompt_cache_dir` under DIR and stops, which writes the cache to disk; `read`, a new
process on the same folder, answers turn 2 (turn 1, its answer and 32 new tokens) as its first
request, then a variant of it from memory; `cold` answers the same turn 2 without the disk tier.
Each request prints its TTFT and a timeline from its start: every engine call (next), the disk
read (disk.load) with its digest, and the prompt cache's look-up. `read` works on a fresh copy of
what `write` left (the disk tier writes again when it stops), so it can be repeated; READ picks
how the file is read: `streams` (the disk tier's own way), `one` (one stream, the default
device's), `touch` (the disk tier's way, and in the same evaluation a sum of every tensor on the
default device, so that on CUDA each tensor moves to the GPU as soon as it is read rather than
in the first engine call).
PRELOAD=0 makes `read` find the file when the request needs it (models.prompt_cache_preload_s);
by default the file is read back into memory at load, before the request, and the model's load
time printed includes it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx

from appliance.config import compose, load
from appliance.engine import disk_cache, worker
from appliance.engine.mlx_ext import batching, prompt_cache
from appliance.engine.service import Engine
from benchmarks.accelerator.steps import Timeline, run_request

VOCAB = int(os.environ.get("V", 30000))
TIMELINE = Timeline()
TIMELINE.wrap(batching.BatchGenerator, "next", "next")
TIMELINE.wrap(worker.ModelWorker, "_insert", "worker insert")
TIMELINE.wrap(disk_cache.DiskCache, "load", "disk.load")
TIMELINE.wrap(disk_cache, "_file_digest", "  file digest")
TIMELINE.wrap(prompt_cache.PromptCache, "fetch_nearest_cache", "cache look-up")
READ = os.environ.get("READ", "streams")
_read_caches = disk_cache.read_caches


def read_and_touch(path: Path) -> list[Any]:
    """disk_cache.read_caches, its one evaluation also summing every tensor it reads."""
    evaluate = mx.eval

    def with_sums(arrays: list[Any]) -> None:
        evaluate(arrays + [mx.sum(a) for a in arrays])

    mx.eval = with_sums
    try:
        return _read_caches(path)
    finally:
        mx.eval = evaluate


async def turn(engine: Engine, model: Any, prompt: list[int], label: str) -> list[int]:
    TIMELINE.restart()
    stamps: list[float] = []
    tokens = await run_request(
        engine, model, prompt, 8, lambda new: stamps.append(time.perf_counter())
    )
    first = stamps[0] if stamps else None
    ttft = 1000 * ((first or time.perf_counter()) - TIMELINE.start)
    print(f"== {label}: {len(prompt)} tokens, TTFT {ttft:.1f} ms", flush=True)
    for at, took, name, _ in TIMELINE.events[:14]:
        print(f"   {at:8.1f} ms  {name:<16} {took:8.1f} ms", flush=True)
    return tokens


async def main(mode: str, folder: Path) -> None:
    sets = [
        "logging.file=none",
        f"++models.catalog.demo.demo_shape={os.environ.get('SHAPE', 'llama-1b')}",
        "++models.catalog.demo.context_length=32768",
    ]
    if mode == "write":
        sets.append(f"models.prompt_cache_dir={folder / 'cache'}")
    elif mode == "read":
        shutil.rmtree(folder / "read", ignore_errors=True)
        shutil.copytree(folder / "cache", folder / "read")
        sets.append(f"models.prompt_cache_dir={folder / 'read'}")
        if READ == "one":
            disk_cache.READ_STREAMS = 1
        elif READ == "touch":
            disk_cache.read_caches = read_and_touch
        elif READ != "streams":
            sys.exit(f"READ={READ!r}: streams, one or touch")
        preload = os.environ.get("PRELOAD")  # seconds: the profile's default when unset
        if preload is not None:
            sets.append(f"models.prompt_cache_preload_s={preload}")
        print(
            f"read: {READ} ({disk_cache.read_streams()} streams), preload {preload or 'default'}",
            flush=True,
        )
    cfg = load(compose(sets))
    engine = Engine(cfg.models, cfg.limits)
    t0 = time.perf_counter()
    model = await engine.model("demo")
    print(f"{mode}: model loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    if mode == "write":
        first = [(i * 7919) % VOCAB + 100 for i in range(int(os.environ.get("N", 8437)))]
        answer = await turn(engine, model, first, "write, turn 1")
        second = first + answer + [(i * 104729) % VOCAB + 100 for i in range(32)]
        (folder / "turn2.json").write_text(json.dumps(second))
    else:
        second = json.loads((folder / "turn2.json").read_text())
        await turn(engine, model, second, f"{mode}, turn 2 (the first request)")
        variant = second[:-16] + [(i * 31) % VOCAB + 200 for i in range(16)]
        await turn(engine, model, variant, f"{mode}, turn 2 again (from memory)")
    await engine.close()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "read", "cold"):
        sys.exit(__doc__)
    asyncio.run(main(sys.argv[1], Path(sys.argv[2])))
