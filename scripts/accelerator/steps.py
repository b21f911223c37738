"""Shared by the accelerator scripts: the median decode step of a BatchGenerator class."""

import statistics
import time
from typing import Any, Callable, Optional

import mlx.core as mx

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]


def median_step_ms(model: Any, cls: Any, batch: int, steps: int, warm: int = 20,
                   check: Optional[Callable[[Any], None]] = None) -> float:
    """`batch` same-length prompts in a fresh `cls`, `warm` untimed next() calls, `check(gen)`,
    then the median of `steps` timed ones, in ms."""
    g = cls(model, stop_tokens=[[10**9]], completion_batch_size=64, prefill_batch_size=64,
            stream=mx.default_stream(mx.default_device()))
    g.insert([PROMPT] * batch, max_tokens=[steps + 100] * batch)
    for _ in range(warm):
        g.next()
    if check is not None:
        check(g)
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        g.next()
        out.append(1000 * (time.perf_counter() - t))
    g.close()
    return statistics.median(out)
