"""The masked decode kernel's warps per block, and what building each attention call costs the host.

    python3 scripts/accelerator/decode_kernel_tune.py

1. ms per call (each evaluated) of appliance/engine/cuda.py's kernel with 8 / 16 / 32 warps a
   block and 1 / 2 / 4 keys a warp at a time ("16w4u": 16 warps, 4 keys), beside MLX's unmasked vector kernel; Llama 3.2 1B's heads (32 query, 8 KV, size 64), bf16.
2. ms for 16 calls in a chain (each call's output the next one's query, as layers follow each
   other in a step), evaluated once: the kernel, MLX masked and unmasked, and a custom kernel that
   only copies q (what any custom kernel costs).
3. microseconds of Python and MLX graph building per call, nothing evaluated: the kernel, MLX
   with the mask (its fallback), MLX without.
"""

import time

import mlx.core as mx

from appliance.engine import cuda

assert cuda.install(0, decode_kernel=True), "not on CUDA"
original = cuda._state["original"]


def per_call(fn, n=200) -> float:
    for _ in range(10):
        mx.eval(fn())
    t = time.perf_counter()
    for _ in range(n):
        mx.eval(fn())
    return 1000 * (time.perf_counter() - t) / n


def build_us(fn, n=2000) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return 1e6 * (time.perf_counter() - t) / n


def inputs(b, s, hq=32, hkv=8, d=64):
    q = mx.random.normal((b, 1, hq, d)).astype(mx.bfloat16).transpose(0, 2, 1, 3)
    k = mx.random.normal((b, hkv, s + 37, d)).astype(mx.bfloat16)[:, :, :s, :]
    v = mx.random.normal((b, hkv, s + 37, d)).astype(mx.bfloat16)[:, :, :s, :]
    mask = mx.expand_dims(mx.arange(b) % 7, (1, 2, 3)) <= mx.arange(s)
    mx.eval(q, k, v, mask)
    return q, k, v, mask


print("ms per call, evaluated:", flush=True)
for b in (2, 8, 32, 64):
    for s in (128, 512):
        q, k, v, mask = inputs(b, s)
        row = []
        for w, u in ((8, 1), (8, 4), (16, 1), (16, 4), (32, 1), (32, 2), (32, 4)):
            cuda._DECODE_WARPS, cuda._DECODE_UNROLL = w, u
            ms = per_call(lambda q=q, k=k, v=v, m=mask: cuda.masked_decode_attention(q, k, v, 0.125, m))
            row.append(f"{w}w{u}u {ms:.3f}")
        row.append(f"MLX unmasked {per_call(lambda q=q, k=k, v=v: original(q, k, v, scale=0.125, mask=None)):.3f}")
        print(f"  B={b:>2} S={s:>3}: " + ", ".join(row), flush=True)

q, k, v, mask = inputs(8, 128)
cuda._DECODE_WARPS, cuda._DECODE_UNROLL = 32, 4
print("microseconds to build one call, not evaluated: "
      f"kernel {build_us(lambda: cuda.masked_decode_attention(q, k, v, 0.125, mask)):.1f}, "
      f"MLX masked {build_us(lambda: original(q, k, v, scale=0.125, mask=mask)):.1f}, "
      f"MLX unmasked {build_us(lambda: original(q, k, v, scale=0.125, mask=None)):.1f}", flush=True)

copy_kernel = mx.fast.cuda_kernel(
    name="appliance_copy_q", input_names=["q"], output_names=["out"],
    source="""
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < q_size) { out[i] = q[i]; }
""".replace("q_size", "Q_SIZE"),
)


def copy_q(q):
    return copy_kernel(inputs=[q], template=[("Q_SIZE", q.size)], grid=(q.size, 1, 1), threadgroup=(256, 1, 1),
                       output_shapes=[q.shape], output_dtypes=[q.dtype])[0]


def chain(step, q):
    for _ in range(16):
        q = step(q)
    return q


print("ms for 16 chained calls, evaluated once:", flush=True)
for b in (2, 8, 32, 64):
    for s in (128, 512):
        q, k, v, mask = inputs(b, s)
        res = {
            "kernel": per_call(lambda q=q, k=k, v=v, m=mask: chain(
                lambda x: cuda.masked_decode_attention(x, k, v, 0.125, m), q), n=50),
            "MLX masked": per_call(lambda q=q, k=k, v=v, m=mask: chain(
                lambda x: original(x, k, v, scale=0.125, mask=m), q), n=50),
            "MLX unmasked": per_call(lambda q=q, k=k, v=v: chain(
                lambda x: original(x, k, v, scale=0.125, mask=None), q), n=50),
            "copy kernel": per_call(lambda q=q: chain(copy_q, q), n=50),
        }
        print(f"  B={b:>2} S={s:>3}: " + ", ".join(f"{n} {ms:.3f}" for n, ms in res.items()), flush=True)
