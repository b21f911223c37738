"""One stream's decode rate at each layer of the serving path, on one model.

    python3 -m benchmarks.accelerator.single_stream [--model-path DIR] [--tokens N] [--repeat R]

Prints, for a lone greedy stream of N tokens (1B shape by default):

- step: the median next() of the appliance's BatchGenerator on the model as the appliance loads
  it (projections fused), one row, in this process: the engine's own rate;
- engine: the same model behind the appliance's Engine in this process, tokens as a request's
  consumer sees them (the generation thread and the event loop sharing the GIL, no HTTP);
- http: a streamed chat completion from the appliance started as a server (`python -m
  appliance`), in-process engine, then with `engine_process=true`.

Rates are (tokens - 1) / (last token - first token), the median over R requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx


def _rate(stamps: list[float]) -> float:
    return (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)


def step_rate(path: str, tokens: int) -> float:
    from mlx_lm import load

    from appliance.engine.mlx_ext import batching, fusion
    from benchmarks.accelerator.steps import median_step_ms

    model, _ = load(path)
    fusion.fuse_projections(model)
    return 1000 / median_step_ms(model, batching.BatchGenerator, 1, tokens, warm=30)


async def engine_rate(path: str, tokens: int, repeat: int) -> float:
    from appliance.config import compose, load
    from appliance.engine.service import Engine
    from appliance.engine.types import SamplingParams

    cfg = load(compose(["logging.file=none", f"++models.catalog.demo.path={path}"]))
    engine = Engine(cfg.models, cfg.limits)
    worker = await engine.model("demo")
    rates = []
    for i in range(repeat + 1):
        prompt = [1, 2, 3, 4, 5, 6, 7, 8 + i]
        gen = await engine.start(worker, prompt, SamplingParams(max_tokens=tokens))
        stamps: list[float] = []
        deadline = engine.deadline()
        while True:
            new, _ = await gen.next_tokens(deadline)
            if not new:
                break
            stamps.extend([time.perf_counter()] * len(new))
        engine.finish(gen)
        if i:  # the first one warms
            rates.append(_rate(stamps))
    await engine.close()
    return statistics.median(rates)


def http_rate(path: str, tokens: int, repeat: int, extra: list[str]) -> float:
    from benchmarks.common import HOST, child_env, free_port
    from benchmarks.procs import Proc, wait_ready

    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "appliance",
        f"server.port={port}",
        "models.default=demo",
        "models.auto_load=[demo]",
        "logging.file=none",
        "rate_limits.inference=null",
        f"++models.catalog.demo.path={path}",
        *extra,
    ]
    work = Path(tempfile.mkdtemp(prefix="single-stream-"))
    proc = Proc("appliance", argv, child_env(), work, work / "server.log").start()
    try:
        url = f"http://{HOST}:{port}"
        wait_ready(proc, url + "/readyz", timeout=600)
        rates = []
        for i in range(repeat + 1):
            body: dict[str, Any] = {
                "model": "demo",
                "messages": [{"role": "user", "content": f"Count to a thousand ({i})."}],
                "max_tokens": tokens,
                "temperature": 0,
                "stream": True,
            }
            stamps: list[float] = []
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        event = json.loads(line[6:])
                        if any((c.get("delta") or {}).get("content") for c in event["choices"]):
                            stamps.append(time.perf_counter())
            if i and len(stamps) > 1:
                rates.append(_rate(stamps))
        return statistics.median(rates)
    finally:
        proc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--model-path")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="step,engine,http,http-process")
    args = ap.parse_args()
    if not args.model_path:
        from appliance.engine.demo import ensure_demo_model

        args.model_path = str(ensure_demo_model(shape="llama-1b", progress=print))
    only = args.only.split(",")
    if "http" in only:
        r = http_rate(args.model_path, args.tokens, args.repeat, [])
        print(f"http (engine in the server's process): {r:.1f} tokens/s", flush=True)
    if "http-process" in only:
        r = http_rate(
            args.model_path, args.tokens, args.repeat, ["++models.catalog.demo.engine_process=true"]
        )
        print(f"http (engine_process=true): {r:.1f} tokens/s", flush=True)
    if "engine" in only:
        r = asyncio.run(engine_rate(args.model_path, args.tokens, args.repeat))
        print(f"engine (in this process, no HTTP): {r:.1f} tokens/s", flush=True)
    if "step" in only:
        r = step_rate(args.model_path, args.tokens)
        print(f"step (the batch generator alone, fused): {r:.1f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
