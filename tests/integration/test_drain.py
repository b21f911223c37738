"""Graceful drain on SIGTERM / SIGINT: a real appliance process with real streams in flight."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from ._resilience import BASE, Stream, wait_until

pytestmark = pytest.mark.timeout(120)

LONG = ("models.catalog.demo.max_tokens=2000",)


def _state(home: Path) -> dict[str, Any]:
    return json.loads((home / "state" / "appliance" / "state.json").read_text())


def _start_streams(url: str, n: int, max_tokens: int) -> list[Stream]:
    streams = [Stream(url, f"Once upon a time, story number {i}", max_tokens) for i in range(n)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.got_tokens.wait(30), (s.status, s.datas[-3:], s.error)
    assert not any(s.done for s in streams), "a stream finished before the signal"
    return streams


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_in_flight_streams_and_exits_0(appliance_factory: Any, sig: int) -> None:
    drain = 30.0
    a = appliance_factory(*BASE, *LONG, f"server.drain_timeout_s={drain}")
    streams = _start_streams(a.url, 4, 400)

    t0 = time.monotonic()
    a.signal(sig)
    # /readyz turns 503 at once, and new inference is refused with code draining.
    r = wait_until(
        lambda: (x := httpx.get(a.url + "/readyz", timeout=5)).status_code == 503 and x,
        timeout=2,
        what="/readyz 503",
    )
    assert r.json()["error"]["code"] == "draining"
    late = httpx.post(
        a.url + "/v1/completions", json={"prompt": "late", "max_tokens": 4}, timeout=10
    )
    assert late.status_code == 503
    assert late.json()["error"]["code"] == "draining"
    assert late.headers.get("Retry-After")
    assert not all(s.done for s in streams), "the streams were too short to test a drain"

    for s in streams:
        s.join(drain)
        assert s.error is None, s.error
        assert s.status == 200
        assert s.done, s.datas[-3:]
        assert s.errors == []
        assert s.finish_reason in ("length", "stop")
    assert a.proc is not None
    rc = a.proc.wait(timeout=max(0.1, drain + 2 - (time.monotonic() - t0)))
    assert rc == 0, a.log()[-3000:]
    assert time.monotonic() - t0 <= drain + 2
    assert _state(a.home)["clean_shutdown"] is True
    assert "drained: no request in flight" in a.log()


def test_drain_timeout_ends_the_rest_with_an_error(appliance_factory: Any) -> None:
    drain = 1.0
    a = appliance_factory(*BASE, *LONG, f"server.drain_timeout_s={drain}")
    streams = _start_streams(a.url, 2, 2000)

    t0 = time.monotonic()
    a.signal(signal.SIGTERM)
    for s in streams:
        s.join(drain + 5)
        assert s.done, s.datas[-3:]  # an error chunk, then [DONE]: never a cut connection
        assert s.errors and s.errors[0]["code"] == "engine_failure", s.datas[-3:]
        assert "drain_timeout_s" in s.errors[0]["message"]
    assert a.proc is not None
    rc = a.proc.wait(timeout=max(0.1, drain + 2 - (time.monotonic() - t0)))
    assert rc == 0, a.log()[-3000:]
    assert _state(a.home)["clean_shutdown"] is True
    assert "drain timeout" in a.log()
