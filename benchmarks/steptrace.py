"""`python -m benchmarks.steptrace`: the engine alone, in-process, under closed-loop clients,
with a trace of what BatchGenerator does per step. No HTTP: it tells the engine's share of a
server-side gap from the HTTP front's.

    python -m benchmarks.steptrace --model-path DIR --clients 32 --requests 3 --max-tokens 128 \
        [--return-delay-ms D] [KEY=VALUE ...]   # overrides, e.g. models.prompt_cache_min_tokens=0

`--return-delay-ms D` makes each client wait a random 0..D ms before each next request, as
clients over HTTP come back spread out (the front parses, templates and admits one at a time).

Prints one line per round (`--rounds`): tokens/s, decode steps and their time, mean batch size,
prefill calls (and the tokens they took), new-batch calls (with fast_joins: joins into the running
batch), the time in decode, prefill and new batches, TTFT and end-to-end p50/p99, TTFT split into
the wait before joining the batch (the join window) and the rest (prefill and the steps to the
first token), and the joins. It wraps mlx-lm's BatchGenerator internals to count them, so it
measures mlx-lm 0.32's structure; a diagnostic, not a benchmark (see `benchmarks.bench`).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


class Trace:
    def __init__(self) -> None:
        self.on = False
        self.reset()

    def reset(self) -> None:
        self.steps: list[float] = []
        self.batch: list[int] = []
        self.count: dict[str, int] = {}
        self.secs: dict[str, float] = {}
        self.inside: set[str] = set()  # labels being timed (a subclass calling its base's)

    def wrap(self, cls: Any, name: str, label: str, *, step: bool = False) -> None:
        orig: Callable[..., Any] = getattr(cls, name)
        trace = self

        def wrapped(obj: Any, *args: Any, **kwargs: Any) -> Any:
            if label in trace.inside:
                return orig(obj, *args, **kwargs)
            trace.inside.add(label)
            t = time.perf_counter()
            try:
                out = orig(obj, *args, **kwargs)
            finally:
                trace.inside.discard(label)
            if trace.on:
                dt = time.perf_counter() - t
                if step:
                    trace.steps.append(dt)
                    trace.batch.append(len(obj._generation_batch))
                elif label != "prefill" or (args and args[0]):
                    trace.count[label] = trace.count.get(label, 0) + 1
                    trace.secs[label] = trace.secs.get(label, 0.0) + dt
                    if label == "prefill":
                        trace.count["prefill_tokens"] = trace.count.get("prefill_tokens", 0) + sum(
                            len(p) for p in args[0]
                        )
            return out

        setattr(cls, name, wrapped)


def _q(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))] if s else float("nan")


async def _run(args: argparse.Namespace, trace: Trace) -> str:
    from appliance.config import compose, load
    from appliance.engine.service import Engine
    from appliance.engine.types import SamplingParams
    from appliance.engine.worker import ModelWorker

    c = args.clients
    overrides = [
        "logging.file=none",
        f"limits.max_running={max(c, 8)}",
        f"limits.max_queued={4 * c}",
        f"+models.catalog.demo.completion_batch_size={max(32, c)}",
        f"models.catalog.demo.max_tokens={max(512, args.max_tokens)}",
    ]
    if args.model_path:
        overrides.append(f"models.catalog.demo.path={args.model_path}")
    cfg = load(compose([*overrides, *args.overrides]))
    engine = Engine(cfg.models, cfg.limits)
    worker = await engine.model("demo")
    if not isinstance(worker, ModelWorker):
        raise SystemExit(
            "steptrace traces the generation thread in this process: engine_process=false"
        )
    tok = worker.tokenizer
    total = 0
    ttft: list[float] = []
    e2e: list[float] = []
    joined_wait: list[float] = []
    inserted: dict[int, float] = {}  # id(prompt tokens) -> when the worker put it in the batch
    insert = worker._insert

    def timed_insert(gen: Any, prompt: list[int], params: Any) -> Any:
        inserted[id(prompt)] = time.perf_counter()
        return insert(gen, prompt, params)

    worker._insert = timed_insert  # type: ignore[method-assign]
    rng = random.Random(0)

    async def client(i: int, n: int, record: bool, round_: int = 0) -> None:
        nonlocal total
        for j in range(n):
            if j and args.return_delay_ms > 0:
                await asyncio.sleep(rng.uniform(0, args.return_delay_ms) / 1000)
            text = f"Request {round_}-{i * 1000 + j}. Tell me about the sea and the boats"
            prompt = list(tok.encode(text))
            t0 = time.perf_counter()
            gen = await engine.start(worker, prompt, SamplingParams(max_tokens=args.max_tokens))
            deadline, first = engine.deadline(), None
            while True:
                new, _ = await gen.next_tokens(deadline)
                if not new:
                    break
                first = first if first is not None else time.perf_counter() - t0
                total += len(new)
            engine.finish(gen)
            if record:
                ttft.append(first or 0.0)
                e2e.append(time.perf_counter() - t0)
                joined_wait.append(inserted.pop(id(prompt), t0) - t0)

    await asyncio.gather(*(client(i, 1, False) for i in range(c)))  # warm-up
    lines = []
    for r in range(1, args.rounds + 1):
        total = 0
        ttft.clear()
        e2e.clear()
        joined_wait.clear()
        trace.reset()
        joins0 = worker.stats["joins"]
        trace.on = True
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, args.requests, True, r) for i in range(c)))
        wall = time.perf_counter() - t0
        trace.on = False
        lines.append(
            _line(
                args,
                trace,
                total / wall,
                wall,
                ttft,
                joined_wait,
                e2e,
                worker.stats["joins"] - joins0,
            )
        )
    await engine.close()
    return "\n".join(lines)


def _line(
    args: argparse.Namespace,
    trace: Trace,
    rate: float,
    wall: float,
    ttft: list[float],
    joined_wait: list[float],
    e2e: list[float],
    joins: int,
) -> str:
    after_join = [a - b for a, b in zip(ttft, joined_wait, strict=True)]
    n, s, k = trace.steps, trace.secs, trace.count
    ms = 1000
    return (
        f"clients={args.clients} delay<={args.return_delay_ms:g}ms {' '.join(args.overrides)}: "
        f"{rate:.0f} tok/s; steps {len(n)}, "
        f"next() p50 {_q(n, 0.5) * ms:.2f} ms p99 {_q(n, 0.99) * ms:.2f} ms, {sum(n):.2f} s of "
        f"{wall:.2f} s; mean batch {statistics.mean(trace.batch or [0]):.1f}; "
        f"prefill calls {k.get('prefill', 0)} ({k.get('prefill_tokens', 0)} tokens) "
        f"{s.get('prefill', 0):.2f} s; new batches {k.get('newbatch', 0)} "
        f"{s.get('newbatch', 0):.2f} s; "
        f"decode {s.get('decode', 0):.2f} s; TTFT p50 {_q(ttft, 0.5) * ms:.0f} ms p99 "
        f"{_q(ttft, 0.99) * ms:.0f} ms (waiting to join p50 "
        f"{_q(joined_wait, 0.5) * ms:.0f} ms, then "
        f"p50 {_q(after_join, 0.5) * ms:.0f} ms); joins {joins}; e2e p50 {_q(e2e, 0.5) * ms:.0f} ms"
    )


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.steptrace", description=(__doc__ or "").split("\n")[0]
    )
    ap.add_argument("--model-path", help="a model folder (default: the demo model)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument(
        "--requests", type=int, default=3, help="requests per client, after a warm-up one"
    )
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1, help="measured rounds, one line each")
    ap.add_argument(
        "--return-delay-ms",
        type=float,
        default=0.0,
        help="each client waits a random 0..D ms before each next request",
    )
    ap.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE")
    args = ap.parse_args(argv)
    g = importlib.import_module("mlx_lm.generate")  # the module, not mlx_lm.generate()
    trace = Trace()
    trace.wrap(g.BatchGenerator, "_next", "step", step=True)
    trace.wrap(g.PromptProcessingBatch, "prompt", "prefill")
    trace.wrap(g.PromptProcessingBatch, "generate", "newbatch")
    trace.wrap(g.GenerationBatch, "next", "decode")
    from appliance.engine.mlx_ext import batching  # models.catalog.NAME.fast_joins: its subclasses

    trace.wrap(batching.BatchGenerator, "_next", "step", step=True)
    trace.wrap(batching.GenerationBatch, "next", "decode")
    trace.wrap(batching.GenerationBatch, "join", "newbatch")
    trace.wrap(batching, "_prefill_chunk", "prefill")  # its prefill, a function of the module
    print(asyncio.run(_run(args, trace)), flush=True)
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)  # MLX's CUDA backend can abort in native destructors at interpreter exit
