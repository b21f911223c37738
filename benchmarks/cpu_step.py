"""`python -m benchmarks.cpu_step`: where one decode step of SmolLM2 goes on the CPU.

    python -m benchmarks.cpu_step [--blas auto|bundled|PATH] [--no-gemv-forward]
                                  [--weights auto|dense|quantized] [--steps 40]

Runs under the BLAS the appliance would arrange (it executes itself again with the library
preloaded, as the appliance does), loads SmolLM2 as the appliance does (its cpu_weights plan,
fused projections), times the prefill of a 100-token prompt (best of 3, each on a fresh cache),
then times, interleaved: one decode step of one sequence, and the same step's matrix products
alone (each weight matrix the step reads times one vector, nothing else). It also counts the
operations in one step's graph by kind. Prints one JSON object: prefill tokens/s, the step's and
the products' median and least milliseconds, the weight bytes a step reads, and the operations.
The options are the appliance's settings, so one run per combination is an A/B of them.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional


def _arrange(args: argparse.Namespace, argv: list[str]) -> None:
    from appliance.engine import cpu

    if os.environ.get(cpu.MARKER_ENV) is not None:
        return
    env = cpu.preload_env(args.blas, not args.no_gemv_forward)
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.cpu_step", *argv], env)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_step", description=__doc__)
    p.add_argument("--blas", default="auto", help="engine.cpu_blas: auto, bundled or a path")
    p.add_argument("--no-gemv-forward", action="store_true", help="engine.cpu_gemv_forward off")
    p.add_argument("--weights", default="auto", choices=("auto", "dense", "quantized"))
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args(argv)
    _arrange(args, argv)

    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.cache import make_prompt_cache

    from appliance.engine import cpu
    from appliance.engine.builtin import fetch_smollm2
    from appliance.engine.loading import load_model, weight_plan
    from appliance.engine.mlx_ext import fusion

    path = Path(fetch_smollm2(progress=lambda m: print(m, file=sys.stderr)))
    plan = weight_plan(path, args.weights)[0]
    model, tok = load_model("smollm2", path, builtin_dir=None, plan=plan)
    if fusion.usable():
        fusion.fuse_projections(model)
    ids = tok.encode("The history of the printing press begins in the fifteenth century. " * 12)
    mx.eval(model(mx.array([ids[:16]]), cache=make_prompt_cache(model)))  # warm-up
    prefill: list[float] = []
    for _ in range(3):
        cache = make_prompt_cache(model)
        t = time.perf_counter()
        mx.eval(model(mx.array([ids[:100]]), cache=cache))
        prefill.append(100 / (time.perf_counter() - t))
    y = mx.array([[ids[100]]])

    weights: list[Any] = []
    for _, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.QuantizedLinear)):
            weights.append(m)
    embed = model.model.embed_tokens  # the output layer of a model with tied embeddings
    if getattr(model, "lm_head", None) is None:
        weights.append(embed)

    def width(m: Any) -> int:  # input features: packed weights hold 32 / bits a word
        return int(m.weight.shape[1]) * (32 // m.bits if hasattr(m, "bits") else 1)

    xs = {width(m): mx.ones((1, width(m))) for m in weights}
    mx.eval(list(xs.values()))

    def products() -> list[Any]:
        out = []
        for m in weights:
            x = xs[width(m)]
            embedding = isinstance(m, (nn.Embedding, nn.QuantizedEmbedding))
            out.append(m.as_linear(x) if embedding else m(x))
        return out

    read = 0
    for m in weights:
        flat: Any = nn.utils.tree_flatten(m.parameters())
        read += sum(int(getattr(item[1], "nbytes", 0)) for item in flat)
    steps: list[float] = []
    alone: list[float] = []
    for _ in range(3):  # warm-up
        mx.eval(model(y, cache=cache))
        mx.eval(products())
    for _ in range(args.steps):
        t = time.perf_counter()
        mx.eval(model(y, cache=cache))
        steps.append(time.perf_counter() - t)
        t = time.perf_counter()
        mx.eval(products())
        alone.append(time.perf_counter() - t)

    dot = io.StringIO()
    mx.export_to_dot(dot, model(y, cache=cache))
    ops = collections.Counter(re.findall(r'label ="([^"]+)", shape=rectangle', dot.getvalue()))
    ms = lambda xs: round(1000 * xs, 2)  # noqa: E731
    print(
        json.dumps(
            {
                "blas": cpu.current().line(),
                "weights": plan.summary(),
                "prefill_tok_s": round(max(prefill), 1),
                "step_ms": {"median": ms(statistics.median(steps)), "least": ms(min(steps))},
                "products_alone_ms": {
                    "median": ms(statistics.median(alone)),
                    "least": ms(min(alone)),
                },
                "weight_bytes_read": read,
                "products": len(weights),
                "ops_per_step": sum(ops.values()),
                "ops_by_kind": dict(ops.most_common()),
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
