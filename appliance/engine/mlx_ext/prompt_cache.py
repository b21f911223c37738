"""mlx-lm's LRUPromptCache with a lookup whose cost does not grow with what is cached.

mlx-lm 0.32's `PromptTrie.search`, when a prompt shares a prefix with cached sequences but
none of them is a prefix of it (another user's conversation after the same system prompt),
looks for the shortest cached sequence under the shared prefix with a depth-first walk that
visits every cached token below it and copies the growing path at each step: quadratic in the
cached sequences' length, on the generation thread, holding the GIL, once per request. With 64
cached sequences after a 500-token shared prefix, on a 2-core x86 CPU: 4.5 ms a
lookup at 150 tokens each, 87 ms at 1,000, 329 ms at 2,000; every running stream waits that
long. (mlx-lm's pull request #1607 removes the path copies; the walk over every cached token
stays.)

Here the lookup follows one branch down from where the prompt leaves the trie to the first
cached sequence on it: as long as that sequence, never more. Which sequence serves the shared
prefix does not change the output (the copy is trimmed to the shared prefix); mlx-lm takes the
shortest to copy less, which costs far more to find than copying a longer one (a device copy).
Only if that sequence's cache can't be trimmed (a rotating cache, `max_kv_size`, past its size)
is the shortest searched for, as mlx-lm does but level by level without copying paths: a
shorter one may still fit. Exact and prefix matches are unchanged.

With a model's `kv_bits`, entries are kept as mlx-lm's QuantizedKVCache (affine, group 64, or
32 for heads of 32) and dequantized when fetched: mlx-lm's batch caches take plain KVCaches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

from mlx_lm.models.cache import (
    KVCache,
    LRUPromptCache,
    PromptTrie,
    PromptTrieResult,
    QuantizedKVCache,
    can_trim_prompt_cache,
)

TARGETS = "mlx-lm 0.32 (models.cache.LRUPromptCache over a PromptTrie)"


class Trie(PromptTrie):  # type: ignore[misc]
    """PromptTrie whose search walks the prompt, then one branch below it; `usable(value)` says
    whether a value found that way can serve a longer match (else the shortest is looked for)."""

    _trie: dict[Any, dict[Any, Any]]

    def __init__(
        self,
        usable: Callable[[Any], bool] = lambda value: True,
        on_pop: Optional[Callable[[Any, list[int], Any], None]] = None,
    ) -> None:
        super().__init__()
        self._usable = usable
        self._on_pop = on_pop

    def pop(self, model: Any, tokens: list[int]) -> Any:
        # LRUPromptCache pops only to evict (superseded prefixes go through pop_prefixes).
        value = super().pop(model, tokens)
        if self._on_pop is not None:
            self._on_pop(model, tokens, value)
        return value

    def search(self, model: Any, tokens: list[int]) -> PromptTrieResult:
        if model not in self._trie:
            return PromptTrieResult(model, None, None, None, 0)
        current = self._trie[model]
        if not tokens and "__value__" in current:
            return PromptTrieResult(model, [], None, None, 0)
        # Walk the prompt as far as the trie goes, noting the deepest cached prefix.
        last_index = -1
        index = 0
        while index < len(tokens) and tokens[index] in current:
            current = current[tokens[index]]
            if "__value__" in current:
                last_index = index
            index += 1
        if last_index == len(tokens) - 1 >= 0:
            return PromptTrieResult(model, tokens, None, None, 0)
        # As mlx-lm 0.32 (a one-token prefix is not offered as shorter).
        shorter = tokens[: last_index + 1] if last_index > 0 else None
        longer = None
        if index > 0:
            found = _down_to_a_value(current)
            if found is not None and not self._usable(found[1]):
                found = _shortest_below(current)
            if found is not None:
                longer = tokens[:index] + found[0]
        return PromptTrieResult(model, None, shorter, longer, index)


def _down_to_a_value(node: dict[Any, Any]) -> Optional[tuple[list[Any], Any]]:
    """The tokens from `node` down one branch to the first node holding a cached sequence (at
    `node` itself: none), and its value; None if the branch ends without one."""
    path: list[Any] = []
    while "__value__" not in node:
        tok = next((t for t in node if t != "__value__"), None)
        if tok is None:
            return None
        path.append(tok)
        node = node[tok]
    return path, node["__value__"]


def _shortest_below(node: dict[Any, Any]) -> Optional[tuple[list[Any], Any]]:
    """As _down_to_a_value, for the shortest way down to a value: level by level, each node
    kept once with its parent's place (no path copies); None if there is no value below."""
    if "__value__" in node:
        return [], node["__value__"]
    levels: list[list[tuple[dict[Any, Any], int, Any]]] = [[(node, -1, None)]]
    while levels[-1]:
        below: list[tuple[dict[Any, Any], int, Any]] = []
        for i, (n, _, _) in enumerate(levels[-1]):
            for tok, child in n.items():
                if tok == "__value__":
                    continue
                if "__value__" in child:
                    path, up = [tok], i
                    for level in reversed(levels[1:]):
                        _, up, t = level[up]
                        path.append(t)
                    return path[::-1], child["__value__"]
                below.append((child, i, tok))
        levels.append(below)
    return None


