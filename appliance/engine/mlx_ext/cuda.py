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
# q, k and v are read through their strides, so the cache's views are not copied. Where few
# blocks would each walk many keys, the keys are split into runs across the grid's z (split-K,
# as flash-decoding does): each block writes its run's softmax state, and a second kernel merges
# the runs (_decode_splits).
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
    // This block's part of the keys: all of them, or one of gridDim.z runs of whole 32-key
    // groups (split-K: the last runs may be empty, and give an empty state).
    const int split = blockIdx.z;
    const int per_split = ((n_keys + gridDim.z - 1) / gridDim.z + 31) & ~31;
    const int split_first = min(n_keys, split * per_split);
    const int split_last = min(n_keys, split_first + per_split);
    const int per_warp = (split_last - split_first + WARPS - 1) / WARPS;
    const int first = split_first + warp * per_warp;
    const int last = min(split_last, first + per_warp);
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
        APPLIANCE_DECODE_RESULT
    }
"""
# A whole key range: the block writes the normalised result.
_DECODE_FINAL = """out[(b * n_q + n_q_first + g) * D + e] =
            appliance_from_float<T>(total > 0.0f ? acc / total : 0.0f);"""
# One of gridDim.z runs of the keys: the block writes its unnormalised state (its running max in
# log2 units, its sum of weights, its weighted values), which _DECODE_MERGE_SOURCE combines.
_DECODE_PARTIAL = """const size_t at = (size_t)(b * n_q + n_q_first + g) * gridDim.z + split;
        part_o[at * D + e] = acc;
        if (e == 0) {
            part_ml[at * 2] = top;
            part_ml[at * 2 + 1] = total;
        }"""
# The runs' states of one (row, query head) into its result: a block of D threads per pair.
_DECODE_MERGE_SOURCE = """
    const int e = threadIdx.x;
    const size_t bh = blockIdx.y;
    const int splits = part_ml_shape[2];
    const int d = part_o_shape[3];
    const float* ml = part_ml + bh * splits * 2;
    const float* po = part_o + bh * splits * d + e;
    float top = APPLIANCE_NEG_INF;
    for (int s = 0; s < splits; s++) {
        top = fmaxf(top, ml[2 * s]);
    }
    float total = 0.0f;
    float acc = 0.0f;
    if (top != APPLIANCE_NEG_INF) {
        for (int s = 0; s < splits; s++) {
            const float f = exp2f(ml[2 * s] - top);
            total += ml[2 * s + 1] * f;
            acc += po[s * d] * f;
        }
    }
    out[bh * d + e] = appliance_from_float<T>(total > 0.0f ? acc / total : 0.0f);
