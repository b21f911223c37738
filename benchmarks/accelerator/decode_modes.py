"""One process's decode step time, to study the per-process "mode" (docs/performance.md).

    python3 -m benchmarks.accelerator.decode_modes MODEL_DIR [LABEL]

BatchGenerator alone: a batch of 1 then a batch of 64 (same-length prompts, no new shapes),
warmed, then 150 timed next() calls each. Prints one line: label, the CPUs the process may use and
the one it ran on, step ms at 1 and 64 (median and p90).
"""

import os
import statistics
import sys
import time

import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import BatchGenerator

model, tok = load(sys.argv[1])
label = sys.argv[2] if len(sys.argv) > 2 else "-"


def steps(b: int) -> list[float]:
    g = BatchGenerator(
        model,
        stop_tokens=[[10**9]],
        completion_batch_size=64,
        prefill_batch_size=64,
        stream=mx.default_stream(mx.default_device()),
    )
    g.insert([[1, 2, 3, 4, 5, 6, 7, 8]] * b, max_tokens=[400] * b)
    for _ in range(30):
        g.next()
    out = []
    for _ in range(150):
        t = time.perf_counter()
        g.next()
        out.append(1000 * (time.perf_counter() - t))
    g.close()
    return out


def q(v: list[float], p: float) -> float:
    return sorted(v)[int(p * (len(v) - 1))]


steps(1)  # first shapes compiled
one, many = steps(1), steps(64)
cpu = open(f"/proc/{os.getpid()}/stat").read().rsplit(")", 1)[1].split()[36]
print(
    f"{label} cpus {min(os.sched_getaffinity(0))}-{max(os.sched_getaffinity(0))} on {cpu}: "
    f"b1 {statistics.median(one):.2f} p90 {q(one, 0.9):.2f} ms; "
    f"b64 {statistics.median(many):.2f} p90 {q(many, 0.9):.2f} ms",
    flush=True,
)
os._exit(0)
