"""Turn 1 of the agent scenario, engine in-process, every engine call timed.

    python3 -m benchmarks.accelerator.turn_one [PROFILE_OVERRIDE ...]

One session's prompt (N1, 5,534 tokens) is prefilled alone and decodes 32 tokens; once its
first token is out, three prompts that share its first NP (4,157) tokens and bring NJ (1,370)
new ones each arrive together and prefill beside it, as sessions 2-4 do in turn 1 of
`python -m benchmarks --agent --agent-shape 1b`. Once for each factor in SCALES (default "1,1",
twice at the same lengths), in one process, the lengths scaled by it, with new tokens each
time. Prints each request's TTFT and end-to-end time, then every engine call (next()) around
the join with its time, the rows decoding and prefilling, the prompt tokens it prefilled and
the learnt budget's state, and the worker's inserts and prompt-cache look-ups. The 1B shape by
default (SHAPE=demo V=1000 for the demo model, with smaller N1, NP and NJ).
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from typing import Any, Optional

from appliance.config import compose, load
from appliance.engine import worker
from appliance.engine.mlx_ext import batching, prompt_cache
from appliance.engine.service import Engine
from benchmarks.accelerator.steps import Timeline, run_request


def state(gen: Any) -> str:
    b = gen.budget
    return (
        f"decoding {len(gen._generation_batch)}, prefilling {len(gen._prompt_batch)}, "
        f"prefilled {getattr(gen, '_prefilled', 0)}; budget: step {(b.step_s or 0) * 1000:.2f} "
        f"ms, a token {(b.token_s or 0) * 1000:.4f} ms, last {b.last}"
    )


SIZES = (("N1", 5534), ("NP", 4157), ("NJ", 1370))
TIMELINE = Timeline()
TIMELINE.wrap(batching.BatchGenerator, "next", "next", state)
TIMELINE.wrap(worker.ModelWorker, "_insert", "insert")
TIMELINE.wrap(prompt_cache.PromptCache, "fetch_nearest_cache", "cache look-up")


async def main(overrides: list[str]) -> None:
    cfg = load(
        compose(
            [
                "logging.file=none",
                f"++models.catalog.demo.demo_shape={os.environ.get('SHAPE', 'llama-1b')}",
                "++models.catalog.demo.context_length=32768",
                *overrides,
            ]
        )
    )
    engine = Engine(cfg.models, cfg.limits)
    model = await engine.model("demo")
    rng = random.Random(7)
    vocab = int(os.environ.get("V", 30000))

    def fresh(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    async def one(prompt: list[int], first_out: Optional[asyncio.Event]) -> tuple[float, float]:
        t0, stamps = time.perf_counter(), []

        def seen(new: list[int]) -> None:
            stamps.append(time.perf_counter() - t0)
            if first_out is not None:
                first_out.set()

        await run_request(engine, model, prompt, 32, seen)
        return (stamps[0] if stamps else 0.0), time.perf_counter() - t0

    scales = [float(x) for x in os.environ.get("SCALES", "1,1").split(",")]
    for rep, scale in enumerate(scales, 1):
        TIMELINE.restart()
        n1, n_shared, n_new = (int(scale * int(os.environ.get(k, d))) for k, d in SIZES)
        p1 = fresh(n1)
        out = asyncio.Event()
        s1 = asyncio.ensure_future(one(p1, out))
        await out.wait()
        joined = 1000 * (time.perf_counter() - TIMELINE.start)
        shared = p1[:n_shared]
        others = [asyncio.ensure_future(one(shared + fresh(n_new + i), None)) for i in range(3)]
        res = await asyncio.gather(s1, *others)
        print(
            f"=== run {rep} (x{scale}): session 1 TTFT {res[0][0] * 1000:.0f} ms, end "
            f"{res[0][1] * 1000:.0f} ms; sessions 2-4 sent at {joined:.0f} ms: "
            + ", ".join(f"TTFT {a * 1000:.0f} end {b * 1000:.0f}" for a, b in res[1:]),
            flush=True,
        )
        for at, took, name, info in TIMELINE.events:
            if took > 1 and (name != "next" or took > 12 or joined - 20 < at < joined + 400):
                print(f"  {at:8.1f} ms {took:7.1f} ms {name:14s} {info}", flush=True)
    await engine.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
