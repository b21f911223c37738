"""Crash recovery and crash-loop detection with real processes killed by SIGKILL.

Each test keeps one `home` (so one XDG_STATE_HOME, so one state file) across the restarts.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from ._resilience import (
    ADMIN_ENV,
    BASE,
    Stream,
    admin_get,
    admin_post,
    loaded,
    metric,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)

TWO_MODELS = (*BASE, "+models.catalog.demo2.path=builtin:demo")


def _state(home: Path) -> dict[str, Any]:
    return json.loads((home / "state" / "appliance" / "state.json").read_text())


def test_kill_9_then_restart_reloads_the_models_that_were_loaded(
    appliance_factory: Any, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    a = appliance_factory(*TWO_MODELS, env=ADMIN_ENV, home=home)
    assert loaded(a.url) == ["demo"]
    admin_post(a.url, "/admin/models/load", {"model": "demo2"})
    assert wait_until(lambda: _state(home)["models"] == ["demo", "demo2"], timeout=10)
    a.stop(signal.SIGKILL)

    b = appliance_factory(*TWO_MODELS, env=ADMIN_ENV, home=home)
    assert wait_until(
        lambda: sorted(loaded(b.url)) == ["demo", "demo2"], timeout=60, what="demo2 recovered"
    )
    health = admin_get(b.url, "/admin/health")
    assert health["state"]["previous_clean"] is False
    assert sorted(health["state"]["recovery"]["recovered"]) == ["demo", "demo2"]
    assert health["safe_mode"] is False
    log = b.log()
    assert "did not shut down cleanly" in log
    assert "recovered model demo2 after the unclean shutdown" in log
    # demo2 serves.
    r = httpx.post(
        b.url + "/v1/completions",
        json={"model": "demo2", "prompt": "hi", "max_tokens": 3},
        timeout=30,
    )
    assert r.status_code == 200, r.text

    assert b.stop() == 0
    assert _state(home)["clean_shutdown"] is True  # so the next start recovers nothing


def _age_starts(home: Path, seconds: float) -> None:
    """Move every recorded start `seconds` into the past, as if each start had taken that long
    (a large model loading for minutes), which a test cannot wait out. The file is the real one
    the killed process wrote; only its times change."""
    path = home / "state" / "appliance" / "state.json"
    data = json.loads(path.read_text())
    for start in data["starts"]:
        start["at"] -= seconds
    path.write_text(json.dumps(data))


def _crash_loop(appliance_factory: Any, home: Path, crashes: int = 3, age_s: float = 0.0) -> None:
    """Start and SIGKILL the appliance `crashes` times on one state file, each before it ran
    stable_after_s: the next start is the crashes-th unclean start in a row."""
    for _ in range(crashes):
        a = appliance_factory(*CRASHING, env=ADMIN_ENV, home=home, wait="/healthz")
        a.stop(signal.SIGKILL)
        if age_s:
            _age_starts(home, age_s)


# The crashing runs would become stable (and end the streak) only after a minute.
CRASHING = (*BASE, "state.stable_after_s=60")


def _v1(url: str) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)


def test_slow_crash_loop_enters_safe_mode_and_leaves_it_after_stable_running(
    appliance_factory: Any, tmp_path: Path
) -> None:
    """Three crashes, each four minutes after the one before (a slow model load that kills the
    process): a 60 s window would miss them, the default window does not. The fourth start is
    in safe mode, holds every load, and leaves safe mode by itself after stable_after_s."""
    home = tmp_path / "home"
    _crash_loop(appliance_factory, home, crashes=3, age_s=240)
    assert _state(home)["starts"][0]["at"] < _state(home)["starts"][-1]["at"] - 400

    safe = appliance_factory(*BASE, "state.stable_after_s=6", env=ADMIN_ENV, home=home, wait="")
    safe.wait_for("/healthz")
    health = admin_get(safe.url, "/admin/health")
    assert health["safe_mode"] is True
    assert "crash loop: 3 unclean starts in a row" in health["safe_mode_reason"]
    assert any("safe mode" in r["reason"] for r in health["reasons"])
    assert health["requests"]["max_running"] == 1  # the safe-mode profile's limits
    assert health["limits_in_force"]["profile"] == "safe-mode"
    assert metric(safe.url, "lmx_safe_mode") == 1.0
    assert metric(safe.url, "lmx_concurrent_limit") == 1.0
    assert metric(safe.url, "lmx_process_starts_total") == 4.0
    assert metric(safe.url, "lmx_unclean_starts_total") == 3.0
    assert "starting in safe mode" in safe.log()
    assert httpx.get(safe.url + "/readyz", timeout=5).status_code == 503

    # A request naming a model that is not loaded: 503, and nothing loads behind it.
    r = _v1(safe.url)
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "safe_mode" and err["type"] == "service_unavailable"
    assert "POST /admin/safe-mode/exit" in err["message"]
    assert r.headers["X-Safe-Mode"] == "on" and int(r.headers["Retry-After"]) >= 1
    time.sleep(0.5)  # a load started by the request would show as loading or loaded by now
    models = admin_get(safe.url, "/admin/models")
    assert models["loaded"] == []
    assert all(m["state"] == "unloaded" and not m["loaded"] for m in models["data"])
    assert metric(safe.url, "lmx_rejected_requests_total", reason="safe_mode") == 1.0

    # Stable running for stable_after_s: safe mode ends by itself, the normal limits are in
    # force and the auto_load models load, in the same process.
    wait_until(
        lambda: admin_get(safe.url, "/admin/health")["safe_mode"] is False,
        timeout=30,
        what="safe mode to end after stable running",
    )
    assert safe.proc.poll() is None
    assert "safe mode ended (stable running)" in safe.log()
    assert metric(safe.url, "lmx_safe_mode") == 0.0
    assert metric(safe.url, "lmx_concurrent_limit") == 8.0
    assert wait_until(lambda: loaded(safe.url) == ["demo"], timeout=30, what="auto-load")
    r = _v1(safe.url)
    assert r.status_code == 200, r.text
    assert "X-Safe-Mode" not in r.headers
    assert _state(home)["starts"][-1]["safe_mode_exit"]["by"] == "stable"

    # Then stable_after_s of normal running clears the history: a crash now is a first one.
    wait_until(lambda: "start history cleared" in safe.log(), timeout=30, what="stable run")
    safe.stop(signal.SIGKILL)
    after = appliance_factory(*BASE, env=ADMIN_ENV, home=home)
    assert admin_get(after.url, "/admin/health")["safe_mode"] is False
    assert loaded(after.url) == ["demo"]
    assert metric(after.url, "lmx_unclean_starts_total") == 4.0


def test_admin_exit_restores_the_normal_limits_without_a_restart(
    appliance_factory: Any, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    _crash_loop(appliance_factory, home, crashes=3)
    safe = appliance_factory(*CRASHING, env=ADMIN_ENV, home=home, wait="/healthz")
    pid = safe.proc.pid
    health = admin_get(safe.url, "/admin/health")
    assert health["safe_mode"] is True and health["requests"]["max_running"] == 1
    assert health["safe_mode_exit"]["automatic_in_s"] > 30
    assert health["models_loaded"] == []
    # An admin may still load a model by hand in safe mode; it serves.
    admin_post(safe.url, "/admin/models/load", {"model": "demo"})
    r = _v1(safe.url)
    assert r.status_code == 200 and r.headers["X-Safe-Mode"] == "on"

    # Without the admin key: refused.
    assert httpx.post(safe.url + "/admin/safe-mode/exit", timeout=10).status_code in (401, 403)
    out = admin_post(safe.url, "/admin/safe-mode/exit", {})
    assert out["was_on"] is True and out["safe_mode"] is False
    assert "crash loop" in out["reason"]
    assert out["limits"]["max_running"] == 8
    health = admin_get(safe.url, "/admin/health")
    assert health["safe_mode"] is False and health["requests"]["max_running"] == 8
    assert health["limits_in_force"]["profile"] == "normal"
    assert health["safe_mode_exit"]["ended"]["by"] == "admin"
    assert metric(safe.url, "lmx_concurrent_limit") == 8.0
    assert metric(safe.url, "lmx_queue_limit") == 32.0
    assert metric(safe.url, "lmx_safe_mode") == 0.0
    assert safe.proc.pid == pid and safe.proc.poll() is None  # the same process throughout
    assert "safe mode ended (by an admin)" in safe.log()
    # Again: a no-op that says so.
    assert admin_post(safe.url, "/admin/safe-mode/exit", {})["was_on"] is False
    # The normal limits really admit several at once now.
    streams = [Stream(safe.url, f"story {i}", 500) for i in range(3)]
    for s in streams:
        s.start()
    assert wait_until(
        lambda: metric(safe.url, "lmx_num_requests_running") == 3.0, timeout=30, what="3 running"
    )
    for s in streams:
        s.join(60)
        assert s.status == 200 and s.done
    wait_until(
        lambda: _state(home)["starts"][-1].get("safe_mode_exit", {}).get("by") == "admin",
        timeout=10,
        what="the exit in the state file",
    )
