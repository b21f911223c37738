"""How requests join the running batch (the join window), on the real engine in-process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from appliance.config import compose, load
from appliance.engine.join import RETURN_S
from appliance.engine.service import Engine
from appliance.engine.types import Generation, SamplingParams

pytestmark = pytest.mark.timeout(120)


async def _run(engine: Engine, gen: Generation) -> list[int]:
    deadline = engine.deadline()
    while (await gen.next_tokens(deadline))[0]:
        pass
    engine.finish(gen)
    return list(gen.tokens)


@contextlib.asynccontextmanager
async def _demo(window: float) -> AsyncIterator[tuple[Engine, Any]]:
    """The real engine with the demo model loaded and the given join window; closed after."""
    cfg = load(
        compose(
            [
                "logging.file=none",
                "limits.max_running=4",
                f"+models.catalog.demo.join_window_s={window}",
            ]
        )
    )
    engine = Engine(cfg.models, cfg.limits)
    try:
        yield engine, await engine.model("demo")
    finally:
        await engine.close()


async def _wave_then_follow_ups(
    window: float, *, each_after_the_last_started: bool = False
) -> tuple[int, int]:
    """Four requests prefilled together end together; their follow-ups then arrive one by one,
    20 ms apart, or each once the one before it has its first token. Returns (joins, requests
    joined) for the follow-ups."""
    async with _demo(window) as (engine, worker):
        tok = worker.tokenizer
        prompts = [list(tok.encode("A story begins in the old mill"))] * 4
        params = SamplingParams(max_tokens=6)
        # Hold the generation thread so the first four are all waiting when it looks.
        release = threading.Event()
        held = worker.call(lambda model, tokenizer: release.wait(30))
        gens = [await engine.start(worker, p, params) for p in prompts]
        release.set()
        await asyncio.wrap_future(held)
        first = await asyncio.gather(*(_run(engine, g) for g in gens))
        assert all(len(t) == 6 for t in first)
        joins, joined = worker.stats["joins"], worker.stats["joined"]
        follow = []
        for p in prompts:  # arriving one at a time, as clients reading their answers would
            gen = await engine.start(worker, p, params)
            if each_after_the_last_started:
                while not await gen.wait_event():  # a token: it is in the batch already
                    pass
            follow.append(asyncio.ensure_future(_run(engine, gen)))
            if not each_after_the_last_started:
                await asyncio.sleep(0.02)
        again = await asyncio.gather(*follow)
        assert again == first  # greedy: joining later changes no output
        return worker.stats["joins"] - joins, worker.stats["joined"] - joined


def test_requests_that_come_back_together_are_prefilled_together(
    demo_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_cache))
    assert asyncio.run(_wave_then_follow_ups(1.0)) == (1, 4)
    # Without a window, each joins the batch on its own (in a prefill call of its own) when it
    # arrives after the one before it started.
    assert asyncio.run(_wave_then_follow_ups(0.0, each_after_the_last_started=True)) == (4, 4)


def test_a_lone_request_does_not_wait_for_the_window(
    demo_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_cache))

    async def scenario() -> float:
        async with _demo(1.0) as (engine, worker):
            prompt = list(worker.tokenizer.encode("A single client asks again and again"))
            t = time.perf_counter()
            for _ in range(3):
                await _run(engine, await engine.start(worker, prompt, SamplingParams(max_tokens=4)))
            return time.perf_counter() - t

    # Each request comes back alone after the one before it ended: it joins at once, far
    # inside the 1 s window it would otherwise wait out, twice.
    assert asyncio.run(scenario()) < 2.0


def test_clients_that_never_come_back_stop_holding_new_requests(
    demo_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three requests end and their clients leave, while a long one keeps the engine busy.
    Once the ends are older than RETURN_S, a new request joins at the next step instead of
    waiting out the (here 1 s) window for three arrivals that will never come."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_cache))

    async def scenario() -> tuple[float, float]:
        async with _demo(1.0) as (engine, worker):
            tok = worker.tokenizer
            prompt = list(tok.encode("The long one keeps the engine stepping"))
            long = await engine.start(worker, prompt, SamplingParams(max_tokens=2000))
            short = [
                await engine.start(worker, prompt, SamplingParams(max_tokens=3)) for _ in range(3)
            ]
            await asyncio.gather(*(_run(engine, g) for g in short))
            # Right after the ends, a new arrival waits for the ones expected back, until the
            # ends are RETURN_S old (the window, 1 s, is longer).
            t = time.perf_counter()
            soon = await engine.start(worker, prompt, SamplingParams(max_tokens=2))
            await _run(engine, soon)
            held = time.perf_counter() - t
            await asyncio.sleep(RETURN_S + 0.2)  # nobody came back
            t = time.perf_counter()
            late = await engine.start(worker, prompt, SamplingParams(max_tokens=2))
            await _run(engine, late)
            joined = time.perf_counter() - t
            assert not long.done  # the engine was busy all along: no idle reset
            engine.finish(long)
            return held, joined

    held, joined = asyncio.run(scenario())
    assert held >= 0.8 * RETURN_S, held  # three were expected back
    assert joined < 0.5 * RETURN_S, joined


def test_an_idle_engine_stops_holding_a_request_when_the_ends_expire(
    demo_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three requests end and the engine is idle; a new request soon after waits for the three
    expected back only until their ends are RETURN_S old, not the whole (1 s) window."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_cache))

    async def scenario() -> float:
        async with _demo(1.0) as (engine, worker):
            prompt = list(worker.tokenizer.encode("Three short ones, then one more"))
            short = [
                await engine.start(worker, prompt, SamplingParams(max_tokens=2)) for _ in range(3)
            ]
            await asyncio.gather(*(_run(engine, g) for g in short))
            t = time.perf_counter()
            await _run(engine, await engine.start(worker, prompt, SamplingParams(max_tokens=2)))
            return time.perf_counter() - t

    took = asyncio.run(scenario())
    assert 0.5 * RETURN_S <= took < 0.8, took  # held for the returns, but not the whole window


def test_a_request_waits_for_those_on_their_way_only_so_long(
    demo_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the HTTP front says a request is on its way (engine/arrivals.py), a new one waits
    for it; if it never arrives (it failed, the count is wrong), the new one starts after
    ARRIVING_WAIT_S, and at once when nothing is said to be coming."""
    from appliance.engine.join import ARRIVING_WAIT_S

    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_cache))

    async def scenario() -> tuple[float, float]:
        async with _demo(0.02) as (engine, worker):
            prompt = list(worker.tokenizer.encode("Somebody else is on the way"))

            async def timed() -> float:
                t = time.perf_counter()
                await _run(engine, await engine.start(worker, prompt, SamplingParams(max_tokens=2)))
                return time.perf_counter() - t

            engine.arrivals.pending = 1  # one the front holds, never handed over
            held = await timed()
            engine.arrivals.pending = 0
            alone = await timed()
            return held, alone

    held, alone = asyncio.run(scenario())
    assert ARRIVING_WAIT_S <= held < ARRIVING_WAIT_S + 1.0, held
    assert alone < ARRIVING_WAIT_S, alone


