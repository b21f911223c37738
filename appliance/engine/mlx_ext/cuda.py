"""CUDA attention: short prefills without cuDNN's graphs, padded decode steps in one kernel.

MLX's CUDA backend runs attention with more than one query per sequence (a prefill) through a
cuDNN graph built for each exact shape (batch, heads, query and key lengths) and kept in an LRU
cache. Building one costs about 40 ms (measured on an H200: 43 ms the first time a shape is
seen, 0.2-0.5 ms after). Under continuous batching every join brings a new shape (how many
prompts arrived together, how long the longest is), so each join paid that and stalled every
running stream; the cache also counts misses, and MLX aborts once they pass twice its capacity
(MLX_CUDA_SDPA_CACHE_SIZE).

`install(max_elements, decode_kernel)` routes attention whose score matrix has at most
`max_elements` entries (batch x query heads x query length x key length) through plain matmul +
softmax, the same arithmetic as mlx-lm's quantized-cache attention, in runs of queries of at most
UNFUSED_BLOCK scores (bounded memory); larger ones (very long contexts, where one graph build is
small beside the chunk's attention) keep cuDNN. A prompt that continues a cached prefix brings a
new key length with every chunk, so through cuDNN each chunk paid a graph build: on an H100 with
the 1B shape, 8,000 new tokens after 6,000 cached took 1.6-1.7 s through cuDNN against 0.44 s
unfused in 2,048-token chunks (`benchmarks/accelerator/prefill_anatomy.py`).

Decode steps (one query) without a mask keep MLX's own vector kernel; with the boolean mask of a
batch whose rows are padded (which MLX's vector kernel does not take) they go through this
module's own kernel, `masked_decode_attention`, when `decode_kernel` is on and the kernel passed
a check against MLX at install. Only on CUDA; Metal and CPU are not patched.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Optional, cast

log = logging.getLogger(__name__)

# MLX's CUDA backend keeps cuDNN attention graphs, CUDA graphs, conv plans and FFT plans in LRU
# caches, and by default raises "Cache thrashing is happening" once a cache's lifetime misses
# pass twice its capacity (MLX_CUDA_*_CACHE_SIZE). The count never resets, so a server that keeps
# seeing new shapes would fail a request after enough hours: the LRU caches evict and keep
# working with the check off.
# CUDA graphs (MLX's default: on) off: a decode step replayed through MLX's CUDA graphs took 3.0
# or 4.8-5.2 ms at batch 1 and 5.1-7.9 ms at batch 64 depending on the process (an H100, 13
# processes, benchmarks/accelerator/decode_modes.py), launched kernel by kernel 3.3-3.5 and 4.4-4.9
# ms in every process; over HTTP, servers in turn at 32 and 64 clients made 1.2-1.5x the tokens/s
# with them off (benchmarks/accelerator/server_ab.sh). Set before MLX builds any cache; an
# operator's own value wins.
MLX_ENV_DEFAULTS = {"MLX_ENABLE_CACHE_THRASHING_CHECK": "0", "MLX_USE_CUDA_GRAPHS": "0"}


@functools.cache
def on_cuda() -> bool:
    """Whether MLX computes on an NVIDIA GPU here (read once)."""
    try:
        import mlx.core as mx

        return bool(mx.default_device() == mx.gpu and mx.cuda.is_available())
    except Exception:  # no MLX backend, or an MLX without the CUDA module
        return False


def mlx_env_defaults() -> None:
    """Put MLX_ENV_DEFAULTS into this process's environment where not already set (and so into
    the engine processes and ranks it starts)."""
    for key, value in MLX_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


TARGETS = "mlx 0.32 (mx.fast.scaled_dot_product_attention, mx.fast.cuda_kernel)"


def usable() -> bool:
    """Whether MLX has the attention function this module routes and the kernel API it uses."""
    try:
        import mlx.core as mx
    except Exception:
        return False
    return hasattr(mx.fast, "scaled_dot_product_attention") and hasattr(mx.fast, "cuda_kernel")


_state: dict[str, Any] = {"original": None, "max_elements": 0, "decode_kernel": False}


# The most scores one piece of the unfused attention holds (2 GiB in bf16): longer inputs go in
# runs of queries, so at the default bound of 2^31 scores (a 2048-token chunk against 32k keys
# with 32 heads) 2 GiB of scores are held at a time, not 4. Not smaller: each piece costs
# launches and copies, and on an H200 with the 1B shape pieces of 2^27 scores made 8,000 tokens
# after 6,000 cached take 0.72-0.78 s instead of 0.44-0.49.
UNFUSED_BLOCK = 1 << 30


def unfused_attention(
    q: Any, k: Any, v: Any, scale: float, mask: Any, block: Optional[int] = None
) -> Any:
    """softmax(q k^T * scale + mask) v with grouped-query heads, in q's dtype (precise softmax),
    in runs of queries of at most `block` (UNFUSED_BLOCK) scores each."""
    import mlx.core as mx

    block = block or UNFUSED_BLOCK
    b, n_q, length, _ = q.shape
    k_len = k.shape[-2]
    rows = max(1, block // max(1, b * n_q * k_len))
    if length <= rows:
        return _unfused(q, k, v, scale, mask)
    parts = []
    for start in range(0, length, rows):
        end = min(length, start + rows)
        m = mask
        if isinstance(mask, str):  # "causal": the queries are the last `length` positions
            first = k_len - length
            m = mx.arange(first + start, first + end)[:, None] >= mx.arange(k_len)[None]
        elif mask is not None and mask.ndim >= 2 and mask.shape[-2] == length:
            m = mask[..., start:end, :]
        parts.append(_unfused(q[..., start:end, :], k, v, scale, m))
    return mx.concatenate(parts, axis=-2)


def _unfused(q: Any, k: Any, v: Any, scale: float, mask: Any) -> Any:
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
# matmul, where, softmax and matmul, four launches and a score matrix per layer. This kernel does
# it in one pass. One block per (row, KV head) serves all the query heads that share that KV head
# (grouped-query attention), so each key and value is loaded once for all of them (or, where few
# rows attend to many keys, one block per query head, for more blocks: _heads_per_block). A warp
# takes a contiguous run of keys, 32 at a time: its lanes read those 32 mask entries together and
# a ballot makes them a bit mask, so a group that is all padding costs no loads. Within a group
# the warp works on 32 / (D / 8) keys at once, each by D / 8 lanes holding 8 elements (one 16-byte
# load where the cache's rows allow it), with an online softmax per lane group and query head;
# the partial results merge through shuffles within the warp and shared memory across warps.
# q, k and v are read through their strides, so the cache's views are not copied.
_DECODE_HEADER = """
#define APPLIANCE_NEG_INF __int_as_float(0xff800000)
__device__ inline float appliance_to_float(float x) { return x; }
__device__ inline float appliance_to_float(__half x) { return __half2float(x); }
__device__ inline float appliance_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ inline T appliance_from_float(float x);
template <> __device__ inline float appliance_from_float<float>(float x) { return x; }
template <> __device__ inline __half appliance_from_float<__half>(float x) {
    return __float2half(x);
}
template <> __device__ inline __nv_bfloat16 appliance_from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}
// Eight elements from p as floats: 16-byte loads when `packed` (contiguous and aligned), else
// eight strided ones.
template <typename T>
__device__ inline void appliance_load8(const T* p, int step, bool packed, float* out) {
    if (packed) {
        constexpr int N = 8 * sizeof(T) / 16;
        uint4 raw[N];
#pragma unroll
        for (int n = 0; n < N; n++) {
            raw[n] = reinterpret_cast<const uint4*>(p)[n];
        }
        const T* e = reinterpret_cast<const T*>(raw);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            out[i] = appliance_to_float(e[i]);
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; i++) {
            out[i] = appliance_to_float(p[i * step]);
        }
    }
}
// Merge the online-softmax state (m, l, o) of another part of the keys into this one.
__device__ inline void appliance_merge(float& m, float& l, float* o, float m2, float l2,
                                       const float* o2) {
    const float top = fmaxf(m, m2);
    if (top == APPLIANCE_NEG_INF) {
        return;
    }
    const float a = exp2f(m - top);
    const float c = exp2f(m2 - top);
    l = l * a + l2 * c;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        o[i] = o[i] * a + o2[i] * c;
    }
    m = top;
}
"""
_DECODE_SOURCE = """
    constexpr int LPK = D / 8;     // lanes per key
    constexpr int KPW = 32 / LPK;  // keys a warp works on at once
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int sub = lane / LPK;
    const int part = lane % LPK;
    const int n_q_first = blockIdx.x * G;  // this block's query heads: G of them from here
    const int b = blockIdx.y;
    const int n_q = q_shape[1];
    const int kv_h = n_q_first / (n_q / k_shape[1]);
    const int n_keys = k_shape[2];
    // 64-bit offsets to this row and head, 32-bit ones within it (one head's keys stay far below
    // 2^31 elements).
    const T* kp = k + b * k_strides[0] + kv_h * k_strides[1] + part * 8 * k_strides[3];
    const T* vp = v + b * v_strides[0] + kv_h * v_strides[1] + part * 8 * v_strides[3];
    const bool* mp = mask + (mask_shape[0] == 1 ? 0 : b * mask_strides[0]);
    const int k_row = k_strides[2];
    const int v_row = v_strides[2];
    const int k_step = k_strides[3];
    const int v_step = v_strides[3];
    const int m_step = mask_strides[3];
    const bool k_packed = k_step == 1 && k_row % 8 == 0 && (reinterpret_cast<size_t>(kp) & 15) == 0;
    const bool v_packed = v_step == 1 && v_row % 8 == 0 && (reinterpret_cast<size_t>(vp) & 15) == 0;
    const float scale_log2 = scale[0] * 1.44269504088896340736f;
    float qr[G][8];
    float o[G][8];
    float m[G];
    float l[G];
