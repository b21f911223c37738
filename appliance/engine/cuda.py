"""Short prefills on CUDA without cuDNN's attention graphs.

MLX's CUDA backend runs attention with more than one query per sequence (a prefill) through a
cuDNN graph built for each exact shape (batch, heads, query and key lengths) and kept in an LRU
cache. Building one costs about 40 ms (measured on an H200: 43 ms the first time a shape is
seen, 0.2-0.5 ms after). Under continuous batching every join brings a new shape (how many
prompts arrived together, how long the longest is), so each join paid that and stalled every
running stream; the cache also counts misses, and MLX aborts once they pass twice its capacity
(MLX_CUDA_SDPA_CACHE_SIZE).

`install(max_elements)` routes attention whose score matrix has at most `max_elements` entries
(batch x query heads x query length x key length) through plain matmul + softmax, the same
arithmetic as mlx-lm's quantized-cache attention; larger ones (long prompts, where one graph
build is small beside the prefill) keep cuDNN. Decode steps (one query) are untouched: MLX's
own vector kernel serves them without a graph. Only on CUDA; Metal and CPU are not patched.
"""

from __future__ import annotations

import os
from typing import Any, Optional

# MLX's CUDA backend keeps cuDNN attention graphs, CUDA graphs, conv plans and FFT plans in LRU
# caches, and by default raises "Cache thrashing is happening" once a cache's lifetime misses
# pass twice its capacity (MLX_CUDA_*_CACHE_SIZE). The count never resets, so a server that keeps
# seeing new shapes would fail a request after enough hours: the LRU caches evict and keep
# working with the check off.
# CUDA graphs (MLX's default: on) off: a decode step replayed through MLX's CUDA graphs took 3.0
# or 4.8-5.2 ms at batch 1 and 5.1-7.9 ms at batch 64 depending on the process (an H100, 13
# processes, scripts/accelerator/decode_modes.py), launched kernel by kernel 3.3-3.5 and 4.4-4.9
# ms in every process; over HTTP, servers in turn at 32 and 64 clients made 1.2-1.5x the tokens/s
# with them off (BENCHMARKS.md). Set before MLX builds any cache; an operator's own value wins.
MLX_ENV_DEFAULTS = {"MLX_ENABLE_CACHE_THRASHING_CHECK": "0", "MLX_USE_CUDA_GRAPHS": "0"}


def mlx_env_defaults() -> None:
    """Put MLX_ENV_DEFAULTS into this process's environment where not already set (and so into
    the engine processes and ranks it starts)."""
    for key, value in MLX_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)

_state: dict[str, Any] = {"original": None, "max_elements": 0, "decode_kernel": False}


def unfused_attention(q: Any, k: Any, v: Any, scale: float, mask: Any) -> Any:
    """softmax(q k^T * scale + mask) v with grouped-query heads, in q's dtype (precise softmax)."""
    import mlx.core as mx

    b, n_q, length, d = q.shape
    n_kv = k.shape[-3]
    rep = n_q // n_kv
    q = q * scale
    if rep > 1:
        q = mx.reshape(q, (b, n_kv, rep, length, d))
        k = mx.expand_dims(k, -3)
        v = mx.expand_dims(v, -3)
    scores = q @ mx.swapaxes(k, -1, -2)
    if mask is not None:
        if isinstance(mask, str):  # "causal": the queries are the last `length` positions
            k_len = scores.shape[-1]
            mask = mx.arange(k_len - length, k_len)[:, None] >= mx.arange(k_len)[None]
        elif rep > 1 and mask.ndim > 3:
            mask = mx.expand_dims(mask, -3)
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    out = mx.softmax(scores, axis=-1, precise=True) @ v
    if rep > 1:
        out = mx.reshape(out, (b, n_q, length, d))
    return out