def test_a_step_that_holds_decoding_streams_is_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a prefill budget a long prompt is prefilled in one chunk between two decode
    steps: the stream decoding meanwhile waits for it, and the log says so, with the tokens."""
    from appliance.engine import worker as worker_mod

    monkeypatch.setattr(worker_mod, "SLOW_STEP_S", 0.05)  # a decode step alone: a few ms

    async def go() -> None:
        cfg = load(
            compose(["logging.file=none", "+models.catalog.demo.prefill_budget_tokens=null"])
        )
        engine = Engine(cfg.models, cfg.limits)
        try:
            worker = await engine.model("demo")
            tok = worker.tokenizer
            decoding = await engine.start(
                worker, list(tok.encode("Once upon a time")), SamplingParams(max_tokens=200)
            )
            while not await decoding.wait_event():  # its first token: it decodes
                pass
            long = list(tok.encode("The old mill by the river turned all day. " * 120))
            arrival = await engine.start(worker, long, SamplingParams(max_tokens=2))
            await asyncio.gather(_run(engine, arrival), _run(engine, decoding))
        finally:
            await engine.close()

    with caplog.at_level(logging.INFO, logger="appliance.engine"):
        asyncio.run(go())
    slow = [r.getMessage() for r in caplog.records if "a step took" in r.getMessage()]
    assert slow, "no slow step logged"
    assert any("streams decoding: 1;" in m and "prefilled: 0)" not in m for m in slow), slow