#pragma unroll
    for (int g = 0; g < G; g++) {
        const T* qp = q + b * q_strides[0] + (n_q_first + g) * q_strides[1];
#pragma unroll
        for (int i = 0; i < 8; i++) {
            qr[g][i] = scale_log2 * appliance_to_float(qp[(part * 8 + i) * q_strides[3]]);
            o[g][i] = 0.0f;
        }
        m[g] = APPLIANCE_NEG_INF;
        l[g] = 0.0f;
    }
    const int per_warp = (n_keys + WARPS - 1) / WARPS;
    const int first = warp * per_warp;
    const int last = min(n_keys, first + per_warp);
    for (int base = first; base < last; base += 32) {
        const int mine = base + lane;
        const unsigned bits = __ballot_sync(0xffffffffu, mine < last && mp[mine * m_step]);
        if (bits == 0u) {
            continue;
        }
        const int n = min(32, last - base);
        for (int j0 = 0; j0 < n; j0 += KPW * UNROLL) {
            float kf[UNROLL][8];
            float vf[UNROLL][8];
            bool keep[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
                const int j = j0 + u * KPW + sub;
                keep[u] = j < n && ((bits >> j) & 1u);
                const int at = base + (j < n ? j : 0);
                appliance_load8(kp + at * k_row, k_step, k_packed, kf[u]);
                appliance_load8(vp + at * v_row, v_step, v_packed, vf[u]);
            }
#pragma unroll
            for (int u = 0; u < UNROLL; u++) {
#pragma unroll
                for (int g = 0; g < G; g++) {
                    float dot = 0.0f;
#pragma unroll
                    for (int i = 0; i < 8; i++) {
                        dot += qr[g][i] * kf[u][i];
                    }
#pragma unroll
                    for (int off = LPK / 2; off > 0; off >>= 1) {
                        dot += __shfl_xor_sync(0xffffffffu, dot, off);
                    }
                    if (keep[u]) {
                        const float m_new = fmaxf(m[g], dot);
                        const float factor = exp2f(m[g] - m_new);
                        const float p = exp2f(dot - m_new);
                        l[g] = l[g] * factor + p;
#pragma unroll
                        for (int i = 0; i < 8; i++) {
                            o[g][i] = o[g][i] * factor + p * vf[u][i];
                        }
                        m[g] = m_new;
                    }
                }
            }
        }
    }
    // The warp's KPW lane groups hold states over different keys: merge them (every group ends up
    // with the whole warp's), then across warps through shared memory.
