"""`kv_bits`: cached prefixes kept quantized, on the real engine and demo model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appliance.config import compose, load
from appliance.engine.service import Engine

from ..conftest import with_demo
from ._engine import generate as _generate

pytestmark = pytest.mark.timeout(120)


def test_a_quantized_cache_is_reused_answers_alike_and_holds_fewer_bytes(
    demo_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_cache))

    async def turns(kv_bits: int | None) -> tuple[list[int], int, int]:
        extra = [] if kv_bits is None else [f"+models.catalog.demo.kv_bits={kv_bits}"]
        cfg = load(
            compose(with_demo(["logging.file=none", "models.prompt_cache_min_tokens=0", *extra]))
        )
        engine = Engine(cfg.models, cfg.limits)
        try:
            tok = (await engine.model("demo")).tokenizer
            prompt = list(tok.encode("The kitchen smelled of fresh bread and warm apples. " * 8))
            first, cached = await _generate(engine, prompt, 8)
            assert cached == 0
            again, cached = await _generate(engine, prompt + first + prompt[:12], 8)
            return again, cached, engine.stats().prompt_cache_bytes["demo"]
        finally:
            await engine.close()

    full, full_cached, full_bytes = asyncio.run(turns(None))
    eight, cached, nbytes = asyncio.run(turns(8))
    assert cached == full_cached > 0  # the repeated prefix still comes from the cache
    assert eight[:4] == full[:4]  # greedy after a dequantized prefix: the same first tokens
    # float32 keys and values at 8 bits, a scale and a bias per group of 32: 10/32 the bytes
    assert 0 < nbytes <= full_bytes * 0.35
