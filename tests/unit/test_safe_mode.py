"""Safe mode's parts on the event loop, without a server or a model: the limits in force, the
admission that follows them, and the lifecycle's guard, exit and stable-running watch."""

from __future__ import annotations

import asyncio
import time

import pytest

from appliance.engine.admission import Admission
from appliance.engine.limits import Limits, LimitsInForce
from appliance.errors import QueueFull, SafeModeOn
from appliance.lifecycle import Lifecycle

pytestmark = pytest.mark.timeout(30)

NORMAL = Limits(max_running=3, max_queued=8, queue_timeout_s=5.0)
SAFE = Limits(max_running=1, max_queued=1, queue_timeout_s=0.2, memory_percent=80.0)


def test_switching_the_limits_admits_the_waiting_at_once() -> None:
    async def scenario() -> None:
        limits = LimitsInForce(NORMAL, SAFE, safe_mode=True)
        adm = Admission(limits)
        assert (adm.max_running, adm.max_queued) == (1, 1)
        await adm.acquire()
        waiter = asyncio.ensure_future(adm.acquire())
        await asyncio.sleep(0.01)
        assert adm.waiting == 1
        with pytest.raises(QueueFull):  # the safe-mode queue holds one
            await adm.acquire()
        limits.use(safe_mode=False)  # three slots now: the waiter starts without a release
        await asyncio.wait_for(waiter, 1)
        assert (adm.running, adm.waiting, adm.max_running) == (2, 0, 3)
        # Back to safe mode with 2 running: nobody new starts until they drop below one.
        limits.use(safe_mode=True)
        queued = asyncio.ensure_future(adm.acquire())
        await asyncio.sleep(0.01)
        adm.release()
        await asyncio.sleep(0.01)
        assert not queued.done() and adm.running == 1
        adm.release()
        await asyncio.wait_for(queued, 1)
        assert adm.running == 1

    asyncio.run(scenario())


def test_the_queue_timeout_in_force_applies() -> None:
    async def scenario() -> float:
        adm = Admission(LimitsInForce(NORMAL, SAFE, safe_mode=True))
        await adm.acquire()
        t = time.monotonic()
        with pytest.raises(QueueFull) as info:
            await adm.acquire()
        assert "0.2 s" in info.value.message
        return time.monotonic() - t

    assert 0.15 < asyncio.run(scenario()) < 2


def test_the_guard_refuses_loads_only_in_safe_mode() -> None:
    Lifecycle().guard_load("demo")  # normal: nothing to say
    lc = Lifecycle("crash loop: 3 unclean starts", stable_after_s=120)
    with pytest.raises(SafeModeOn) as info:
        lc.guard_load("demo")
    err = info.value
    assert err.code == "safe_mode" and err.param == "model"
    assert "POST /admin/safe-mode/exit" in err.message and "'demo'" in err.message
    assert err.retry_after is not None and 100 < err.retry_after <= 120


def test_exit_runs_the_listeners_once() -> None:
    lc = Lifecycle("crash loop")
    seen: list[str] = []
    lc.on_safe_mode_exit(seen.append)
    assert lc.exit_safe_mode("admin") is True
    assert lc.exit_safe_mode("admin") is False
    assert seen == ["admin"] and not lc.safe_mode
    assert lc.safe_mode_exit is not None and lc.safe_mode_exit["reason"] == "crash loop"
    lc.guard_load("demo")  # loads allowed again


def test_stable_running_ends_safe_mode_then_marks_the_run_stable() -> None:
    async def scenario() -> list[tuple[str, float]]:
        lc = Lifecycle("crash loop", stable_after_s=0.2)
        events: list[tuple[str, float]] = []
        t0 = time.monotonic()
        lc.on_safe_mode_exit(lambda how: events.append((how, time.monotonic() - t0)))
        await lc.watch_stable(lambda: events.append(("stable", time.monotonic() - t0)))
        return events

    (how, ended), (stable, marked) = asyncio.run(scenario())
    assert (how, stable) == ("stable", "stable")
    assert 0.15 < ended < 1 and marked - ended >= 0.15  # stable only after normal running too


def test_an_admin_exit_starts_the_stable_clock_then() -> None:
    async def scenario() -> float:
        lc = Lifecycle("crash loop", stable_after_s=0.3)
        marked = asyncio.get_running_loop().create_future()
        t0 = time.monotonic()
        watch = asyncio.ensure_future(lc.watch_stable(lambda: marked.set_result(time.monotonic())))
        await asyncio.sleep(0.1)
        lc.exit_safe_mode("admin")
        when = await asyncio.wait_for(marked, 2)
        await watch
        return when - t0

    assert 0.35 < asyncio.run(scenario()) < 1.5  # 0.1 in safe mode, then 0.3 of normal running
