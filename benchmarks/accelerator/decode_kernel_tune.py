"""The masked decode kernel (appliance/engine/cuda.py) against MLX's attention, on CUDA.

    python3 -m benchmarks.accelerator.decode_kernel_tune [short] [long]

Llama 3.2 1B's heads (32 query, 8 KV, size 64), bf16, q a transposed view and k, v views into
longer cache buffers, rows padded by 0-6 keys. Each figure is ms for 16 calls in a chain (each
call's output the next one's query, as layers follow each other in a step), evaluated once,
mean of 50: the kernel (its keys whole) with a block for each KV head's 4 query heads or for
each query head, MLX with the mask (its four-op fallback) and MLX without a mask (its vector
kernel, what a batch with no padding runs). Then the microseconds of Python and graph building
per call.
`long` (the default runs both): few rows (ROWS, default 1,2,3,4,8,16) over 2k-32k keys, the
keys whole or split into runs (as the kernel would choose, "auto", or in a fixed number of
runs), after a check of the split kernel against MLX in float32 at those lengths.
"""

import os
import sys
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


def split(layout, splits):
    """The kernel with this layout, its keys in `splits` runs (1: whole; None: as it chooses)."""

    def step(q, k, v, m):
        cuda._DECODE_LAYOUT = layout
        cuda._DECODE_SPLITS = splits
        return cuda.masked_decode_attention(q, k, v, 0.125, m)

    return step


VARIANTS = {
    "4 heads a block": split("grouped", 1),  # the keys whole: the layouts compared as such
    "1 head a block": split("per-head", 1),
    "MLX masked": lambda q, k, v, m: original(q, k, v, scale=0.125, mask=m),
    "MLX unmasked": lambda q, k, v, m: original(q, k, v, scale=0.125, mask=None),
}
SECTIONS = set(sys.argv[1:]) or {"short", "long"}
print("ms for 16 chained calls:", flush=True)
for b in (1, 2, 4, 8, 16, 32, 64) if "short" in SECTIONS else ():
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
cuda._DECODE_LAYOUT, cuda._DECODE_SPLITS = "auto", None


if "long" in SECTIONS:
    print("split kernel, max |difference| from MLX in float32:", flush=True)
    for b, s, splits in ((1, 2048, 4), (3, 16384, 6), (3, 16384, 32), (8, 32768, 16)):
        q, k, v, mask = inputs(b, s)
        want = original(*(x.astype(mx.float32) for x in (q, k, v)), scale=0.125, mask=mask)
        got = split("per-head", splits)(q, k, v, mask).astype(mx.float32)
        bf16 = original(q, k, v, scale=0.125, mask=mask).astype(mx.float32)
        print(
            f"  B={b} S={s:>5} in {splits:>2} runs: {mx.max(mx.abs(got - want)).item():.4f} "
            f"(MLX bf16 {mx.max(mx.abs(bf16 - want)).item():.4f})",
            flush=True,
        )
    LONG = {
        "MLX masked": VARIANTS["MLX masked"],
        "MLX unmasked": VARIANTS["MLX unmasked"],
        "auto": split("auto", None),
    }
    for layout in ("per-head", "grouped"):
        for splits in (1, 4, 8, 16, 32):
            LONG[f"{layout} {'whole' if splits == 1 else splits}"] = split(layout, splits)
    print("ms for 16 chained calls, long keys:", flush=True)
    for b in [int(r) for r in os.environ.get("ROWS", "1,2,3,4,8,16").split(",")]:
        for s in (2048, 8192, 16384, 32768):
            q, k, v, mask = inputs(b, s)
            res = {
                n: per_call_ms(
                    lambda f=f, q=q, k=k, v=v, m=mask: chain(lambda x: f(x, k, v, m), q),
                    n=20,
                    warm=3,
                )
                for n, f in LONG.items()
            }
            shown = ", ".join(f"{n} {ms:.2f}" for n, ms in res.items())
            print(f"  B={b:>2} S={s:>5}: {shown}", flush=True)
    cuda._DECODE_LAYOUT, cuda._DECODE_SPLITS = "auto", None


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
