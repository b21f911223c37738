"""The admin API on a real server: models, load / unload (waiting for or failing in-flight
requests), body validation, health and the redacted config."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import appliance
from appliance.builder import build
from appliance.config import compose, load

pytestmark = pytest.mark.timeout(120)

ADMIN = "adm-Admin-Test-7781"
API = "sk-admin-module-4455"
# A second catalog entry to load and unload without touching the default model.
APPLIANCE_OVERRIDES = [
    "+models.catalog.spare={path:'builtin:demo',context_length:1024,max_tokens:600}"
]
APPLIANCE_ENV = {"LMX_ADMIN_KEY": ADMIN, "LMX_API_KEYS": API}
AH = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60, headers=AH) as client:
        yield client


def models(http: httpx.Client, url: str) -> dict[str, dict[str, Any]]:
    r = http.get(url + "/admin/models")
    assert r.status_code == 200, r.text
    return {m["name"]: m for m in r.json()["data"]}


class Stream:
    """A streaming completion on one model, read on demand."""

    def __init__(self, url: str, model: str, max_tokens: int) -> None:
        self.client = httpx.Client(timeout=60)
        body = {
            "model": model,
            "prompt": "once upon a time",
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        self._cm = self.client.stream(
            "POST", url + "/v1/completions", json=body, headers={"x-api-key": API}
        )
        self.resp = self._cm.__enter__()
        assert self.resp.status_code == 200
        self.lines = self.resp.iter_lines()
        self.chunks: list[dict[str, Any]] = []

    def first_token(self) -> None:
        for line in self.lines:
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                self.chunks.append(chunk)
                if chunk.get("choices") and chunk["choices"][0]["text"]:
                    return
        raise AssertionError("no token came")

    def rest(self) -> list[dict[str, Any]]:
        for line in self.lines:
            if line.startswith("data: {"):
                self.chunks.append(json.loads(line[6:]))
        self._cm.__exit__(None, None, None)
        self.client.close()
        return self.chunks


def test_models_lists_catalog_and_state(module_appliance: Any, http: httpx.Client) -> None:
    r = http.get(module_appliance.url + "/admin/models")
    assert r.status_code == 200
    data = r.json()
    assert data["loaded"] == ["demo"] and data["default"] == "demo"
    by_name = {m["name"]: m for m in data["data"]}
    demo, spare = by_name["demo"], by_name["spare"]
    assert (demo["state"], demo["loaded"], demo["default"], demo["auto_load"]) == (
        "loaded",
        True,
        True,
        True,
    )
    assert demo["memory_estimate_bytes"] > 0
    assert demo["loaded_at"] is not None and demo["error"] is None
    assert isinstance(demo["last_load_seconds"], float) and 0 < demo["last_load_seconds"] < 60
    assert isinstance(demo["requests_served"], int) and demo["in_flight"] == 0
    assert (spare["state"], spare["loaded"], spare["auto_load"]) == ("unloaded", False, False)
    assert spare["context_length"] == 1024 and spare["max_tokens"] == 600
    assert spare["last_used"] is None and spare["requests_served"] == 0
    assert spare["last_load_seconds"] is None


def test_load_serve_and_count(module_appliance: Any, http: httpx.Client) -> None:
    url = module_appliance.url
    r = http.post(url + "/admin/models/load", json={"model": "spare"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["already_loaded"] is False
    assert out["model"]["state"] == "loaded" and out["model"]["memory_estimate_bytes"] > 0
    again = http.post(url + "/admin/models/load", json={"model": "spare"})
    assert again.status_code == 200 and again.json()["already_loaded"] is True
    chat = httpx.post(
        url + "/v1/chat/completions",
        headers={"x-api-key": API},
        timeout=60,
        json={"model": "spare", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert chat.status_code == 200 and chat.json()["model"] == "spare"
    spare = models(http, url)["spare"]
    assert spare["requests_served"] == 1 and spare["last_used"] is not None
    assert sorted(http.get(url + "/admin/health").json()["models_loaded"]) == ["demo", "spare"]


def test_unload_waits_for_in_flight(module_appliance: Any, http: httpx.Client) -> None:
    url = module_appliance.url
    http.post(url + "/admin/models/load", json={"model": "spare"}).raise_for_status()
    s = Stream(url, "spare", max_tokens=300)
    s.first_token()  # in the batch now
    answer: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: answer.update(
            r=http.post(url + "/admin/models/unload", json={"model": "spare", "timeout_s": 30})
        )
    )
    t.start()
    chunks = s.rest()
    t.join(60)
    r = answer["r"]
    assert r.status_code == 200, r.text
    assert r.json()["in_flight_at_start"] == 1
    assert r.json()["model"]["state"] == "unloaded"
    # The request ran to its end: every token, no error chunk.
    assert not [c for c in chunks if "error" in c]
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert usage and usage[0]["completion_tokens"] == 300
    assert models(http, url)["spare"]["state"] == "unloaded"


def test_unload_fails_in_flight_after_timeout(module_appliance: Any, http: httpx.Client) -> None:
    url = module_appliance.url
    http.post(url + "/admin/models/load", json={"model": "spare"}).raise_for_status()
    s = Stream(url, "spare", max_tokens=600)
    s.first_token()
    r = http.post(url + "/admin/models/unload", json={"model": "spare", "timeout_s": 0})
    assert r.status_code == 200, r.text
    assert r.json()["in_flight_at_start"] == 1
    chunks = s.rest()
    errors = [c["error"] for c in chunks if "error" in c]
    assert len(errors) == 1 and errors[0]["code"] == "engine_failure", chunks[-2:]
    assert "unloaded" in errors[0]["message"]
    assert models(http, url)["spare"]["state"] == "unloaded"
    # The slot went back: the default model still serves.
    ok = httpx.post(
        url + "/v1/completions",
        headers={"x-api-key": API},
        timeout=60,
        json={"prompt": "a", "max_tokens": 1},
    )
    assert ok.status_code == 200
    health = http.get(url + "/admin/health").json()
    assert health["requests"]["running"] == 0


@pytest.mark.parametrize(
    "path, content, status, param",
    [
        ("/admin/models/load", b"", 400, "model"),
        ("/admin/models/load", b"{not json", 400, None),
        ("/admin/models/load", b"[1, 2]", 400, None),
        ("/admin/models/load", b"{}", 400, "model"),
        ("/admin/models/load", b'{"model": 3}', 400, "model"),
        ("/admin/models/load", b'{"model": ""}', 400, "model"),
        ("/admin/models/load", b'{"model": "demo", "force": true}', 400, "force"),
        ("/admin/models/load", b'{"model": "nope"}', 404, "model"),
        ("/admin/models/unload", b'{"model": "nope"}', 404, "model"),
        ("/admin/models/unload", b'{"model": "demo", "timeout_s": -1}', 400, "timeout_s"),
        ("/admin/models/unload", b'{"model": "demo", "timeout_s": "soon"}', 400, "timeout_s"),
        ("/admin/models/unload", b'{"model": "demo", "timeout_s": true}', 400, "timeout_s"),
    ],
)
def test_body_validation(
    module_appliance: Any, http: httpx.Client, path: str, content: bytes, status: int, param: Any
) -> None:
    r = http.post(
        module_appliance.url + path, content=content, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert err["code"] == ("model_not_found" if status == 404 else "invalid_request")
    assert models(http, module_appliance.url)["demo"]["state"] == "loaded"


def test_wrong_methods(module_appliance: Any, http: httpx.Client) -> None:
    url = module_appliance.url
    assert http.get(url + "/admin/models/load").status_code == 405
    assert http.post(url + "/admin/health", json={}).status_code == 405
    assert http.get(url + "/admin/nothing").status_code == 404


def test_health(module_appliance: Any, http: httpx.Client) -> None:
    r = http.get(module_appliance.url + "/admin/health")
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["reasons"] == []
    assert 0 < h["system_memory_percent"] < 100
    mem = h["memory_bytes"]
    assert mem["rss"] > 0
    for kind in ("mlx_active", "mlx_peak", "mlx_cache"):  # numbers on MLX's CPU backend
        assert isinstance(mem[kind], int)
    assert "demo" in h["models_loaded"]
    assert h["requests"] == {"running": 0, "waiting": 0, "max_running": 8, "max_queued": 32}
    assert h["generation_threads_alive"] == len(h["models_loaded"])
    assert h["helpers"] == {}
    assert h["uptime_s"] > 0
    assert h["version"] == appliance.__version__
    assert h["safe_mode"] is False and h["safe_mode_reason"] is None and h["draining"] is False
    assert h["safe_mode_exit"]["automatic_in_s"] is None
    assert h["limits_in_force"]["profile"] == "normal" and h["limits_in_force"]["max_running"] == 8
    # The hardening plan's names, beside the appliance's own (same values, GB = 10^9 bytes).
    assert h["memory_usage_percent"] == h["system_memory_percent"]
    assert h["in_flight_requests"] == h["requests"]["running"] + h["requests"]["waiting"] == 0
    assert set(h["metal"]) == {"active_memory_gb", "peak_memory_gb", "cache_memory_gb"}
    assert h["metal"]["active_memory_gb"] > 0  # the demo model's weights
    assert abs(h["metal"]["peak_memory_gb"] - mem["mlx_peak"] / 1e9) < 0.01


def test_config_is_redacted(module_appliance: Any, http: httpx.Client) -> None:
    r = http.get(module_appliance.url + "/admin/config")
    assert r.status_code == 200
    assert ADMIN not in r.text and API not in r.text
    cfg = r.json()
    assert cfg["security"]["admin_keys"] == ["<redacted>"]
    assert cfg["security"]["api_keys"] == ["<redacted>"]
    assert cfg["security"]["admin_keys_env"] == "LMX_ADMIN_KEY"
    assert cfg["server"]["port"] == module_appliance.port
    assert cfg["models"]["catalog"]["spare"]["context_length"] == 1024
    assert cfg["middleware"][0] == "request_id"


def test_health_checks_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Other parts add reasons and sections to the health report through `Health`.

    Built in this process without starting it: no model is loaded, so the status is failing.
    """
    monkeypatch.setenv("LMX_ADMIN_KEY", ADMIN)
    service = build(load(compose([])))
    health = service.health
    assert health.report()["status"] == "failing"

    health.add_check(lambda: None)
    health.add_check(lambda: ("degraded", "helper rerank is slow"))
    health.add_check(lambda: [("ok", "fine"), ("degraded", "cache is cold")])

    def broken() -> None:
        raise RuntimeError("boom")

    health.add_check(broken)
    health.add_section(
        "helpers", lambda: {"embedding": {"url": "http://10.0.0.2:8081", "up": True}}
    )
    report = health.report()
    reasons = [(r["status"], r["reason"]) for r in report["reasons"]]
    assert ("failing", "no model is loaded") in reasons
    assert ("degraded", "helper rerank is slow") in reasons
    assert ("degraded", "cache is cold") in reasons
    assert any(s == "degraded" and "boom" in m for s, m in reasons)
    assert all(s != "ok" for s, _ in reasons)
    assert report["status"] == "failing"
    assert report["helpers"] == {"embedding": {"url": "http://10.0.0.2:8081", "up": True}}
    service.lifecycle.safe_mode_reason = "3 unclean starts in 60 s"
    assert ("degraded", "safe mode: 3 unclean starts in 60 s") in [
        (r["status"], r["reason"]) for r in health.report()["reasons"]
    ]
    assert health.report()["safe_mode"] is True
