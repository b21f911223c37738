"""Decode step time by batch size, mlx-lm's BatchGenerator and the appliance's, in one process.

    python3 -m benchmarks.accelerator.step_by_batch MODEL_DIR [STEPS]

Same-length prompts (no padding), warmed, then STEPS timed next() calls per batch size; prints
the median step in ms and tokens/s for each class and size, in interleaved order.
"""

import sys

from mlx_lm import load
from mlx_lm.generate import BatchGenerator

from appliance.engine.mlx_ext import batching
from benchmarks.accelerator.steps import median_step_ms

model, _ = load(sys.argv[1])
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 100


def step_ms(cls, b: int) -> float:
    return median_step_ms(model, cls, b, steps)


for b in (1, 2, 4, 8, 16, 32, 64):
    step_ms(BatchGenerator, b)  # shapes compiled
for b in (1, 2, 4, 8, 16, 32, 64):
    s, a = step_ms(BatchGenerator, b), step_ms(batching.BatchGenerator, b)
    print(
        f"batch {b:>2}: mlx-lm {s:6.2f} ms ({b * 1000 / s:7.0f} tok/s), appliance {a:6.2f} ms "
        f"({b * 1000 / a:7.0f} tok/s)",
        flush=True,
    )
