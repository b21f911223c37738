"""Where a long prefill's time goes in the engine, beside decoding streams, by configuration.

    python3 -m benchmarks.accelerator.prefill_anatomy [--model-path DIR] [--prefix N] [--new N]
        [--config NAME=KEY=VALUE,KEY=VALUE ...] [--out FILE]

The engine in this process (no HTTP), on the 1B shape by default, with the agent scenario's
pattern in small: a shared prefix is cached; then a prompt of the prefix plus `--new` fresh tokens
arrives alone ("alone"), and again while three sessions (the prefix plus 400 tokens each) decode
("beside"). For each configuration (a list of profile overrides of the model) it prints the long
prompt's TTFT, the engine calls (next()) during it with their median and longest time, the
prefilled tokens a call, and the decoding streams' longest gap during the prefill against their
steady gap. Each case runs twice with new tokens (so new attention shapes), both printed. A
name ending in "-nocc", "-bigblock", "-wait", "-line" or "-twopass" never clears MLX's buffer
cache, takes the unfused attention in one piece, waits for every prefill chunk as mlx-lm does,
has the learnt budget fit a step's fixed cost apart from its cost a token, or runs a chunk beside
decoding rows as a forward pass of its own (in that order).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import random
import statistics
import time
from typing import Any

CONFIGS = {
    "defaults": [],
    "defaults-bigblock": [],
    "budget-off": ["++models.catalog.demo.prefill_budget_tokens=null"],
    "step-2048": ["++models.catalog.demo.prefill_step_size=2048"],
    "cudnn-always": ["models.cuda_unfused_attention_elements=0"],
    "unfused-always": ["models.cuda_unfused_attention_elements=1099511627776"],
    "unfused-2048": [
        "models.cuda_unfused_attention_elements=1099511627776",
        "++models.catalog.demo.prefill_step_size=2048",
    ],
    # unfused attention up to 2^31 scores, 2048-token steps; then with fixed budgets a step
    "cand": [
        "models.cuda_unfused_attention_elements=2147483648",
        "++models.catalog.demo.prefill_step_size=2048",
    ],
    "cand-b64": [
        "models.cuda_unfused_attention_elements=2147483648",
        "++models.catalog.demo.prefill_step_size=2048",
        "++models.catalog.demo.prefill_budget_tokens=64",
    ],
    "cand-b256": [
        "models.cuda_unfused_attention_elements=2147483648",
        "++models.catalog.demo.prefill_step_size=2048",
        "++models.catalog.demo.prefill_budget_tokens=256",
    ],
    "cand-b1024": [
        "models.cuda_unfused_attention_elements=2147483648",
        "++models.catalog.demo.prefill_step_size=2048",
        "++models.catalog.demo.prefill_budget_tokens=1024",
    ],
    "cand-b256-nocc": [
        "models.cuda_unfused_attention_elements=2147483648",
        "++models.catalog.demo.prefill_step_size=2048",
        "++models.catalog.demo.prefill_budget_tokens=256",
    ],
    "mlx-lm-like": [
        "++models.catalog.demo.fast_joins=false",
        "++models.catalog.demo.prefill_step_size=2048",
        "++models.catalog.demo.fuse_projections=false",
        "models.cuda_unfused_attention_elements=0",
    ],
}


class Calls:
    """Every BatchGenerator.next() call: when it ended and how long it took."""

    def __init__(self) -> None:
        self.log: list[tuple[float, float]] = []

    def wrap(self, cls: Any) -> None:
        inner = cls.next
        calls = self

        def next_(self: Any) -> Any:
            t0 = time.perf_counter()
            out = inner(self)
            t1 = time.perf_counter()
            calls.log.append((t1, t1 - t0))
            return out

        cls.next = next_


async def run_config(
    name: str, overrides: list[str], args: argparse.Namespace, calls: Calls
) -> str:
    from appliance.config import compose, load
    from appliance.engine.service import Engine
    from benchmarks.accelerator.steps import run_request

    cfg = load(
        compose(
            [
                "logging.file=none",
                f"++models.catalog.demo.path={args.model_path}",
                "++models.catalog.demo.max_tokens=4096",
                "++models.catalog.demo.context_length=65536",
                *overrides,
            ]
        )
    )
    engine = Engine(cfg.models, cfg.limits)
    worker = await engine.model("demo")
    rng = random.Random(hash(name) & 0xFFFF)
    top = min(30000, int(getattr(worker, "vocab_size", 0) or 30000))

    def fresh(n: int) -> list[int]:
        return [rng.randrange(100, top) for _ in range(n)]

    prefix = fresh(args.prefix)

    async def one(prompt: list[int], max_tokens: int, stamps: list[float]) -> float:
        t0 = time.perf_counter()

        def seen(new: list[int]) -> None:
            stamps.extend([time.perf_counter()] * len(new))

        before = len(stamps)
        await run_request(engine, worker, prompt, max_tokens, seen)
        return stamps[before] - t0 if len(stamps) > before else 0.0

    await one(prefix + fresh(16), 2, [])  # the prefix is cached from here
    await one(prefix + fresh(600), 2, [])  # shapes seen once
    lines = []
    for case in ("alone", "beside"):
        for rep in (1, 2):
            decoders: list[list[float]] = [[], [], []]
            tasks = []
            if case == "beside":
                tasks = [
                    asyncio.ensure_future(one(prefix + fresh(400), args.decode_tokens, d))
                    for d in decoders
                ]
                while not all(len(d) >= 4 for d in decoders):
                    await asyncio.sleep(0.002)
            calls.log.clear()
            t0 = time.perf_counter()
            ttft = await one(prefix + fresh(args.new), 1, [])
            t1 = t0 + ttft
            during = [d for end, d in calls.log if t0 <= end - d and end <= t1 + 0.001] or [0.0]
            n_calls = len(during)
            await asyncio.gather(*tasks)
            gaps_in, gaps_out = [], []
            for d in decoders:
                for a, b in zip(d, d[1:], strict=False):
                    (gaps_in if b > t0 and a < t1 else gaps_out).append(b - a)
            gap = (
                f"; decoders' longest gap in it {max(gaps_in) * 1000:.0f} ms, steady p50 "
                f"{statistics.median(gaps_out) * 1000:.1f} ms"
                if gaps_in and gaps_out
                else ""
            )
            lines.append(
                f"{name:13s} {case:6s} #{rep}: TTFT {ttft * 1000:6.0f} ms ({args.new} new tokens "
                f"on {args.prefix} cached, {args.new / max(ttft, 1e-9):.0f} tokens/s); "
                f"{n_calls} calls, p50 {statistics.median(during) * 1000:.1f} ms, longest "
                f"{max(during) * 1000:.0f} ms, {args.new / max(n_calls, 1):.0f} tokens a call{gap}"
            )
            print(lines[-1], flush=True)
    await engine.close()
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--model-path")
    ap.add_argument("--prefix", type=int, default=6000)
    ap.add_argument("--new", type=int, default=8000)
    ap.add_argument("--decode-tokens", type=int, default=160)
    ap.add_argument("--config", action="append", default=[], help="NAME=KEY=VALUE,KEY=VALUE")
    ap.add_argument("--only", help="comma-separated names of CONFIGS to run")
    ap.add_argument("--out")
    args = ap.parse_args()
    if not args.model_path:
        from appliance.engine.demo import ensure_demo_model

        args.model_path = str(ensure_demo_model(shape="llama-1b", progress=print))
    configs = dict(CONFIGS)
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only.split(",")}
    for c in args.config:
        name, _, rest = c.partition("=")
        configs[name] = [kv for kv in rest.split(",") if kv]
    calls = Calls()
    calls.wrap(importlib.import_module("mlx_lm.generate").BatchGenerator)  # and its subclasses
    out = []
    import mlx.core as mx

    clear = mx.clear_cache
    from appliance.engine.mlx_ext import cuda

    block = cuda.UNFUSED_BLOCK
    from appliance.engine.mlx_ext import batching

    for name, overrides in configs.items():
        # "-wait": every prefill chunk waited for, as mlx-lm does (not launched beside decoding)
        batching.BatchGenerator.launch_prefill = "-wait" not in name
        # "-nocc": MLX's buffer cache is never cleared (mlx-lm clears it after every prefill chunk)
        mx.clear_cache = (lambda: None) if "-nocc" in name else clear
        # "-bigblock": the unfused attention in one piece
        cuda.UNFUSED_BLOCK = 1 << 40 if "-bigblock" in name else block
        # "-line": the learnt budget fits a step's fixed cost apart from its cost a token
        batching.PrefillBudget.fixed_part = "-line" in name
        # "-twopass": a chunk beside decoding rows runs as a forward pass of its own
        batching.BatchGenerator.mixed_prefill = "-twopass" not in name
        out.append(asyncio.run(run_config(name, overrides, args, calls)))
    mx.clear_cache, cuda.UNFUSED_BLOCK = clear, block
    batching.BatchGenerator.launch_prefill = True
    batching.PrefillBudget.fixed_part = False
    batching.BatchGenerator.mixed_prefill = True
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
