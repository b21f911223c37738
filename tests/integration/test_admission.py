"""Admission on a real server with one slot: the queue timeout's 429 with Retry-After, and the
priority lane (admin key only) that jumps the queue."""

from __future__ import annotations

import threading
import time
from typing import Any, Optional

import httpx
import pytest

from ._resilience import ADMIN_ENV, ADMIN_KEY, BASE, metric, wait_until

pytestmark = pytest.mark.timeout(120)

QUEUE_TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def one_slot(module_appliance_factory: Any) -> Any:
    return module_appliance_factory(
        *BASE,
        "limits.max_running=1",
        "limits.max_queued=4",
        f"limits.queue_timeout_s={QUEUE_TIMEOUT_S}",
        "models.catalog.demo.max_tokens=2048",
        "models.catalog.demo.context_length=4096",
        env=ADMIN_ENV,
    )


def test_queue_timeout_is_a_429_with_retry_after(one_slot: Any) -> None:
    url = one_slot.url
    hold = {"prompt": "Hold the only slot", "max_tokens": 2000, "stream": True}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", url + "/v1/completions", json=hold) as held:
            assert held.status_code == 200
            lines = held.iter_lines()  # kept: a dropped iterator would close the stream
            assert any(line.startswith("data: {") for line in lines)  # running: slot taken
            t0 = time.monotonic()
            r = httpx.post(
                url + "/v1/completions", json={"prompt": "waits", "max_tokens": 2}, timeout=30
            )
            waited = time.monotonic() - t0
            assert r.status_code == 429, r.text
            err = r.json()["error"]
            assert err["code"] == "server_busy" and err["type"] == "rate_limit_error"
            assert f"no slot freed within {QUEUE_TIMEOUT_S:g} s" in err["message"]
            assert int(r.headers["Retry-After"]) >= 1
            # It waited its queue timeout in the queue, not less, and was refused then.
            assert QUEUE_TIMEOUT_S - 0.1 <= waited < QUEUE_TIMEOUT_S + 5, waited
            assert metric(url, "lmx_num_requests_running") == 1.0  # held all along
        # Closing the stream gives the slot back.
    wait_until(lambda: metric(url, "lmx_num_requests_running") == 0.0, timeout=30)
    assert metric(url, "lmx_rejected_requests_total", reason="busy") == 1.0


class _Timed(threading.Thread):
    """One non-streamed completion; records when it was answered."""

    def __init__(self, url: str, prompt: str, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(daemon=True)
        self.url, self.prompt, self.headers = url, prompt, headers or {}
        self.body: dict[str, Any] = {"prompt": prompt, "max_tokens": 4}
        self.status: Optional[int] = None
        self.answered_at: Optional[float] = None

    def run(self) -> None:
        r = httpx.post(
            self.url + "/v1/completions", json=self.body, headers=self.headers, timeout=60
        )
        self.status = r.status_code
        self.answered_at = time.monotonic()


@pytest.fixture(scope="module")
def one_slot_patient(module_appliance_factory: Any) -> Any:
    """One slot and a queue timeout long enough that nobody times out in the priority test."""
    return module_appliance_factory(
        *BASE,
        "limits.max_running=1",
        "limits.max_queued=4",
        "limits.queue_timeout_s=60",
        "models.catalog.demo.max_tokens=2048",
        "models.catalog.demo.context_length=4096",
        env=ADMIN_ENV,
    )


def test_priority_high_jumps_the_queue(one_slot_patient: Any) -> None:
    url = one_slot_patient.url
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    # Priority without the admin key: refused, before it takes any place.
    r = httpx.post(
        url + "/v1/completions",
        json={"prompt": "me first", "max_tokens": 2, "priority": "high"},
        timeout=30,
    )
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert err["code"] == "forbidden" and err["param"] == "priority"

    hold = {"prompt": "Hold the only slot", "max_tokens": 2000, "stream": True}
    normal = [_Timed(url, f"normal {i}") for i in range(2)]
    urgent = _Timed(url, "urgent", admin)
    urgent.body["priority"] = "high"
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", url + "/v1/completions", json=hold) as held:
            lines = held.iter_lines()  # kept: a dropped iterator would close the stream
            assert any(line.startswith("data: {") for line in lines)
            for t in normal:
                t.start()
                n = normal.index(t) + 1
                wait_until(lambda n=n: metric(url, "lmx_num_requests_waiting") == n, timeout=10)
            urgent.start()
            wait_until(lambda: metric(url, "lmx_num_requests_waiting") == 3.0, timeout=10)
        # The held stream is closed: its slot goes to the front of the queue.
    for t in (*normal, urgent):
        t.join(60)
    assert [t.status for t in (*normal, urgent)] == [200, 200, 200]
    # Queued last, served first.
    assert urgent.answered_at is not None
    assert all(t.answered_at is not None and urgent.answered_at < t.answered_at for t in normal)