"""
_DECODE_HEAD_SIZES = (32, 64, 128, 256)  # D / 8 lanes a key must divide the warp's 32
_DECODE_UNROLL = 2
_DECODE_SHARED_FLOATS = 10 * 1024  # the per-warp results in shared memory: 40 of its 48 KB
_DECODE_MAX_GROUP = 8  # query heads a KV head (each holds 16 floats a lane in registers)
_DECODE_LAYOUT = "auto"  # or "grouped" / "per-head" (see _heads_per_block), for measuring
_DECODE_SPLITS: Optional[int] = None  # runs of the keys (1: whole) instead of _decode_splits's
# A chunk of at most this many queries of one row (a prompt prefilled a few tokens a step beside
# decoding streams) goes through the decode kernel as that many rows of one query (0: never;
# see _chunk_as_rows)
_DECODE_CHUNK_QUERIES = 4
# "kernels": the compiled kernels by name (see _decode_kernel); "seen": the (dtype, head size,
# query heads, KV heads) decode attention has run with; "built": the templates (dtype, head size,
# heads a block, split or not) compiled in this process
_decode: dict[str, Any] = {"kernels": {}, "scales": {}, "seen": set(), "built": set()}


def _decode_warps(heads: int, d: int) -> int:
    """Warps a block serving `heads` query heads of size `d`: 8, or 4 where 8 warps' results would
    not fit in shared memory (at most 8 heads of size 256 always fit in 4)."""
    return 8 if 8 * heads * d <= _DECODE_SHARED_FLOATS else 4


def _heads_per_block(batch: int, n_kv: int, group: int, n_keys: int, split: bool) -> int:
    """Query heads one block serves: all `group` sharing a KV head, each key loaded once for them;
    or, with the keys whole, one, for more blocks, where few rows attend to many keys (64 or
    fewer (row, KV head) pairs over 1,024 keys or more: 16 chained calls at 1-8 rows x 2,048
    keys took 1.1-1.4 ms against 1.5-1.7 grouped, on an H100; grouped was as fast or faster
    everywhere else measured, and with the keys split)."""
    if _DECODE_LAYOUT == "grouped":
        return group
    if _DECODE_LAYOUT == "per-head":
        return 1
    return 1 if not split and batch * n_kv <= 64 and n_keys >= 1024 else group


def _decode_splits(batch: int, n_q: int, n_kv: int, n_keys: int) -> int:
    """Runs the keys are split into (1: whole). Walking all the keys, each block goes through
    them one group after another, and few rows over a long context leave most of the card idle:
    3 padded rows over 16k keys made a decode step of the 1B model 13.5 ms, against 5.2 ms for
    a lone row through MLX's own split kernel (H100). Split, a block per KV head (its query
    heads sharing each load) beat a block per query head. From 16 layers' calls on an H100
    (`decode_kernel_tune long`; 32 query heads, 8 KV heads): at 1-8 rows over 8k-32k keys the
    best runs held about 1,024 keys each (1 row over 16k: 1.5 ms against 7.9 whole; 3 rows
    1.0-2.1x faster, 8 rows 1.3-1.8x), and at least 64 blocks in all; over 2k keys splitting
    paid only where 128 or fewer (row, query head) pairs would run (8 rows: 1.8 ms split, 1.5
    whole); with 256 (row, KV head) blocks or more the keys stay whole."""
    if _DECODE_SPLITS:
        return _DECODE_SPLITS
    blocks = batch * n_kv
    if blocks >= 256 or n_keys < 512 or (n_keys < 4096 and batch * n_q > 128):
        return 1
    return max(1, min(n_keys // 256, max(n_keys // 1024, -(-64 // blocks))))


def _decode_kernel(name: str) -> Any:
    """One of the decode kernels, made once: "final" (each block over all the keys writes the
    result), "partial" (each block over one run of the keys writes its softmax state) and
    "merge" (the runs' states into the result)."""
    kernel = _decode["kernels"].get(name)
    if kernel is None:
        import mlx.core as mx

        if name == "merge":
            inputs, outputs, source = ["part_o", "part_ml"], ["out"], _DECODE_MERGE_SOURCE
        else:
            result = _DECODE_FINAL if name == "final" else _DECODE_PARTIAL
            inputs = ["q", "k", "v", "mask", "scale"]
            outputs = ["out"] if name == "final" else ["part_o", "part_ml"]
            source = _DECODE_SOURCE.replace("APPLIANCE_DECODE_RESULT", result)
        kernel = _decode["kernels"][name] = mx.fast.cuda_kernel(
            name=f"appliance_decode_attention_{name}",
            input_names=inputs,
            output_names=outputs,
            source=source,
            header=_DECODE_HEADER,
            ensure_row_contiguous=False,
        )
    return kernel


def masked_decode_attention(
    q: Any,
    k: Any,
    v: Any,
    scale: float,
    mask: Any,
    heads: Optional[int] = None,
    splits: Optional[int] = None,
) -> Any:
    """softmax(q k^T * scale, masked) v for one query per row on CUDA: one kernel launch, or two
    where the keys are split into runs (the runs, then their merge). q: (B, Hq, 1, D); k, v: (B,
    Hkv, S, D) with Hq a multiple of Hkv; mask: boolean, (B or 1, 1, 1, S). Callers check
    `decode_kernel_fits` first. A row with no key unmasked gets zeros (MLX's attention gives the
    mean of its values); mlx-lm's caches always leave a row its own token. `heads`: query heads a
    block serves, if not _heads_per_block's choice; `splits`: runs of the keys, if not
    _decode_splits's."""
    import mlx.core as mx

    scale_array = _decode["scales"].get(scale)
    if scale_array is None:
        scale_array = _decode["scales"][scale] = mx.array([scale], dtype=mx.float32)
    b, n_q, _, d = q.shape
    n_kv = k.shape[1]
    n_keys = k.shape[2]
    splits = splits or _decode_splits(b, n_q, n_kv, n_keys)
    if not heads:
        heads = _heads_per_block(b, n_kv, n_q // n_kv, n_keys, split=splits > 1)
    warps = _decode_warps(heads, d)
    _decode["seen"].add((q.dtype, d, n_q, n_kv))
    _decode["built"].add((q.dtype, d, heads, splits > 1))
    template = [
        ("T", q.dtype),
        ("D", d),
        ("G", heads),
        ("WARPS", warps),
        ("UNROLL", _DECODE_UNROLL),
    ]
    launch = {
        "inputs": [q, k, v, mask, scale_array],
        "template": template,
        "grid": (32 * warps * (n_q // heads), b, splits),
        "threadgroup": (32 * warps, 1, 1),
    }
    if splits == 1:
        return _decode_kernel("final")(
            **launch, output_shapes=[(b, n_q, 1, d)], output_dtypes=[q.dtype]
        )[0]
    part_o, part_ml = _decode_kernel("partial")(
        **launch,
        output_shapes=[(b, n_q, splits, d), (b, n_q, splits, 2)],
        output_dtypes=[mx.float32, mx.float32],
    )
    return _decode_kernel("merge")(
        inputs=[part_o, part_ml],
        template=[("T", q.dtype)],
        grid=(d, b * n_q, 1),
        threadgroup=(d, 1, 1),
        output_shapes=[(b, n_q, 1, d)],
        output_dtypes=[q.dtype],
    )[0]


def build_decode_layouts() -> int:
    """Compile, on tiny inputs, every template of masked_decode_attention that _heads_per_block
    and _decode_splits may choose (the keys whole, a block per KV head or per query head; split
    into runs, a block per KV head, with the merge), for the head configurations it has run with
    (the worker calls this after its warm-up). MLX compiles a custom kernel the first time each
    template is used, in every process (it keeps its own kernels on disk, not custom ones): on
    an H100 that was a 1.3 s decode step in the middle of serving, the first one of a few rows
    over 1,024 keys or more, which the warm-up's short prompts never reach. Returns how many it
    compiled."""
    import mlx.core as mx

    todo = []
    for dtype, d, n_q, n_kv in sorted(_decode["seen"], key=str):
        group = n_q // n_kv
        for heads, split in sorted({(group, False), (1, False), (group, True)}):
            if (dtype, d, heads, split) not in _decode["built"]:
                q = mx.zeros((1, n_q, 1, d), dtype=dtype)
                kv = mx.zeros((1, n_kv, 4, d), dtype=dtype)
                mask = mx.ones((1, 1, 1, 4), dtype=mx.bool_)
                splits = 2 if split else 1
                todo.append(
                    masked_decode_attention(q, kv, kv, 1.0, mask, heads=heads, splits=splits)
                )
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


def _chunk_as_rows(q: Any, k: Any, v: Any, scale: float, mask: Any) -> Any:
    """A short chunk of one row's queries, q (1, Hq, L, D) over k, v (1, Hkv, S, D), through
    masked_decode_attention as L rows of one query each: q's views swapped, the same keys and
    values for every row (broadcast, not copied), each row its query's line of the causal mask.
    MLX's path for a few queries over a long cached prefix is a matmul, the mask, a softmax and
    a matmul, each over all the keys. On an H100 (1B shape, `chunk_step`, 18,000 cached, one
    decoding row) a step with a chunk of 2 took 8.4 ms this way against 9.9, one of 4 9.6 against
    9.4; chunks of 8 and 16 were slower (every row walks all the keys: 13.2 and 15.2 ms against
    8.2 and 9.0 for the chunk alone), hence _DECODE_CHUNK_QUERIES. None where the mask is not
    one this takes (boolean, or "causal")."""
    import mlx.core as mx

    length, n_keys = q.shape[2], k.shape[2]
    if isinstance(mask, str):
        if mask != "causal":
            return None
        mask = mx.arange(n_keys - length, n_keys)[:, None] >= mx.arange(n_keys)[None]
    elif not (isinstance(mask, mx.array) and mask.ndim == 4 and mask.shape[:3] == (1, 1, length)):
        return None
    else:
        mask = mask[0, 0]
    rows_q = mx.expand_dims(mx.swapaxes(q[0], 0, 1), 2)  # (L, Hq, 1, D)
    rows_k = mx.broadcast_to(k, (length, *k.shape[1:]))
    rows_v = mx.broadcast_to(v, (length, *v.shape[1:]))
    rows_mask = mx.expand_dims(mask, (1, 2))  # (L, 1, 1, S)
    if not decode_kernel_fits(rows_q, rows_k, rows_v, rows_mask):
        return None
    out = masked_decode_attention(rows_q, rows_k, rows_v, scale, rows_mask)
    return mx.expand_dims(mx.swapaxes(out[:, :, 0, :], 0, 1), 0)


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
            if (
                _state["decode_kernel"]
                and length <= _DECODE_CHUNK_QUERIES
                and q.shape[0] == 1
                and q.ndim == 4
                and k.ndim == 4
            ):
                out = _chunk_as_rows(q, k, v, scale, mask)
                if out is not None:
                    return out
            if q.shape[0] * q.shape[1] * length * k.shape[-2] <= _state["max_elements"]:
                return unfused_attention(q, k, v, scale, mask)
    return original(q, k, v, *args, scale=scale, mask=mask, sinks=sinks, **kwargs)


def probe_decode_kernel() -> Optional[str]:
    """Run masked_decode_attention on small padded inputs (bf16, 4 query heads a KV head, head
    size 64), whole and split into runs, against MLX's attention in float32: None when it
    agrees, else why not (it could not be compiled, e.g. no CUDA headers for MLX's JIT, or an
    MLX whose custom kernels behave otherwise). Kept after the first call."""
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
        for splits in (1, 3):  # whole, then in runs (the last one empty)
            got = masked_decode_attention(q, k, v, 0.125, mask, splits=splits)
            off = float(cast(float, mx.max(mx.abs(got.astype(mx.float32) - want)).item()))
            if not off <= 2.0**-6:
                runs = f" in {splits} runs of its keys" if splits > 1 else ""
                reason = f"its output{runs} differs from MLX's attention by {off:.3g}"
                break
    except Exception as exc:  # compile or launch failure: MLX's own path still works
        reason = f"{type(exc).__name__}: {str(exc)[:300]}"
    _decode["probe"] = reason
    _decode["seen"].clear()  # the probe's heads are not a model's
    return reason


def install(max_elements: int, decode_kernel: bool = False) -> bool:
    """Route short prefill attention around cuDNN, and masked decode attention (and a short
    chunk of one row's queries, _chunk_as_rows) through masked_decode_attention, on CUDA
    (idempotent; the last call's settings win). The decode kernel is checked once first
    (probe_decode_kernel); if it fails, a warning says why and decode attention stays MLX's.
    Returns whether either is in force (False off CUDA, or with max_elements 0 and no decode
    kernel); `decode_kernel_in_force()` tells which."""
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
