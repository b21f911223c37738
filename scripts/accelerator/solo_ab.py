"""A lone stream's decode step with the appliance's solo path on and off, in one process.

    python3 scripts/accelerator/solo_ab.py MODEL_DIR [ROUNDS] [STEPS]

The appliance's BatchGenerator (appliance/engine/batching.py) with one request, solo on then
off, ROUNDS times (so a drift of the machine hits both alike): prints each round's median step
ms, then the median over rounds for each.
"""

import statistics
import sys
import time

import mlx.core as mx
from mlx_lm import load

from appliance.engine import batching

model, _ = load(sys.argv[1])
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 6
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 300


def run(solo: bool) -> float:
    batching.GenerationBatch.solo = solo
    g = batching.BatchGenerator(model, stop_tokens=[[10**9]], completion_batch_size=64,
                                prefill_batch_size=64, stream=mx.default_stream(mx.default_device()))
    g.insert([[1, 2, 3, 4, 5, 6, 7, 8]], max_tokens=[steps + 100])
    for _ in range(30):
        g.next()
    assert g._generation_batch._solo == solo
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        g.next()
        out.append(1000 * (time.perf_counter() - t))
    g.close()
    return statistics.median(out)


run(True), run(False)  # shapes compiled
res: dict[bool, list[float]] = {True: [], False: []}
for r in range(rounds):
    for solo in (True, False) if r % 2 == 0 else (False, True):
        res[solo].append(run(solo))
    print(f"round {r}: solo {res[True][-1]:.3f} ms, batched {res[False][-1]:.3f} ms", flush=True)
print(f"median step: solo {statistics.median(res[True]):.3f} ms, batched {statistics.median(res[False]):.3f} ms",
      flush=True)