class PromptCache(LRUPromptCache):  # type: ignore[misc]
    """LRUPromptCache over `Trie`; `on_evict(tokens, caches, nbytes)` hears of each entry
    evicted (to spill it to disk), and `version` counts inserts. With `kv_bits` (4 or 8) the
    entries are kept quantized (mlx-lm's QuantizedKVCache) and handed out as plain KVCaches,
    which the batch's caches are made of."""

    def __init__(
        self,
        max_size: int = 10,
        max_bytes: int = 1 << 63,
        on_evict: Optional[Callable[[list[int], list[Any], int], None]] = None,
        kv_bits: Optional[int] = None,
    ) -> None:
        super().__init__(max_size=max_size, max_bytes=max_bytes)
        self.on_evict = on_evict
        self.version = 0
        self.kv_bits = kv_bits
        # A longer match is only reused when its cache can be trimmed (fetch_nearest_cache).
        self._trie = Trie(lambda entry: can_trim_prompt_cache(entry.prompt_cache), self._popped)

    def _popped(self, model: Any, tokens: list[int], entry: Any) -> None:
        if self.on_evict is not None:
            self.on_evict(list(tokens), entry.prompt_cache, entry.nbytes)

    def insert_cache(
        self, model: Any, tokens: list[int], prompt_cache: list[Any], **kw: Any
    ) -> None:
        self.version += 1
        if self.kv_bits is not None:
            prompt_cache = quantize(prompt_cache, self.kv_bits)
        super().insert_cache(model, tokens, prompt_cache, **kw)

    def fetch_nearest_cache(self, model: Any, tokens: list[int]) -> tuple[Any, list[int]]:
        cache, rest = super().fetch_nearest_cache(model, tokens)
        if cache is not None and self.kv_bits is not None:
            cache = dequantize(cache)
        return cache, rest

    def entries(self, model: Any) -> list[tuple[list[int], list[Any]]]:
        """`model`'s cached sequences and their caches, most recently inserted first."""
        out = []
        for lru in self._lru._lrus.values():
            for m, tokens in reversed(lru):
                if m == model:
                    out.append((list(tokens), self._trie.get(m, tokens).prompt_cache))
        return out


def group_size(head_dim: int) -> Optional[int]:
    """The quantization group for a KV head of this size: 64 where it divides (as mlx-lm's
    QuantizedKVCache), else 32 (the demo model's heads); None if neither does."""
    return next((g for g in (64, 32) if head_dim % g == 0), None)


def quantize(cache: list[Any], bits: int) -> list[Any]:
    """A sequence's caches quantized to `bits`, cut to their length; caches of other kinds,
    already quantized or with heads no group divides are kept as they are."""
    import mlx.core as mx

    out: list[Any] = []
    done: list[Any] = []
    c: Any
    for c in cache:
        g = group_size(c.keys.shape[-1]) if type(c) is KVCache and c.keys is not None else None
        if g is None or group_size(c.values.shape[-1]) is None:
            out.append(c)
            continue
        n = c.offset
        q: Any = QuantizedKVCache(group_size=g, bits=bits)
        q.offset = n
        q.keys = mx.quantize(c.keys[..., :n, :], group_size=g, bits=bits)
        q.values = mx.quantize(c.values[..., :n, :], group_size=g, bits=bits)
        done.extend((*q.keys, *q.values))
        out.append(q)
    mx.async_eval(done)  # now, without waiting: the full-precision copy can then go
    return out


def dequantize(cache: list[Any]) -> list[Any]:
    """Plain KVCaches of quantized ones (a batch's caches are built from KVCaches)."""
    import mlx.core as mx

    def plain(parts: Any, n: int, g: int, bits: int) -> Any:
        w, scales, biases = (x[..., :n, :] for x in parts)
        return mx.dequantize(w, scales, biases, group_size=g, bits=bits)

    out: list[Any] = []
    c: Any
    for c in cache:
        if type(c) is not QuantizedKVCache:
            out.append(c)
            continue
        k = KVCache()
        k.offset = c.offset
        k.keys = plain(c.keys, c.offset, c.group_size, c.bits)
        k.values = plain(c.values, c.offset, c.group_size, c.bits)
        out.append(k)
    return out


def usable() -> bool:
    """Whether mlx-lm's prompt cache is built as this module expects (else the worker uses
    mlx-lm's own)."""
    try:
        c = LRUPromptCache(max_size=1)
    except Exception:
        return False
    return (
        type(getattr(c, "_trie", None)) is PromptTrie
        and isinstance(getattr(c._trie, "_trie", None), dict)
        and isinstance(getattr(getattr(c, "_lru", None), "_lrus", None), dict)
    )
