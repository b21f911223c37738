"""The masked decode attention kernel (appliance/engine/cuda.py) against MLX's own path, on CUDA.

    python3 -m benchmarks.accelerator.decode_attention MODEL_DIR [STEPS]

1. Correctness: random bf16 inputs laid out as a batch's decode step has them (q a transposed
   view, k and v views into longer cache buffers, a left-padding mask), several head layouts,
   batch sizes and key lengths; the largest difference from MLX's attention computed in float32,
   beside the largest difference of MLX's own bf16 attention from it.
2. Attention alone, ms per call (each evaluated): MLX with the mask (its four-op fallback), the
   kernel, and MLX's vector kernel without a mask (what a batch with no padding could run).
3. Decode steps of mlx-lm's BatchGenerator and the appliance's, prompts of different lengths (so
   rows are padded), the kernel off and on, interleaved: median ms a step over STEPS steps, and
   how many of the first tokens are the same (random weights make near-ties, so a few may flip).
"""

import sys
import time

import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import BatchGenerator

from appliance.engine.mlx_ext import batching, cuda
from benchmarks.accelerator.steps import median_step_ms, per_call_ms

model, _ = load(sys.argv[1])
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 100
assert cuda.install(0, decode_kernel=True), cuda._decode.get("probe") or "not on CUDA"
original = cuda._state["original"]


def inputs(b, hq, hkv, s, d, seed=0):
    mx.random.seed(seed)
    q = mx.random.normal((b, 1, hq, d)).astype(mx.bfloat16).transpose(0, 2, 1, 3)
    k = mx.random.normal((b, hkv, s + 37, d)).astype(mx.bfloat16)[:, :, :s, :]
    v = mx.random.normal((b, hkv, s + 37, d)).astype(mx.bfloat16)[:, :, :s, :]
    pad = mx.random.randint(0, s, (b,)) if b > 1 else mx.array([0])
    mask = mx.expand_dims(pad, (1, 2, 3)) <= mx.arange(s)
    mx.eval(q, k, v, mask)
    return q, k, v, mask


t = time.perf_counter()
q0, k0, v0, m0 = inputs(2, 32, 8, 16, 64)
mx.eval(cuda.masked_decode_attention(q0, k0, v0, 0.125, m0))
print(f"first call (kernel compiled): {1000 * (time.perf_counter() - t):.0f} ms", flush=True)

print("correctness, max |difference| from MLX in float32 (kernel / MLX's own bf16):", flush=True)
worst = 0.0
for hq, hkv, d in ((32, 8, 64), (32, 8, 128), (8, 8, 128), (16, 2, 256), (4, 4, 32)):
    for b in (1, 2, 8, 64):
        for s in (1, 7, 128, 513):
            q, k, v, mask = inputs(b, hq, hkv, s, d, seed=b * s)
            scale = d**-0.5
            assert cuda.decode_kernel_fits(q, k, v, mask)
            f32 = [x.astype(mx.float32) for x in (q, k, v)]
            want = original(*f32, scale=scale, mask=mask)
            got = cuda.masked_decode_attention(q, k, v, scale, mask).astype(mx.float32)
            mlx = original(q, k, v, scale=scale, mask=mask).astype(mx.float32)
            e_got = mx.max(mx.abs(got - want)).item()
            e_mlx = mx.max(mx.abs(mlx - want)).item()
            worst = max(worst, e_got / max(e_mlx, 1e-3))
            flag = "" if e_got <= 2 * e_mlx + 1e-2 else "  <-- off"
            print(
                f"  Hq={hq:>2} Hkv={hkv} D={d:>3} B={b:>2} S={s:>3}: "
                f"{e_got:.4f} / {e_mlx:.4f}{flag}",
                flush=True,
            )
print(f"worst ratio kernel/MLX error: {worst:.2f}", flush=True)

print("attention alone, ms per call (32 query heads, 8 KV heads, head size 64, bf16):", flush=True)
for b in (2, 8, 64):
    for s in (128, 512):
        q, k, v, mask = inputs(b, 32, 8, s, 64)
        res = [
            per_call_ms(lambda q=q, k=k, v=v, m=mask: original(q, k, v, scale=0.125, mask=m)),
            per_call_ms(
                lambda q=q, k=k, v=v, m=mask: cuda.masked_decode_attention(q, k, v, 0.125, m)
            ),
            per_call_ms(lambda q=q, k=k, v=v: original(q, k, v, scale=0.125, mask=None)),
        ]
        print(
            f"  B={b:>2} S={s:>3}: MLX masked {res[0]:.3f}, kernel {res[1]:.3f}, "
            f"MLX unmasked {res[2]:.3f}",
            flush=True,
        )


def run(cls, b: int, kernel: bool) -> tuple[float, list[int]]:
    cuda._state["decode_kernel"] = kernel
    toks: list[int] = []
    prompts = [list(range(1, 9 + 5 * (i % 7))) for i in range(b)]
    ms = median_step_ms(model, cls, b, steps, prompts=prompts, warm_tokens=toks)
    return ms, toks


print(f"decode step, padded rows, median ms over {steps} steps (kernel off / on):", flush=True)
for name, cls in (("mlx-lm", BatchGenerator), ("appliance", batching.BatchGenerator)):
    for b in (2, 8, 32, 64):
        run(cls, b, False), run(cls, b, True)  # shapes compiled
        for rnd in range(2):
            (off, t_off), (on, t_on) = run(cls, b, False), run(cls, b, True)
            same = sum(x == y for x, y in zip(t_off, t_on, strict=True))
            print(
                f"  {name} batch {b:>2} round {rnd + 1}: {off:.2f} / {on:.2f} ms "
                f"({same} of {len(t_off)} first tokens the same)",
                flush=True,
            )