# One query per row (a decode step) with a boolean mask (the left padding of a batch whose rows
# joined at different lengths): MLX's CUDA vector kernel takes no array mask, so MLX falls back to
# matmul, where, softmax and matmul, four launches and a score matrix per layer. This kernel is
# the vector kernel's single pass with the mask read per key: one block per (row, query head),
# WARPS warps each taking a run of keys with an online softmax, merged through shared memory at
# the end. Inputs are read through their strides, so the cache's views are not copied.
_DECODE_WARPS = 8
_DECODE_UNROLL = 4
_DECODE_HEADER = """
#define APPLIANCE_NEG_INF __int_as_float(0xff800000)
__device__ inline float appliance_to_float(float x) { return x; }
__device__ inline float appliance_to_float(__half x) { return __half2float(x); }
__device__ inline float appliance_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ inline T appliance_from_float(float x);
template <> __device__ inline float appliance_from_float<float>(float x) { return x; }
template <> __device__ inline __half appliance_from_float<__half>(float x) { return __float2half(x); }
template <> __device__ inline __nv_bfloat16 appliance_from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}
"""
_DECODE_SOURCE = """
    constexpr int VPT = D / 32;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int h = blockIdx.x;
    const int b = blockIdx.y;
    const int n_q = q_shape[1];
    const int kv_h = h / (n_q / k_shape[1]);
    const int n_keys = k_shape[2];
    // 64-bit offsets to this row and head; 32-bit ones within it (one head's keys stay far below
    // 2^31 elements), which measured faster.
    const T* qp = q + b * q_strides[0] + h * q_strides[1];
    const T* kp = k + b * k_strides[0] + kv_h * k_strides[1];
    const T* vp = v + b * v_strides[0] + kv_h * v_strides[1];
    const bool* mp = mask + (mask_shape[0] == 1 ? 0 : b * mask_strides[0])
        + (mask_shape[1] == 1 ? 0 : h * mask_strides[1]);
    const int q_step = q_strides[3];
    const int k_row = k_strides[2];
    const int k_step = k_strides[3];
    const int v_row = v_strides[2];
    const int v_step = v_strides[3];
    const int m_step = mask_strides[3];
    const float scale_log2 = scale[0] * 1.44269504088896340736f;
    float qr[VPT];
    float o[VPT];
#pragma unroll
    for (int i = 0; i < VPT; i++) {
        qr[i] = scale_log2 * appliance_to_float(qp[(lane * VPT + i) * q_step]);
        o[i] = 0.0f;
    }
    float m = APPLIANCE_NEG_INF;
    float l = 0.0f;
    // Each warp takes a contiguous run of keys, 32 at a time: the lanes read the 32 mask entries
    // together and a ballot makes them one bit mask, so a group that is all padding costs no key
    // or value loads. Within a group, UNROLL keys at a time, their loads issued together.
    const int per_warp = (n_keys + WARPS - 1) / WARPS;
    const int first = warp * per_warp;
    const int last = min(n_keys, first + per_warp);
    for (int base = first; base < last; base += 32) {
        const int mine = base + lane;
        const unsigned bits = __ballot_sync(0xffffffffu, mine < last && mp[(mine < last ? mine : base) * m_step]);
        if (bits == 0u) {
            continue;
        }
        const int n = min(32, last - base);
        for (int j0 = 0; j0 < n; j0 += UNROLL) {
            float dots[UNROLL];
            float vals[UNROLL][VPT];
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                const int at = base + (j0 + u < n ? j0 + u : 0);
                const T* ks = kp + at * k_row;
                const T* vs = vp + at * v_row;
                float dot = 0.0f;
#pragma unroll
                for (int i = 0; i < VPT; i++) {
                    dot += qr[i] * appliance_to_float(ks[(lane * VPT + i) * k_step]);
                    vals[u][i] = appliance_to_float(vs[(lane * VPT + i) * v_step]);
                }
                dots[u] = dot;
            }
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
                for (int u = 0; u < UNROLL; u++) {
                    dots[u] += __shfl_xor_sync(0xffffffffu, dots[u], off);
                }
            }
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                if (j0 + u < n && ((bits >> (j0 + u)) & 1u)) {
                    const float m_new = fmaxf(m, dots[u]);
                    const float factor = exp2f(m - m_new);
                    const float p = exp2f(dots[u] - m_new);
                    l = l * factor + p;
#pragma unroll
                    for (int i = 0; i < VPT; i++) {
                        o[i] = o[i] * factor + p * vals[u][i];
                    }
                    m = m_new;
                }
            }
        }
    }
    __shared__ float warp_max[WARPS];
    __shared__ float warp_sum[WARPS];
    __shared__ float warp_out[WARPS][D];
    if (lane == 0) {
        warp_max[warp] = m;
        warp_sum[warp] = l;
    }
    for (int i = 0; i < VPT; i++) {
        warp_out[warp][lane * VPT + i] = o[i];
    }
    __syncthreads();
    if (threadIdx.x < D) {
        float top = APPLIANCE_NEG_INF;
        for (int w = 0; w < WARPS; w++) {
            top = fmaxf(top, warp_max[w]);
        }
        float total = 0.0f;
        float acc = 0.0f;
        for (int w = 0; w < WARPS; w++) {
            if (warp_max[w] != APPLIANCE_NEG_INF) {
                const float f = exp2f(warp_max[w] - top);
                total += warp_sum[w] * f;
                acc += warp_out[w][threadIdx.x] * f;
            }
        }
        out[(b * n_q + h) * D + threadIdx.x] = appliance_from_float<T>(total > 0.0f ? acc / total : 0.0f);
    }
"""
_DECODE_HEAD_SIZES = (32, 64, 96, 128, 256)  # a multiple of the warp's 32 lanes
_decode: dict[str, Any] = {"kernel": None, "scales": {}}


