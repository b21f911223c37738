"""Decode step time by batch size, mlx-lm's BatchGenerator and the appliance's, in one process.

    python3 scripts/accelerator/step_by_batch.py MODEL_DIR [STEPS]

Same-length prompts (no padding), warmed, then STEPS timed next() calls per batch size; prints
the median step in ms and tokens/s for each class and size, in interleaved order.
"""

import statistics
import sys
import time

import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import BatchGenerator

from appliance.engine import batching

model, _ = load(sys.argv[1])
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 100


def step_ms(cls, b: int) -> float:
    g = cls(model, stop_tokens=[[10**9]], completion_batch_size=64, prefill_batch_size=64,
            stream=mx.default_stream(mx.default_device()))
    g.insert([[1, 2, 3, 4, 5, 6, 7, 8]] * b, max_tokens=[steps + 100] * b)
    for _ in range(20):
        g.next()
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        g.next()
        out.append(1000 * (time.perf_counter() - t))
    g.close()
    return statistics.median(out)


for b in (1, 2, 4, 8, 16, 32, 64):
    step_ms(BatchGenerator, b)  # shapes compiled
for b in (1, 2, 4, 8, 16, 32, 64):
    s, a = step_ms(BatchGenerator, b), step_ms(batching.BatchGenerator, b)
    print(f"batch {b:>2}: mlx-lm {s:6.2f} ms ({b * 1000 / s:7.0f} tok/s), appliance {a:6.2f} ms "
          f"({b * 1000 / a:7.0f} tok/s)", flush=True)
