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
    cfg = load(compose(["logging.file=none"]))

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
