"""mlx-lm's LRUPromptCache with a lookup whose cost does not grow with what is cached.

mlx-lm 0.32's `PromptTrie.search`, when a prompt shares a prefix with cached sequences but
none of them is a prefix of it (another user's conversation after the same system prompt),
looks for the shortest cached sequence under the shared prefix with a depth-first walk that
visits every cached token below it and copies the growing path at each step: quadratic in the
cached sequences' length, on the generation thread, holding the GIL, once per request. With 64
cached sequences after a 500-token shared prefix, measured on the 2-core CPU machine: 4.5 ms a
lookup at 150 tokens each, 87 ms at 1,000, 329 ms at 2,000; every running stream waits that
long. (mlx-lm's pull request #1607 removes the path copies; the walk over every cached token
stays.)

Here the lookup follows one branch down from where the prompt leaves the trie to the first
cached sequence on it: as long as that sequence, never more. Which sequence serves the shared
prefix does not change the result (the copy is trimmed to the shared prefix); mlx-lm takes the
shortest to copy less, which costs far more to find than copying a longer one (a device copy).
Exact and prefix matches are unchanged.
"""

from __future__ import annotations

from typing import Any

from mlx_lm.models.cache import LRUPromptCache, PromptTrie, PromptTrieResult


class Trie(PromptTrie):  # type: ignore[misc]
    """PromptTrie whose search walks the prompt, then at most one branch below it."""

    _trie: dict[Any, dict[Any, Any]]

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
            extra = _down_to_a_value(current)
            if extra is not None:
                longer = tokens[:index] + extra
        return PromptTrieResult(model, None, shorter, longer, index)


def _down_to_a_value(node: dict[Any, Any]) -> list[int] | None:
    """The tokens from `node` down one branch to the first node holding a cached sequence
    (at `node` itself: none); None if the branch ends without one."""
    path: list[int] = []
    while "__value__" not in node:
        tok = next((t for t in node if t != "__value__"), None)
        if tok is None:
            return None
        path.append(tok)
        node = node[tok]
    return path


class PromptCache(LRUPromptCache):  # type: ignore[misc]
    """LRUPromptCache over `Trie`: everything else is mlx-lm's."""

    def __init__(self, max_size: int = 10, max_bytes: int = 1 << 63) -> None:
        super().__init__(max_size=max_size, max_bytes=max_bytes)
        self._trie = Trie()


def usable() -> bool:
    """Whether mlx-lm's prompt cache is built as this module expects (else the worker uses
    mlx-lm's own)."""
    try:
        c = LRUPromptCache(max_size=1)
    except Exception:
        return False
    return type(getattr(c, "_trie", None)) is PromptTrie and isinstance(getattr(c._trie, "_trie", None), dict)