#pragma unroll
    for (int off = LPK; off < 32; off <<= 1) {
#pragma unroll
        for (int g = 0; g < G; g++) {
            float o2[8];
#pragma unroll
            for (int i = 0; i < 8; i++) {
                o2[i] = __shfl_xor_sync(0xffffffffu, o[g][i], off);
            }
            const float m2 = __shfl_xor_sync(0xffffffffu, m[g], off);
            const float l2 = __shfl_xor_sync(0xffffffffu, l[g], off);
            appliance_merge(m[g], l[g], o[g], m2, l2, o2);
        }
    }
    __shared__ float warp_max[WARPS][G];
    __shared__ float warp_sum[WARPS][G];
    __shared__ float warp_out[WARPS][G][D];
    if (sub == 0) {
#pragma unroll
        for (int g = 0; g < G; g++) {
            if (part == 0) {
                warp_max[warp][g] = m[g];
                warp_sum[warp][g] = l[g];
            }
#pragma unroll
            for (int i = 0; i < 8; i++) {
                warp_out[warp][g][part * 8 + i] = o[g][i];
            }
        }
    }
    __syncthreads();
    for (int t = threadIdx.x; t < G * D; t += WARPS * 32) {
        const int g = t / D;
        const int e = t % D;
        float top = APPLIANCE_NEG_INF;
        for (int w = 0; w < WARPS; w++) {
            top = fmaxf(top, warp_max[w][g]);
        }
        float total = 0.0f;
        float acc = 0.0f;
        if (top != APPLIANCE_NEG_INF) {
            for (int w = 0; w < WARPS; w++) {
                const float f = exp2f(warp_max[w][g] - top);
                total += warp_sum[w][g] * f;
                acc += warp_out[w][g][e] * f;
            }
        }
        out[(b * n_q + n_q_first + g) * D + e] =
            appliance_from_float<T>(total > 0.0f ? acc / total : 0.0f);
    }
