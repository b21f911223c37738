"""Driving the real engine in-process from a test."""

from __future__ import annotations

from appliance.engine.service import Engine
from appliance.engine.types import SamplingParams


async def generate(engine: Engine, prompt: list[int], n: int) -> tuple[list[int], int]:
    """The demo model's answer to `prompt` (at most `n` tokens) and the prompt tokens it found
    in the prompt cache."""
    worker = await engine.model("demo")
    gen = await engine.start(worker, prompt, SamplingParams(max_tokens=n))
    deadline = engine.deadline()
    while (await gen.next_tokens(deadline))[0]:
        pass
    engine.finish(gen)
    return list(gen.tokens), gen.cached_tokens
