"""What a prefill chunk adds to a decode step, by its size, the prompt's cached length and the
number of decoding rows, model calls alone (no engine, no HTTP).

    python3 -m benchmarks.accelerator.chunk_step [MODEL_DIR]

The 1B shape by default (the demo model's folder with SHAPE=demo), its projections fused and
CUDA's attention routed as the appliance loads a model (fusion.py, cuda.py). B decoding rows (a
lone row in a plain KVCache, as a lone stream decodes; several in a BatchKVCache with padded rows)
at DECODE (4,000) tokens of context, beside one prompt in a BatchKVCache at each of PREFIXES
(4000,18000) cached tokens. For each chunk size it times STEPS (12) steps, every one evaluated
before the next, caches growing as in the engine (so every step has new key lengths), the median
and longest of the last ten: the decode step alone, the chunk alone, both in one forward pass
(mixed.py) and both as two passes. SPLITS=1 keeps the decode kernel's keys whole (no split-K)
and CHUNK_QUERIES=0 sends every chunk through MLX's attention, as before either was
there (cuda.py).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any, Callable

from appliance.engine.mlx_ext import cuda

cuda.mlx_env_defaults()

import mlx.core as mx  # noqa: E402
from mlx_lm import load  # noqa: E402
from mlx_lm.models.cache import BatchKVCache, KVCache  # noqa: E402

from appliance.engine.mlx_ext import mixed  # noqa: E402
from appliance.engine.mlx_ext.fusion import fuse_projections  # noqa: E402

STEPS = int(os.environ.get("STEPS", 12))
DECODE = int(os.environ.get("DECODE", 4000))
PREFIXES = [int(x) for x in os.environ.get("PREFIXES", "4000,18000").split(",")]
CHUNKS = [int(x) for x in os.environ.get("CHUNKS", "1,2,8,64").split(",")]
ROWS = [int(x) for x in os.environ.get("ROWS", "1,3").split(",")]
cuda._DECODE_SPLITS = int(os.environ.get("SPLITS", 0)) or None
cuda._DECODE_CHUNK_QUERIES = int(os.environ.get("CHUNK_QUERIES", cuda._DECODE_CHUNK_QUERIES))


def tokens(rows: int, start: int, n: int, vocab: int) -> Any:
    return mx.array(
        [[(i * 7919 + r * 31) % vocab + 10 for i in range(start, start + n)] for r in range(rows)]
    )


def filled(model: Any, rows: int, length: int, vocab: int, batch: bool) -> list[Any]:
    """A cache per layer holding `length` tokens a row (rows > 1: padded by 0, 100, 200, ...)."""
    if batch:
        cache: list[Any] = [BatchKVCache([100 * r for r in range(rows)]) for _ in model.layers]
    else:
        cache = [KVCache() for _ in model.layers]
    done = 0
    while done < length:
        n = min(2048, length - done)
        model(tokens(rows, done, n, vocab), cache=cache)
        mx.eval([c.state for c in cache])
        done += n
    return cache


def timed(step: Callable[..., list[Any]], *args: Any) -> tuple[float, float]:
    took = []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        mx.eval(step(*args))
        took.append(1000 * (time.perf_counter() - t0))
    tail = took[2:]
    return statistics.median(tail), max(tail)


def decode(model: Any, inputs: Any, dec: list[Any]) -> list[Any]:
    return [model(inputs, cache=dec)] + [c.state for c in dec]


def alone(model: Any, chunk: Any, pc: list[Any]) -> list[Any]:
    model(chunk, cache=pc)
    return [c.state for c in pc]


def one(model: Any, inputs: Any, dec: list[Any], chunk: Any, pc: list[Any]) -> list[Any]:
    out = mixed.forward(model, inputs, dec, chunk, pc)
    return [out] + [c.state for c in dec + pc]


def two(model: Any, inputs: Any, dec: list[Any], chunk: Any, pc: list[Any]) -> list[Any]:
    out = model(inputs, cache=dec)
    model(chunk, cache=pc)
    return [out] + [c.state for c in dec + pc]


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else None
    if path is None:
        from appliance.engine.demo import ensure_demo_model

        path = str(ensure_demo_model(shape=os.environ.get("SHAPE", "llama-1b"), progress=print))
    model = load(path)[0]
    fuse_projections(model)
    cuda.install(2**31, decode_kernel=True)
    vocab = min(int(model.args.vocab_size), 30000) - 20
    print(f"{path}: decode rows at {DECODE} tokens; prompt prefixes {PREFIXES}", flush=True)
    dec: list[Any] = []
    pc: list[Any] = []
    for rows in ROWS:
        # the last rows' caches freed first: three rows at 16k ran out of an H100's memory after
        # the one-row pass (with MLX's buffer cache full of its arrays, a likely cause)
        del dec[:], pc[:]
        mx.clear_cache()
        dec = filled(model, rows, DECODE, vocab, batch=rows > 1)
        inputs = tokens(rows, 0, 1, vocab)
        med, worst = timed(decode, model, inputs, dec)
        print(f"rows {rows}: decode step alone {med:6.2f} ms (longest {worst:6.2f})", flush=True)
        for prefix in PREFIXES:
            pc = filled(model, 1, prefix, vocab, batch=True)
            for size in CHUNKS:
                chunk = tokens(1, 0, size, vocab)
                cells = []
                for name, args in (
                    ("chunk", (alone, model, chunk, pc)),
                    ("one pass", (one, model, inputs, dec, chunk, pc)),
                    ("two", (two, model, inputs, dec, chunk, pc)),
                ):
                    m, w = timed(*args)
                    cells.append(f"{name} {m:6.2f} ({w:6.2f})")
                print(
                    f"rows {rows} prefix {prefix:>6} chunk {size:>4}: " + "  ".join(cells),
                    flush=True,
                )


if __name__ == "__main__":
    main()
