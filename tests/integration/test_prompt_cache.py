"""The prompt cache on the real engine and demo model, driven in-process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appliance.config import compose, load
from appliance.engine.service import Engine
from appliance.engine.types import SamplingParams

from ..conftest import with_demo
from ._engine import generate as _generate

pytestmark = pytest.mark.timeout(120)


def test_an_exact_hit_reuses_all_but_the_last_prompt_token(
    demo_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_cache))
    cfg = load(compose(with_demo(["logging.file=none", "models.prompt_cache_min_tokens=0"])))

    async def scenario() -> None:
        engine = Engine(cfg.models, cfg.limits)
        try:
            tok = (await engine.model("demo")).tokenizer
            prompt = list(tok.encode("The kitchen smelled of fresh bread and"))
            first, cached = await _generate(engine, prompt, 8)
            assert cached == 0
            # The cache now holds the prompt and the generated tokens: asking for exactly that
            # sequence is an exact hit, which once counted as a miss (whole prompt prefilled).
            follow_up = prompt + first
            again, cached = await _generate(engine, follow_up, 4)
            assert cached == len(follow_up) - 1
            # Reusing the cache changes nothing in the output: greedy continues as from scratch.
            fresh = Engine(cfg.models, cfg.limits)
            try:
                alone, _ = await _generate(fresh, follow_up, 4)
            finally:
                await fresh.close()
            assert again == alone
        finally:
            await engine.close()

    asyncio.run(scenario())


def test_a_cached_prefix_shorter_than_the_minimum_is_prefilled_again(
    demo_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_cache))

    async def reused(min_tokens: int) -> tuple[int, int]:
        cfg = load(
            compose(
                with_demo(["logging.file=none", f"models.prompt_cache_min_tokens={min_tokens}"])
            )
        )
        engine = Engine(cfg.models, cfg.limits)
        try:
            tok = (await engine.model("demo")).tokenizer
            shared = list(tok.encode("The kitchen smelled of fresh bread and"))
            await _generate(engine, shared + list(tok.encode(" apples")), 4)
            _, cached = await _generate(engine, shared + list(tok.encode(" a storm")), 4)
            return cached, len(shared)
        finally:
            await engine.close()

    cached, shared = asyncio.run(reused(0))
    assert shared - 2 <= cached < shared + 2  # reused up to where the prompts part
    cached, shared = asyncio.run(reused(shared + 8))
    assert cached == 0  # a prefix that short is not worth the copy: prefilled again


def test_a_shared_prefix_is_reused_through_the_appliances_lookup_and_changes_nothing(
    demo_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another prompt after the same opening reuses the cached opening (the lookup of
    engine/mlx_ext/prompt_cache.py, not mlx-lm's), and greedy output is what it is without a
    cache."""
    from appliance.engine.mlx_ext.prompt_cache import PromptCache

    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_cache))

    async def scenario() -> None:
        cfg = load(compose(with_demo(["logging.file=none", "models.prompt_cache_min_tokens=0"])))
        engine = Engine(cfg.models, cfg.limits)
        fresh = Engine(cfg.models, cfg.limits)
        try:
            worker = await engine.model("demo")
            assert type(worker.prompt_cache) is PromptCache
            tok = worker.tokenizer
            shared = list(tok.encode("Once upon a time, in a village by the sea, there lived"))
            for tail in (" a baker", " an old sailor", " two sisters"):
                await _generate(engine, shared + list(tok.encode(tail)), 6)
            prompt = shared + list(tok.encode(" a lighthouse keeper"))
            out, cached = await _generate(engine, prompt, 6)
            assert len(shared) - 2 <= cached < len(prompt)
            alone, _ = await _generate(fresh, prompt, 6)
            assert out == alone
        finally:
            await engine.close()
            await fresh.close()

    asyncio.run(scenario())


class _Counting(dict):  # type: ignore[type-arg]
    """A trie node that counts how often a search reads a child."""

    reads = 0

    def __getitem__(self, key: object) -> object:
        _Counting.reads += 1
        return super().__getitem__(key)


def _counting(root: dict) -> _Counting:  # type: ignore[type-arg]
    """The same trie with counting nodes (iteratively: its branches are deep)."""
    top = _Counting(root)
    todo = [top]
    while todo:
        node = todo.pop()
        for k, v in list(dict.items(node)):
            if k != "__value__":
                child = _Counting(v)
                dict.__setitem__(node, k, child)
                todo.append(child)
    return top


def _search_reads(trie: object, tokens: list[int]) -> int:
    _Counting.reads = 0
    trie.search("m", tokens)  # type: ignore[attr-defined]
    return _Counting.reads


def test_the_lookup_reads_the_prompt_and_one_branch_not_every_cached_token() -> None:
    """64 cached conversations of 600 tokens after a 100-token shared opening: mlx-lm's search
    reads every cached token below the opening (and copies its path at each); ours the prompt
    and one branch."""
    import random

    from mlx_lm.models.cache import PromptTrie

    from appliance.engine.mlx_ext.prompt_cache import Trie

    rng = random.Random(7)
    opening = list(range(1, 101))
    theirs, ours = PromptTrie(), Trie()
    for i in range(64):
        seq = opening + [1000 + i] + [rng.randrange(2000, 3000) for _ in range(600)]
        theirs.add("m", seq, i)
        ours.add("m", seq, i)
    for t in (theirs, ours):
        t._trie["m"] = _counting(t._trie["m"])
    prompt = opening + [999, 5, 6, 7]
    assert _search_reads(theirs, prompt) > 64 * 600
    assert _search_reads(ours, prompt) <= len(prompt) + 602
    r = ours.search("m", prompt)
    assert r.common_prefix == 100 and r.longer is not None and r.longer[:100] == opening
    assert ours.get("m", r.longer) in range(64)  # a cached sequence


