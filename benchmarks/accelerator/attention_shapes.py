"""How much the first call of each new attention shape costs on this MLX backend.

    python3 -m benchmarks.accelerator.attention_shapes

For prefill-shaped attention (several queries per sequence) of a few (batch, length) shapes,
then decode-shaped (one query), prints the first and the second call of
mx.fast.scaled_dot_product_attention (causal and array mask), of appliance.engine.cuda's unfused
attention, and of a matmul. On CUDA the fused prefill attention builds a cuDNN graph per shape
(BENCHMARKS.md: ~43 ms first, 0.2-0.5 ms after, on an H200).
"""

import os
import time

import mlx.core as mx

from appliance.engine.cuda import unfused_attention


def ms(fn):  # type: ignore[no-untyped-def]
    mx.synchronize()
    t0 = time.perf_counter()
    mx.eval(fn())
    mx.synchronize()
    return (time.perf_counter() - t0) * 1000


H, KV, D = 32, 8, 64  # the 1B Llama shape's heads


def prefill(n: int, length: int) -> str:
    q = mx.random.normal((n, H, length, D)).astype(mx.bfloat16)
    k = mx.random.normal((n, KV, length, D)).astype(mx.bfloat16)
    v = mx.random.normal((n, KV, length, D)).astype(mx.bfloat16)
    mask = mx.ones((n, 1, length, length), dtype=mx.bool_)
    x = mx.random.normal((n * length, 2048)).astype(mx.bfloat16)
    w = mx.random.normal((2048, 8192)).astype(mx.bfloat16)
    calls = {
        "sdpa causal": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal"),
        "sdpa array-mask": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask),
        "unfused": lambda: unfused_attention(q, k, v, 0.125, "causal"),
        "matmul": lambda: x @ w,
    }
    return "; ".join(f"{name} first {ms(f):.1f} ms again {ms(f):.1f}" for name, f in calls.items())


def decode(n: int, length: int) -> str:
    q = mx.random.normal((n, H, 1, D)).astype(mx.bfloat16)
    k = mx.random.normal((n, KV, length, D)).astype(mx.bfloat16)
    v = mx.random.normal((n, KV, length, D)).astype(mx.bfloat16)

    def one():  # type: ignore[no-untyped-def]
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125)

    return f"sdpa first {ms(one):.1f} ms again {ms(one):.1f}"


for n, length in [(13, 40), (13, 41), (14, 40), (9, 57), (21, 33), (13, 40)]:
    print(f"n={n} L={length}: {prefill(n, length)}", flush=True)
for n, length in [(50, 100), (50, 101), (51, 101)]:
    print(f"decode n={n} L={length}: {decode(n, length)}", flush=True)
os._exit(0)  # MLX's CUDA backend can abort in native destructors at interpreter exit
