"""The memory governor: admission by the KV-cache bytes a request will need.

A request reserves (prompt tokens + max_tokens) x the model's KV bytes per token when it is
admitted and gives them back when it ends. It starts only when that fits in what MLX may hold
(limits.mlx_memory_limit_bytes, else the machine's memory) less what is held now (weights,
prompt caches, the running sequences' keys and values) and what the running sequences will
still allocate. Before a request waits or is refused, prompt-cache entries are evicted (on each
model's generation thread) and MLX's buffer cache is freed. One that could not fit even alone
is an invalid request naming the field to lower.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import InvalidRequest
from .memory import free_bytes, mlx_active, total_bytes

log = logging.getLogger("appliance.engine")

QUANT_GROUP = 64  # mlx-lm's QuantizedKVCache group size: one scale and one bias per group
EVICT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class KVShape:
    """What one token's keys and values take: per layer, KV heads x head_dim values of
    `dtype_bytes` each, for the keys and again for the values."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int

    def bytes_per_token(self, kv_bits: Optional[int] = None) -> int:
        """Full precision, or quantized to `kv_bits` (packed values plus a scale and a bias
        in the model's dtype per group of QUANT_GROUP, as mlx-lm stores them)."""
        if kv_bits is None:
            per_head = self.head_dim * self.dtype_bytes
        else:
            groups = math.ceil(self.head_dim / QUANT_GROUP)
            per_head = math.ceil(self.head_dim * kv_bits / 8) + 2 * groups * self.dtype_bytes
        return 2 * self.layers * self.kv_heads * per_head


def kv_need(per_token: int, prompt_tokens: int, max_tokens: int) -> int:
    """Bytes of KV cache a request takes at its longest: its prompt and every token it may
    generate."""
    return per_token * (max(0, prompt_tokens) + max(0, max_tokens))


def weights_bytes(model: Any, tokenizer: Any) -> int:
    """Bytes of a loaded model's parameters (on its generation thread, through `call`)."""
    from mlx.utils import tree_flatten

    leaves: Any = tree_flatten(model.parameters())
    return int(sum(v.nbytes for _, v in leaves))


def trim_prompt_cache(cache: Any, n_bytes: int) -> int:
    """Evict least recently used prompt-cache entries until it holds at most n_bytes, then
    give MLX's freed buffers back; the bytes evicted. On the model's generation thread."""
    import mlx.core as mx

    before = int(cache.nbytes) if cache is not None else 0
    if cache is not None and before > n_bytes:
        cache.trim_to(n_bytes=max(0, n_bytes))
    mx.clear_cache()
    return before - (int(cache.nbytes) if cache is not None else 0)


def _trim_in_thread(cache: Any, n_bytes: int, model: Any, tokenizer: Any) -> int:
    return trim_prompt_cache(cache, n_bytes)


# In an engine process (process/child.py sets it): its one model's worker, whose prompt cache
# evict() trims there.
engine_worker: Any = None


def _trim_in_engine_process(n_bytes: int, model: Any, tokenizer: Any) -> int:
    return trim_prompt_cache(getattr(engine_worker, "prompt_cache", None), n_bytes)


def _here(cache: Any) -> bool:
    """True for a prompt cache in this process; False for the size an engine process reports."""
    return hasattr(cache, "trim_to")


def evict(worker: Any, n_bytes: int) -> Any:
    """Ask a worker's generation thread to trim its prompt cache to n_bytes; a Future of the
    bytes evicted. A model in an engine process trims there."""
    cache = worker.prompt_cache
    if _here(cache):
        return worker.call(functools.partial(_trim_in_thread, cache, n_bytes))
    return worker.call(functools.partial(_trim_in_engine_process, n_bytes))


# A prompt's cache is kept when its prefill ends (worker._keep_prefilled) only from this length:
# below, another session's prefill of the shared part costs less than the copy and its space.
PREFILLED_MIN_TOKENS = 256


def _cache_budget(worker: Any) -> int:
    return int(getattr(worker, "_prompt_cache_bytes", 0) or 0)


@dataclass(frozen=True)
class Held:
    """A request holding (or granted) a slot, as the governor counts it: its reservation and
    the KV tokens it has not allocated yet."""

    need: int
    unallocated: int


