"""Where the time of a join into a running batch goes, on this MLX backend.

    python3 -m benchmarks.accelerator.join_anatomy MODEL_DIR [--out FILE]

Three parts, each printed as it finishes (and appended to --out):

A. The model's forward pass for prefill shapes (batch x tokens), each shape twice with a fresh
   cache: what a shape costs the first time against the second.
B. The same for one matmul with inputs already evaluated (the 1B shape's MLP up projection).
C. mlx-lm's BatchGenerator with 40 sequences decoding and 16 to 20 new prompts joining, several
   times: the wall time of every next() call around the join, then the same joins again with the
   phases timed apart (a synchronize around the prefill, the split, the new batch's first
   forward and the merge). "same" joins repeat one shape; "new" joins bring a new one each time.
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("MLX_ENABLE_CACHE_THRASHING_CHECK", "0")

import mlx.core as mx  # noqa: E402
from mlx_lm.utils import load  # noqa: E402

G = importlib.import_module("mlx_lm.generate")  # the module, not mlx_lm's generate()

VOCAB = 30000  # token ids drawn below this (the model's vocabulary, capped)


def say(line: str, out: str | None) -> None:
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


def forward_cost(model: Any, b: int, t: int, rng: random.Random) -> float:
    from mlx_lm.models.cache import make_prompt_cache

    caches = G._merge_caches([make_prompt_cache(model) for _ in range(b)])
    x = mx.array([[rng.randrange(1, VOCAB) for _ in range(t)] for _ in range(b)])
    mx.eval(x, [c.state for c in caches if c.keys is not None])
    mx.synchronize()
    t0 = time.perf_counter()
    model(x, cache=caches)
    mx.eval([c.state for c in caches])
    mx.synchronize()
    return ms(t0)


def part_a(model: Any, out: str | None) -> None:
    rng = random.Random(1)
    for b, t in [(16, 60), (16, 61), (17, 60), (12, 73), (24, 41), (16, 60), (16, 64), (64, 59)]:
        first = forward_cost(model, b, t, rng)
        again = forward_cost(model, b, t, rng)
        say(f"A forward B={b} T={t}: first {first:.1f} ms, again {again:.1f} ms", out)


def part_b(out: str | None) -> None:
    w = mx.random.normal((2048, 8192)).astype(mx.bfloat16)
    for m in [960, 961, 1000, 1001, 960]:
        x = mx.random.normal((m, 2048)).astype(mx.bfloat16)
        mx.eval(x, w)
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(x @ w)
        mx.synchronize()
        first = ms(t0)
        t0 = time.perf_counter()
        mx.eval(x @ w)
        mx.synchronize()
        say(f"B matmul M={m}: first {first:.2f} ms, again {ms(t0):.2f} ms", out)


class Phases:
    """Wraps BatchGenerator's join steps; with `sync`, each phase is timed apart."""

    def __init__(self) -> None:
        self.sync = False
        self.secs: dict[str, list[float]] = {}
        for cls, name, label in [
            (G.PromptProcessingBatch, "prompt", "prefill"),
            (G.PromptProcessingBatch, "split", "split"),
            (G.PromptProcessingBatch, "generate", "new batch"),
            (G.GenerationBatch, "extend", "merge"),
            (G.GenerationBatch, "filter", "filter"),
        ]:
            self._wrap(cls, name, label)

    def _wrap(self, cls: Any, name: str, label: str) -> None:
        orig = getattr(cls, name)
        phases = self

        def wrapped(obj: Any, *args: Any) -> Any:
            if not phases.sync:
                return orig(obj, *args)
            mx.synchronize()
            t0 = time.perf_counter()
            res = orig(obj, *args)
            if isinstance(res, G.GenerationBatch):
                mx.eval(res._next_tokens)
            mx.eval([c.state for c in getattr(obj, "prompt_cache", []) if c.keys is not None])
            mx.synchronize()
            if label != "prefill" or (args and args[0]):
                phases.secs.setdefault(label, []).append(ms(t0))
            return res

        setattr(cls, name, wrapped)


RUN = 40  # sequences decoding when the others join (at most 24 join: batch 64)


def part_c(model: Any, tok: Any, out: str | None, phases: Phases) -> None:
    rng = random.Random(2)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(n)]

    gen = G.BatchGenerator(
        model,
        stop_tokens=None,
        completion_batch_size=64,  # nobody stops early
        prefill_batch_size=64,
        prefill_step_size=2048,
    )
    base = gen.insert([prompt(60) for _ in range(RUN)], max_tokens=[100000] * RUN)
    while len(gen._generation_batch) < RUN:
        gen.next()
    for _ in range(20):
        gen.next()

    def steady(n: int) -> list[float]:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            gen.next()
            times.append(ms(t0))
        return times

    def join(b: int, t: int) -> tuple[list[float], float]:
        uids = gen.insert([prompt(t) for _ in range(b)], max_tokens=[100000] * b)
        times = []
        t0 = time.perf_counter()
        while len(gen._generation_batch) < RUN + b:
            s = time.perf_counter()
            gen.next()
            times.append(ms(s))
        # the first token of the joiners comes out of the next step
        s = time.perf_counter()
        gen.next()
        times.append(ms(s))
        total = ms(t0)
        gen.remove(uids)
        return times, total

    for sync in (False, True):
        phases.sync = sync
        phases.secs.clear()
        mode = "phases synchronized" if sync else "as is"
        before = steady(10)
        say(f"C [{mode}] decode B={RUN} next() ms: {' '.join(f'{x:.1f}' for x in before)}", out)
        shapes = [("same", 16, 60)] * 4 + [("new", 16 + i, 60 + 3 * i) for i in range(1, 5)]
        for kind, b, t in shapes:
            times, total = join(b, t)
            after = steady(5)
            say(
                f"C [{mode}] join {kind} B_new={b} T={t}: "
                f"next() ms {' '.join(f'{x:.1f}' for x in times)}"
                f" (to first token {total:.1f}); after: {' '.join(f'{x:.1f}' for x in after)}",
                out,
            )
        if sync:
            for label, vals in phases.secs.items():
                say(
                    f"C [{mode}] phase {label}: n={len(vals)} "
                    f"{' '.join(f'{v:.1f}' for v in vals)} (median {statistics.median(vals):.1f})",
                    out,
                )
    phases.sync = False
    gen.remove(base)
    gen.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--out")
    ap.add_argument("--parts", default="abc")
    ap.add_argument("--unfused", type=int, default=2**27)
    args = ap.parse_args()
    from appliance.engine.mlx_ext import cuda

    model, tok = load(args.model)
    global VOCAB
    VOCAB = min(VOCAB, int(model.args.vocab_size))
    cuda.install(args.unfused)
    env = {k: v for k, v in os.environ.items() if k.startswith("MLX_")}
    say(f"# {mx.default_device()} unfused<={args.unfused} env {env}", args.out)
    phases = Phases()
    if "a" in args.parts:
        part_a(model, args.out)
    if "b" in args.parts:
        part_b(args.out)
    if "c" in args.parts:
        part_c(model, tok, args.out, phases)
    sys.stdout.flush()
    os._exit(0)  # MLX's CUDA backend can abort in native destructors at interpreter exit


if __name__ == "__main__":
    main()
