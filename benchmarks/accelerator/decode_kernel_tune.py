"""The masked decode kernel (appliance/engine/cuda.py) against MLX's attention, on CUDA.

    python3 -m benchmarks.accelerator.decode_kernel_tune

Llama 3.2 1B's heads (32 query, 8 KV, size 64), bf16, q a transposed view and k, v views into
longer cache buffers, rows padded by 0-6 keys. Each figure is ms for 16 calls in a chain (each
call's output the next one's query, as layers follow each other in a step), evaluated once,
mean of 50: the kernel with a block for each KV head's 4 query heads or for each query head,
MLX with the mask (its four-op fallback) and MLX without a mask (its vector kernel, what a
batch with no padding runs). Then the microseconds of Python and graph building per call.
"""

import time

import mlx.core as mx

from appliance.engine.mlx_ext import cuda
from benchmarks.accelerator.steps import per_call_ms

assert cuda.install(0, decode_kernel=True), cuda._decode.get("probe") or "not on CUDA"
original = cuda._state["original"]


def chain(step, q):
    for _ in range(16):
        q = step(q)
    return q


def inputs(b, s, hq=32, hkv=8, d=64):
    q = mx.random.normal((b, 1, hq, d)).astype(mx.bfloat16).transpose(0, 2, 1, 3)
    k = mx.random.normal((b, hkv, s + 37, d)).astype(mx.bfloat16)[:, :, :s, :]
    v = mx.random.normal((b, hkv, s + 37, d)).astype(mx.bfloat16)[:, :, :s, :]
    mask = mx.expand_dims(mx.arange(b) % 7, (1, 2, 3)) <= mx.arange(s)
    mx.eval(q, k, v, mask)
    return q, k, v, mask


def kernel(layout):
    def step(q, k, v, m):
        cuda._DECODE_LAYOUT = layout
        return cuda.masked_decode_attention(q, k, v, 0.125, m)

    return step


VARIANTS = {
    "4 heads a block": kernel("grouped"),
    "1 head a block": kernel("per-head"),
    "MLX masked": lambda q, k, v, m: original(q, k, v, scale=0.125, mask=m),
    "MLX unmasked": lambda q, k, v, m: original(q, k, v, scale=0.125, mask=None),
}
print("ms for 16 chained calls:", flush=True)
for b in (1, 2, 4, 8, 16, 32, 64):
    for s in (128, 512, 2048):
        q, k, v, mask = inputs(b, s)
        res = {
            n: per_call_ms(
                lambda f=f, q=q, k=k, v=v, m=mask: chain(lambda x: f(x, k, v, m), q), n=50, warm=5
            )
            for n, f in VARIANTS.items()
        }
        shown = ", ".join(f"{n} {ms:.3f}" for n, ms in res.items())
        print(f"  B={b:>2} S={s:>4}: {shown}", flush=True)
cuda._DECODE_LAYOUT = "auto"


def build_us(fn, n=2000) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return 1e6 * (time.perf_counter() - t) / n


q, k, v, mask = inputs(8, 128)
print(
    "microseconds to build one call, not evaluated: "
    f"kernel {build_us(lambda: cuda.masked_decode_attention(q, k, v, 0.125, mask)):.1f}, "
    f"MLX masked {build_us(lambda: original(q, k, v, scale=0.125, mask=mask)):.1f}, "
    f"MLX unmasked {build_us(lambda: original(q, k, v, scale=0.125, mask=None)):.1f}",
    flush=True,
)
