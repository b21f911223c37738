"""The prompt cache on the real engine and demo model, driven in-process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appliance.__main__ import compose
from appliance.config import load
from appliance.engine.service import Engine
from appliance.engine.types import SamplingParams

pytestmark = pytest.mark.timeout(120)


async def _generate(engine: Engine, prompt: list[int], n: int) -> tuple[list[int], int]:
    worker = await engine.model("demo")
    gen = await engine.start(worker, prompt, SamplingParams(max_tokens=n))
    deadline = engine.deadline()
    while (await gen.next_tokens(deadline))[0]:
        pass
    engine.finish(gen)
    return list(gen.tokens), gen.cached_tokens


def test_an_exact_hit_reuses_all_but_the_last_prompt_token(
    demo_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_cache))
    cfg = load(compose(["logging.file=none", "models.prompt_cache_min_tokens=0"]))

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
        cfg = load(compose(["logging.file=none", f"models.prompt_cache_min_tokens={min_tokens}"]))
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