"""
_DECODE_HEAD_SIZES = (32, 64, 128, 256)  # D / 8 lanes a key must divide the warp's 32
_DECODE_UNROLL = 2
_DECODE_SHARED_FLOATS = 10 * 1024  # the per-warp results in shared memory: 40 of its 48 KB
_DECODE_MAX_GROUP = 8  # query heads a KV head (each holds 16 floats a lane in registers)
_DECODE_LAYOUT = "auto"  # or "grouped" / "per-head" (see _heads_per_block), for measuring
# "seen": the (dtype, head size, query heads, KV heads) decode attention has run with; "built":
# the kernel's templates (dtype, head size, heads a block) compiled in this process
_decode: dict[str, Any] = {"kernel": None, "scales": {}, "seen": set(), "built": set()}


def _decode_warps(heads: int, d: int) -> int:
    """Warps a block serving `heads` query heads of size `d`: 8, or 4 where 8 warps' results would
    not fit in shared memory (at most 8 heads of size 256 always fit in 4)."""
    return 8 if 8 * heads * d <= _DECODE_SHARED_FLOATS else 4


def _heads_per_block(batch: int, n_kv: int, group: int, n_keys: int) -> int:
    """Query heads one block serves: all `group` sharing a KV head, each key loaded once for them;
    or one, for more blocks, where few rows attend to many keys (64 or fewer (row, KV head) pairs
    over 1,024 keys or more: 16 chained calls at 1-8 rows x 2,048 keys took 1.1-1.4 ms against
    1.5-1.7 grouped, on an H100; grouped was as fast or faster everywhere else measured)."""
    if _DECODE_LAYOUT == "grouped":
        return group
    if _DECODE_LAYOUT == "per-head":
        return 1
    return 1 if batch * n_kv <= 64 and n_keys >= 1024 else group


def masked_decode_attention(
    q: Any, k: Any, v: Any, scale: float, mask: Any, heads: Optional[int] = None
) -> Any:
    """softmax(q k^T * scale, masked) v for one query per row on CUDA, in one kernel launch.
    q: (B, Hq, 1, D); k, v: (B, Hkv, S, D) with Hq a multiple of Hkv; mask: boolean, (B or 1, 1,
    1, S). Callers check `decode_kernel_fits` first. A row with no key unmasked gets zeros (MLX's
    attention gives the mean of its values); mlx-lm's caches always leave a row its own token.
    `heads`: query heads a block serves, if not _heads_per_block's choice."""
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
    n_kv = k.shape[1]
    heads = heads or _heads_per_block(b, n_kv, n_q // n_kv, k.shape[2])
    warps = _decode_warps(heads, d)
    _decode["seen"].add((q.dtype, d, n_q, n_kv))
    _decode["built"].add((q.dtype, d, heads))
    return kernel(
        inputs=[q, k, v, mask, scale_array],
        template=[
            ("T", q.dtype),
            ("D", d),
            ("G", heads),
            ("WARPS", warps),
            ("UNROLL", _DECODE_UNROLL),
        ],
        grid=(32 * warps * (n_q // heads), b, 1),
        threadgroup=(32 * warps, 1, 1),
        output_shapes=[(b, n_q, 1, d)],
        output_dtypes=[q.dtype],
    )[0]


def build_decode_layouts() -> int:
    """Compile, on tiny inputs, every template of masked_decode_attention that _heads_per_block
    may choose for the head configurations it has run with (the worker calls this after its
    warm-up). MLX compiles a custom kernel the first time each template is used, in every
    process (it keeps its own kernels on disk, not custom ones): on an H100 that was a 1.3 s
    decode step in the middle of serving, the first one of a few rows over 1,024 keys or more,
    which the warm-up's short prompts never reach. Returns how many it compiled."""
    import mlx.core as mx

    todo = []
    for dtype, d, n_q, n_kv in sorted(_decode["seen"], key=str):
        for heads in sorted({n_q // n_kv, 1}):
            if (dtype, d, heads) not in _decode["built"]:
                q = mx.zeros((1, n_q, 1, d), dtype=dtype)
                kv = mx.zeros((1, n_kv, 4, d), dtype=dtype)
                mask = mx.ones((1, 1, 1, 4), dtype=mx.bool_)
                todo.append(masked_decode_attention(q, kv, kv, 1.0, mask, heads=heads))
    mx.eval(todo)
    return len(todo)


def decode_kernel_fits(q: Any, k: Any, v: Any, mask: Any) -> bool:
    """Whether masked_decode_attention takes these: one query, one boolean mask over the keys for
    all heads, a head size of 32, 64, 128 or 256, at most 8 query heads a KV head, float types."""
    import mlx.core as mx

    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or q.shape[2] != 1:
        return False
    b, n_q, _, d = q.shape
    n_kv = k.shape[1]
    return (
        isinstance(mask, mx.array)
        and mask.dtype == mx.bool_
        and mask.ndim == 4
        and mask.shape[1] == 1
        and mask.shape[2] == 1
        and mask.shape[3] == k.shape[2]
        and mask.shape[0] in (1, b)
        and d in _DECODE_HEAD_SIZES
        and k.shape[0] == b
        and k.shape == v.shape
        and k.shape[-1] == d
        and n_kv > 0
        and n_q % n_kv == 0
        and n_q // n_kv <= _DECODE_MAX_GROUP
        and q.dtype in (mx.bfloat16, mx.float16, mx.float32)
        and k.dtype == q.dtype
        and v.dtype == q.dtype
    )


def _routed(
    q: Any,
    k: Any,
    v: Any,
    *args: Any,
    scale: float,
    mask: Any = None,
    sinks: Optional[Any] = None,
    **kwargs: Any,
) -> Any:
    original = _state["original"]
    if sinks is None and not args and not kwargs:
        length = q.shape[-2]
        if length == 1:
            if mask is not None and _state["decode_kernel"] and decode_kernel_fits(q, k, v, mask):
                return masked_decode_attention(q, k, v, scale, mask)
        elif length > 1:
            if q.shape[0] * q.shape[1] * length * k.shape[-2] <= _state["max_elements"]:
                return unfused_attention(q, k, v, scale, mask)
    return original(q, k, v, *args, scale=scale, mask=mask, sinks=sinks, **kwargs)


def probe_decode_kernel() -> Optional[str]:
    """Run masked_decode_attention once on small padded inputs (bf16, 4 query heads a KV head,
    head size 64) against MLX's attention in float32: None when it agrees, else why not (it could
    not be compiled, e.g. no CUDA headers for MLX's JIT, or an MLX whose custom kernels behave
    otherwise). Kept after the first call."""
    if "probe" in _decode:
        return cast(Optional[str], _decode["probe"])
    import mlx.core as mx

    reason: Optional[str] = None
    try:
        keys = mx.random.split(mx.random.key(0), 3)  # not the global seed, which sampling uses
        q = mx.random.normal((2, 8, 1, 64), key=keys[0]).astype(mx.bfloat16)
        k = mx.random.normal((2, 2, 40, 64), key=keys[1]).astype(mx.bfloat16)
        v = mx.random.normal((2, 2, 40, 64), key=keys[2]).astype(mx.bfloat16)
        mask = mx.expand_dims(mx.array([0, 33]), (1, 2, 3)) <= mx.arange(40)
        f32 = [x.astype(mx.float32) for x in (q, k, v)]
        want = (_state["original"] or mx.fast.scaled_dot_product_attention)(
            *f32, scale=0.125, mask=mask
        )
        got = masked_decode_attention(q, k, v, 0.125, mask).astype(mx.float32)
        off = float(cast(float, mx.max(mx.abs(got - want)).item()))
        if not off <= 2.0**-6:
            reason = f"its output differs from MLX's attention by {off:.3g}"
    except Exception as exc:  # compile or launch failure: MLX's own path still works
        reason = f"{type(exc).__name__}: {str(exc)[:300]}"
    _decode["probe"] = reason
    _decode["seen"].clear()  # the probe's heads are not a model's
    return reason


def install(max_elements: int, decode_kernel: bool = False) -> bool:
    """Route short prefill attention around cuDNN, and masked decode attention through
    masked_decode_attention, on CUDA (idempotent; the last call's settings win). The decode
    kernel is checked once first (probe_decode_kernel); if it fails, a warning says why and
    decode attention stays MLX's. Returns whether either is in force (False off CUDA, or with
    max_elements 0 and no decode kernel); `decode_kernel_in_force()` tells which."""
    _state["max_elements"] = max(0, max_elements)
    _state["decode_kernel"] = False
    if (max_elements <= 0 and not decode_kernel) or not on_cuda() or not usable():
        return False
    import mlx.core as mx

    if _state["original"] is None:
        _state["original"] = mx.fast.scaled_dot_product_attention
        mx.fast.scaled_dot_product_attention = _routed
    if decode_kernel:
        reason = probe_decode_kernel()
        if reason is None:
            _state["decode_kernel"] = True
        else:
            log.warning(
                "the CUDA decode attention kernel is off, MLX's attention runs instead: %s", reason
            )
    return max_elements > 0 or _state["decode_kernel"]


def decode_kernel_in_force() -> bool:
    """Whether padded decode steps go through masked_decode_attention (see install)."""
    return bool(_state["decode_kernel"]) and _state["original"] is not None
