"""A lone stream's decode step with the appliance's solo path on and off, in one process.

    python3 -m benchmarks.accelerator.solo_ab MODEL_DIR [ROUNDS] [STEPS]

The appliance's BatchGenerator (appliance/engine/batching.py) with one request, solo on then
off, ROUNDS times (so a drift of the machine hits both alike): prints each round's median step
ms, then the median over rounds for each.
"""

import statistics
import sys

from mlx_lm import load

from appliance.engine.mlx_ext import batching
from benchmarks.accelerator.steps import median_step_ms

model, _ = load(sys.argv[1])
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 6
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 300


def run(solo: bool) -> float:
    batching.GenerationBatch.solo = solo

    def engaged(g):
        assert g._generation_batch._solo == solo

    return median_step_ms(model, batching.BatchGenerator, 1, steps, warm=30, check=engaged)


run(True), run(False)  # shapes compiled
res: dict[bool, list[float]] = {True: [], False: []}
for r in range(rounds):
    for solo in (True, False) if r % 2 == 0 else (False, True):
        res[solo].append(run(solo))
    print(f"round {r}: solo {res[True][-1]:.3f} ms, batched {res[False][-1]:.3f} ms", flush=True)
print(
    f"median step: solo {statistics.median(res[True]):.3f} ms, "
    f"batched {statistics.median(res[False]):.3f} ms",
    flush=True,
)