def masked_decode_attention(q: Any, k: Any, v: Any, scale: float, mask: Any) -> Any:
    """softmax(q k^T * scale, masked) v for one query per row on CUDA, in one kernel launch.
    q: (B, Hq, 1, D); k, v: (B, Hkv, S, D) with Hq a multiple of Hkv; mask: boolean, (B or 1,
    Hq or 1, 1, S). Callers check `decode_kernel_fits` first."""
    import mlx.core as mx

    kernel = _decode["kernel"]
    if kernel is None:
        kernel = _decode["kernel"] = mx.fast.cuda_kernel(
            name="appliance_masked_decode_attention",
            input_names=["q", "k", "v", "mask", "scale"],
            output_names=["out"],
            source=_DECODE_SOURCE,
            header=_DECODE_HEADER,
            ensure_row_contiguous=False,
        )
    scale_array = _decode["scales"].get(scale)
    if scale_array is None:
        scale_array = _decode["scales"][scale] = mx.array([scale], dtype=mx.float32)
    b, n_q, _, d = q.shape
    return kernel(
        inputs=[q, k, v, mask, scale_array],
        template=[("T", q.dtype), ("D", d), ("WARPS", _DECODE_WARPS), ("UNROLL", _DECODE_UNROLL)],
        grid=(32 * _DECODE_WARPS * n_q, b, 1),
        threadgroup=(32 * _DECODE_WARPS, 1, 1),
        output_shapes=[(b, n_q, 1, d)],
        output_dtypes=[q.dtype],
    )[0]


def decode_kernel_fits(q: Any, k: Any, v: Any, mask: Any) -> bool:
    """Whether masked_decode_attention takes these: one query, a boolean mask over the keys, a head
    size the warps split evenly, grouped-query heads, float types."""
    import mlx.core as mx

    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or q.shape[2] != 1:
        return False
    b, n_q, _, d = q.shape
    n_kv = k.shape[1]
    return (
        isinstance(mask, mx.array)
        and mask.dtype == mx.bool_
        and mask.ndim == 4
        and mask.shape[2] == 1
        and mask.shape[3] == k.shape[2]
        and mask.shape[0] in (1, b)
        and mask.shape[1] in (1, n_q)
        and d in _DECODE_HEAD_SIZES
        and k.shape[0] == b
        and k.shape == v.shape
        and k.shape[-1] == d
        and n_kv > 0
        and n_q % n_kv == 0
        and q.dtype in (mx.bfloat16, mx.float16, mx.float32)
    )


def _routed(q: Any, k: Any, v: Any, *args: Any, scale: float, mask: Any = None,
            sinks: Optional[Any] = None, **kwargs: Any) -> Any:
    original = _state["original"]
    if sinks is None and not args and not kwargs:
        length = q.shape[-2]
        if length == 1:
            if mask is not None and _state["decode_kernel"] and decode_kernel_fits(q, k, v, mask):
                return masked_decode_attention(q, k, v, scale, mask)
        elif q.shape[0] * q.shape[1] * length * k.shape[-2] <= _state["max_elements"]:
            return unfused_attention(q, k, v, scale, mask)
    return original(q, k, v, *args, scale=scale, mask=mask, sinks=sinks, **kwargs)


def install(max_elements: int, decode_kernel: bool = False) -> bool:
    """Route short prefill attention around cuDNN, and masked decode attention through
    masked_decode_attention, on CUDA (idempotent; the last call's settings win). Returns whether
    either is in force (False off CUDA, or with max_elements 0 and decode_kernel off)."""
    from .memory import on_cuda

    if (max_elements <= 0 and not decode_kernel) or not on_cuda():
        return False
    import mlx.core as mx

    if _state["original"] is None:
        _state["original"] = mx.fast.scaled_dot_product_attention
        mx.fast.scaled_dot_product_attention = _routed
    _state["max_elements"] = max(0, max_elements)
    _state["decode_kernel"] = decode_kernel
    return True
