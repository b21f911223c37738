"""Crash recovery and crash-loop detection with real processes killed by SIGKILL.

Each test keeps one `home` (so one XDG_STATE_HOME, so one state file) across the restarts.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from ._resilience import ADMIN_ENV, BASE, admin_get, admin_post, loaded, metric, wait_until

pytestmark = pytest.mark.timeout(120)

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


def test_three_starts_in_the_window_put_the_third_in_safe_mode(
    appliance_factory: Any, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    # stable_after_s: the safe-mode run below becomes stable and ends the crash loop.
    args = (
        *BASE,
        "state.crash_loop.starts=3",
        "state.crash_loop.window_s=120",
        "state.stable_after_s=3",
    )
    for _ in range(2):
        a = appliance_factory(*args, env=ADMIN_ENV, home=home, wait="/healthz")
        a.stop(signal.SIGKILL)  # before it has run stable_after_s

    third = appliance_factory(*args, env=ADMIN_ENV, home=home, wait="/healthz")
    health = admin_get(third.url, "/admin/health")
    assert health["safe_mode"] is True
    assert "crash loop: 3 starts within 120 s" in health["safe_mode_reason"]
    assert any("safe mode" in r["reason"] for r in health["reasons"])
    assert metric(third.url, "lmx_safe_mode") == 1.0
    assert "starting in safe mode" in third.log()
    # The safe-mode profile: no auto-load, its limits.
    assert health["models_loaded"] == []
    assert health["requests"]["max_running"] == 1
    assert httpx.get(third.url + "/readyz", timeout=5).status_code == 503
    config = admin_get(third.url, "/admin/config")
    assert config["models"]["auto_load"] == []
    # A model still loads on demand.
    r = httpx.post(
        third.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30
    )
    assert r.status_code == 200, r.text

    # Stable for stable_after_s: the history is cleared, so a crash now does not loop.
    wait_until(lambda: "start history cleared" in third.log(), timeout=20, what="stable run")
    assert "safe mode ends at the next start" in third.log()
    third.stop(signal.SIGKILL)
    fourth = appliance_factory(*args, env=ADMIN_ENV, home=home)
    assert admin_get(fourth.url, "/admin/health")["safe_mode"] is False
    assert metric(fourth.url, "lmx_safe_mode") == 0.0
    assert loaded(fourth.url) == ["demo"]