class MemoryGovernor:
    """Counts KV bytes against the memory MLX may hold; see the module's docstring.

    `per_token(model)` and `weights(model)` come from the registry (0: unknown, not governed);
    `caches()` gives the loaded workers, whose prompt caches may be evicted.
    """

    def __init__(
        self,
        limit: Optional[int],
        *,
        per_token: Callable[[str], int],
        weights: Callable[[], int],
        workers: Callable[[], Iterable[tuple[str, Any]]],
    ) -> None:
        self.limit = limit
        self.per_token = per_token
        self._weights = weights
        self._workers = workers
        self.evicted_bytes = 0  # prompt-cache bytes evicted to admit requests, over the life

    def need(self, model: str, prompt_tokens: int, max_tokens: int) -> int:
        """A request's reservation: its KV at its longest, and the copy of its prompt's KV the
        prompt cache takes when the prefill ends (PREFILLED_MIN_TOKENS and up)."""
        per_token = self.per_token(model)
        need = kv_need(per_token, prompt_tokens, max_tokens)
        cap = next((_cache_budget(w) for n, w in self._workers() if n == model), 0)
        if cap > 0 and prompt_tokens >= PREFILLED_MIN_TOKENS:
            copy = min(cap, per_token * prompt_tokens)
            if need + copy <= self.ceiling():  # else counted as the request alone: see worker
                need += copy
        return need

    def capacity(self) -> int:
        """Bytes MLX may hold in all: the configured limit, within the machine's memory (the
        device's on CUDA, the system's elsewhere)."""
        total = total_bytes()
        return min(self.limit, total) if self.limit is not None else total

    def ceiling(self) -> int:
        """The most KV bytes one request could ever have: everything but the weights of the
        loaded models (prompt caches can be evicted, running requests end)."""
        return self.capacity() - self._weights()

    def free(self, held: Iterable[Held]) -> int:
        """Bytes a new request may take now: what is free (within the limit) less what the
        held requests will still allocate."""
        free = free_bytes()
        if self.limit is not None:
            free = min(free, self.limit - mlx_active())
        return free - sum(h.unallocated for h in held)

    def evictable(self) -> int:
        return sum(int(w.prompt_cache.nbytes or 0) for _, w in self._cached_workers())

    def _cached_workers(self) -> list[tuple[str, Any]]:
        return [(n, w) for n, w in self._workers() if w.prompt_cache is not None]

    def check_ever_fits(
        self, model: str, prompt_tokens: int, max_tokens: int, *, prompt_param: str
    ) -> None:
        """InvalidRequest (400) naming the field to lower when the request could not fit even
        with nothing else running and the prompt caches empty."""
        per_token = self.per_token(model)
        need = kv_need(per_token, prompt_tokens, max_tokens)
        ceiling = self.ceiling()
        if not need or need <= ceiling:
            return
        room = max(0, ceiling // per_token - prompt_tokens) if per_token else 0
        where = (
            f"limits.mlx_memory_limit_bytes {self.limit}"
            if self.limit is not None
            else "the machine's memory"
        )
        what = (
            f"its KV cache needs {need} bytes ({prompt_tokens} prompt + {max_tokens} max_tokens "
            f"tokens x {per_token} bytes) but at most {max(0, ceiling)} bytes can ever be free "
            f"for it ({where} less the weights of the loaded models)"
        )
        if room <= 0:
            raise InvalidRequest(
                f"the prompt is too long for this server's memory: {what}; shorten the prompt",
                param=prompt_param,
                code="insufficient_memory",
            )
        raise InvalidRequest(
            f"max_tokens is too large for this server's memory: {what}; "
            f"with this prompt, max_tokens may be at most {room}",
            param="max_tokens",
            code="insufficient_memory",
        )

    async def make_room(self, model: str, shortfall: int, purpose: str = "admit a request") -> int:
        """Evict prompt-cache entries, the requesting model's first, until `shortfall` bytes
        are freed or the caches are empty, and free MLX's buffer cache; the bytes evicted.
        `purpose` is what the log says it was for."""
        if shortfall <= 0:
            return 0
        workers = sorted(self._cached_workers(), key=lambda nw: nw[0] != model)
        evicted = 0
        for name, worker in workers:
            held = int(worker.prompt_cache.nbytes or 0)
            if not held:
                continue
            target = max(0, held - (shortfall - evicted))
            try:
                fut = evict(worker, target)
                got = await asyncio.wait_for(asyncio.wrap_future(fut), EVICT_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a dying worker: its memory goes anyway
                log.warning("could not evict prompt cache of model %s: %s", name, exc)
                continue
            if isinstance(got, int) and got > 0:
                evicted += got
                log.info("evicted %d bytes of model %s's prompt cache to %s", got, name, purpose)
                if not _here(worker.prompt_cache):
                    # an engine process reports its size only every few steps: count it now
                    worker.prompt_cache.nbytes = max(0, held - got)
            if evicted >= shortfall:
                break
        self.evicted_bytes += evicted
        return evicted
