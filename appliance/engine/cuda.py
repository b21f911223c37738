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

_state: dict[str, Any] = {"original": None, "max_elements": 0}


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


def _routed(q: Any, k: Any, v: Any, *args: Any, scale: float, mask: Any = None,
            sinks: Optional[Any] = None, **kwargs: Any) -> Any:
    original = _state["original"]
    length = q.shape[-2]
    if (
        length > 1
        and sinks is None
        and not args
        and not kwargs
        and q.shape[0] * q.shape[1] * length * k.shape[-2] <= _state["max_elements"]
    ):
        return unfused_attention(q, k, v, scale, mask)
    return original(q, k, v, *args, scale=scale, mask=mask, sinks=sinks, **kwargs)


def install(max_elements: int) -> bool:
    """Route short prefill attention around cuDNN on CUDA (idempotent; the last limit wins).
    Returns whether it is in force (False off CUDA or with max_elements 0)."""
    from .memory import on_cuda

    if max_elements <= 0 or not on_cuda():
        return False
    import mlx.core as mx

    if _state["original"] is None:
        _state["original"] = mx.fast.scaled_dot_product_attention
        mx.fast.scaled_dot_product_attention = _routed
    _state["max_elements"] = max_elements
    return True