def test_the_lookup_agrees_with_mlx_lm_on_random_tries() -> None:
    """Exact, shorter and the shared prefix as mlx-lm finds them; `longer` a cached sequence
    through that prefix whenever mlx-lm finds one (not necessarily the shortest), and as short as
    mlx-lm's when the first one found can't serve (its cache can't be trimmed)."""
    import random

    from mlx_lm.models.cache import PromptTrie

    from appliance.engine.mlx_ext.prompt_cache import Trie

    rng = random.Random(3)
    for _ in range(600):
        unusable = {j for j in range(8) if rng.random() < 0.3}
        theirs, ours = PromptTrie(), Trie(lambda value: value not in unusable)  # noqa: B023
        stored = []
        for j in range(rng.randrange(1, 8)):
            seq = [rng.randrange(4) for _ in range(rng.randrange(1, 9))]
            stored.append(seq)
            theirs.add("m", seq, j)
            ours.add("m", seq, j)
        if rng.random() < 0.3:  # popping leaves the trie as eviction does
            victim = rng.choice(stored)
            theirs.pop("m", victim)
            ours.pop("m", victim)
            stored = [s for s in stored if s != victim]
        query = [rng.randrange(4) for _ in range(rng.randrange(0, 9))]
        a, b = theirs.search("m", query), ours.search("m", query)
        assert (b.exact, b.shorter, b.common_prefix) == (a.exact, a.shorter, a.common_prefix), query
        assert (b.longer is None) == (a.longer is None), query
        if b.longer is not None:
            assert b.longer[: b.common_prefix] == query[: b.common_prefix]
            assert b.longer in stored
            if ours.get("m", b.longer) in unusable:  # then the shortest was looked for
                assert len(b.longer) == len(a.longer), query


def test_kept_caches_hold_no_more_memory_than_the_cache_counts(
    demo_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished request's cache is cut out of the running batch's buffers; kept unevaluated it
    held all of them (every layer, every row): here some 35x the bytes the cache counted against
    prompt_cache_bytes. What the process holds after the requests is the model and the entries."""
    import mlx.core as mx

    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_cache))

    async def scenario() -> tuple[int, int, int]:
        cfg = load(compose(with_demo(["logging.file=none"])))
        engine = Engine(cfg.models, cfg.limits)
        try:
            worker = await engine.model("demo")
            tok = worker.tokenizer

            def active() -> asyncio.Future[int]:
                return asyncio.wrap_future(worker.call(lambda m, t: mx.get_active_memory()))

            async def one(i: int) -> None:
                prompt = list(tok.encode(f"Story {i}: once upon a time there was a"))
                await _generate(engine, prompt, 8 + i % 16)  # rows finish at different steps

            base = await active()
            for wave in range(2):
                await asyncio.gather(*(one(wave * 100 + i) for i in range(16)))
            return base, await active(), worker.prompt_cache.nbytes
        finally:
            await engine.close()

    base, after, counted = asyncio.run(scenario())
    assert counted > 0
    assert after - base <= 1.5 * counted + (1 << 20), (base, after, counted)


def test_a_cache_that_cant_be_trimmed_does_not_hide_one_that_can() -> None:
    """With max_kv_size the caches are rotating and one past its size can't be trimmed back to a
    shared opening; the lookup then looks for the shortest entry, as mlx-lm does, which fits."""
    import mlx.core as mx
    from mlx_lm.models.cache import RotatingKVCache

    from appliance.engine.mlx_ext.prompt_cache import PromptCache

    def entry(n: int) -> list[RotatingKVCache]:
        c = RotatingKVCache(max_size=16)
        c.update_and_fetch(mx.zeros((1, 1, n, 4)), mx.zeros((1, 1, n, 4)))
        return [c]

    opening = list(range(1, 9))
    cache = PromptCache(max_size=8)
    cache.insert_cache(
        "m", opening + list(range(100, 132)), entry(40)
    )  # older, past 16: not trimmable
    cache.insert_cache("m", opening + [200, 201, 202, 203], entry(12))  # newer, trimmable
    prompt = opening + [300, 301, 302]
    got, rest = cache.fetch_nearest_cache("m", prompt)
    assert got is not None and rest == prompt[len(opening) :]
    assert got[0].offset == len(opening)


def test_a_session_arriving_while_another_generates_reuses_their_shared_prefix(
    demo_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Agents start together: the second session's system prompt and tools come from the first
    one's cache as soon as the first prompt is prefilled, not when its answer ends."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_cache))
    cfg = load(compose(with_demo(["logging.file=none"])))

    async def scenario() -> None:
        engine = Engine(cfg.models, cfg.limits)
        try:
            worker = await engine.model("demo")
            tok = worker.tokenizer
            shared = list(tok.encode("You are a coding agent with these tools. " * 40))
            assert len(shared) >= 300
            a_prompt = shared + list(tok.encode(" Fix the parser."))
            b_prompt = shared + list(tok.encode(" Write the docs."))
            a = await engine.start(worker, a_prompt, SamplingParams(max_tokens=200))
            deadline = engine.deadline()
            await a.next_tokens(deadline)  # A is prefilled and decoding
            b_tokens, b_cached = await _generate(engine, b_prompt, 4)
            assert not a.done  # B came and went while A still generated
            assert b_cached >= len(shared) - 2, (b_cached, len(shared))
            while (await a.next_tokens(deadline))[0]:
                pass
            engine.finish(a)
            # Nothing changes in B's answer for it.
            fresh = Engine(cfg.models, cfg.limits)
            try:
                alone, _ = await _generate(fresh, b_prompt, 4)
            finally:
                await fresh.close()
            assert b_tokens == alone
        finally:
            await engine.close()

    asyncio.run(scenario())
