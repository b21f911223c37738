"""The status page's pure parts (ring buffer, traffic, snapshot shaping, access rule) and its
routes in process: the access matrix, the admin rate limit, the page's security headers."""

from __future__ import annotations

from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import falcon.testing
import pytest

from appliance.api.status import CSP
from appliance.builder import build
from appliance.config import ModelSpec, compose, load
from appliance.engine.memory import MemoryStats
from appliance.engine.types import EngineStats, ModelInfo
from appliance.status import History, RecentErrors, RingBuffer, Traffic, decide, refresh_interval
from appliance.status.access import (
    ASSETS,
    is_local_client,
    is_loopback_address,
    is_loopback_host,
    kind_of,
)
from appliance.status.board import (
    cache_view,
    errors_view,
    history_view,
    memory_view,
    model_row,
    readiness,
    spec_settings,
)
from appliance.status.history import ModelCounts, median

ADMIN = "status-unit-admin-key"
API = "status-unit-api-key"
LOCAL = {"host": "127.0.0.1:8080", "remote_addr": "127.0.0.1"}
AH = {"Authorization": f"Bearer {ADMIN}"}


class Clock:
    """A settable clock for the pure parts."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def stats(**kw: Any) -> EngineStats:
    base: dict[str, Any] = dict(
        running=0,
        waiting=0,
        max_running=8,
        max_queued=32,
        models_loaded=("demo",),
        threads_alive=1,
        reloading=(),
    )
    base.update(kw)
    return EngineStats(**base)


# -- ring buffer, traffic, history


def test_ring_buffer_keeps_the_last_items_oldest_first() -> None:
    ring: RingBuffer[int] = RingBuffer(3)
    assert len(ring) == 0 and ring.last() is None
    for i in range(5):
        ring.append(i)
    assert list(ring) == [2, 3, 4]
    assert len(ring) == 3 and ring.last() == 4
    with pytest.raises(ValueError):
        RingBuffer(0)


def test_traffic_counts_per_model_and_rates_over_a_window() -> None:
    clock = Clock()
    tr = Traffic(keep=100, clock=clock)
    tr.add("a", tokens=30, prompt_tokens=5, cache_hit=False, ttft_s=0.2)
    clock.t += 10
    tr.add("a", tokens=30, prompt_tokens=5, cache_hit=True, ttft_s=0.4)
    tr.add("b", tokens=7, prompt_tokens=1, cache_hit=False, ttft_s=None)
    assert tr.models["a"] == ModelCounts(2, 60, 10, 1, 1)
    assert tr.requests == 3 and tr.tokens == 67
    assert tr.tokens_per_s("a", window_s=60) == pytest.approx(1.0)
    assert tr.ttft_p50("a") == pytest.approx(0.3)
    assert tr.ttft_p50("b") is None  # no first token: not a TTFT
    clock.t += 61  # both finished more than a minute ago
    assert tr.tokens_per_s("a", window_s=60) == 0.0
    assert tr.ttft_p50("a") == pytest.approx(0.3)  # the median spans the 15 minutes
    clock.t += 15 * 60
    assert tr.ttft_p50("a") is None


def test_traffic_keeps_a_bounded_recent_list() -> None:
    tr = Traffic(keep=4, clock=Clock())
    for _ in range(10):
        tr.add("a", 1, 1, False, 0.1)
    assert len(tr.recent) == 4 and tr.models["a"].requests == 10


def test_history_samples_rates_since_the_last_sample() -> None:
    clock = Clock()
    tr = Traffic(clock=clock)
    now = {"s": stats(running=2, waiting=1)}
    h = History(tr, lambda: now["s"], interval_s=5, window_s=20)
    assert h.samples.capacity == 4
    clock.t += 5
    tr.add("a", 50, 3, False, 0.1)
    tr.add("a", 50, 3, False, 0.3)
    s = h.sample()
    assert (s.tokens_per_s, s.requests_per_s) == (pytest.approx(20.0), pytest.approx(0.4))
    assert (s.running, s.waiting, s.ttft_p50_s) == (2, 1, pytest.approx(0.2))
    clock.t += 5
    s = h.sample()  # nothing finished in this interval
    assert s.tokens_per_s == 0 and s.ttft_p50_s is None
    for _ in range(5):
        clock.t += 5
        h.sample()
    assert len(h.samples) == 4  # 20 s at one sample every 5 s
    view = history_view(h.samples, h.interval_s, h.window_s)
    assert [p["t"] for p in view["samples"]] == [1020.0, 1025.0, 1030.0, 1035.0]


def test_median_ignores_missing_values() -> None:
    assert median([]) is None and median([None]) is None
    assert median([3.0, None, 1.0, 2.0]) == 2.0


# -- recent errors


def test_recent_errors_count_by_status_and_route_bounded() -> None:
    clock = Clock()
    errs = RecentErrors(keep=3, clock=clock)
    errs.record(200, "/v1/models")  # not an error
    errs.record(404, "other", "not_found")
    clock.t += 1
    errs.record(401, "/status.json", "invalid_api_key")
    errs.record(404, "other")
    assert [(e.status, e.path, e.count) for e in errs.items()] == [
        (404, "other", 2),
        (401, "/status.json", 1),
    ]
    assert errs.items()[0].code == "not_found"  # kept when a later one has none
    for status in (500, 503, 429):
        clock.t += 1
        errs.record(status, "/v1/chat/completions")
    # The least recently seen went first.
    assert [e.status for e in errs.items()] == [429, 503, 500]
    view = errors_view(errs.items(), limit=2)
    assert [v["status"] for v in view] == [429, 503]
    assert set(view[0]) == {"status", "path", "count", "code", "first_at", "last_at"}


# -- access


@pytest.mark.parametrize(
    ("kind", "admin_configured", "is_admin", "local", "allowed", "status", "mode", "admin"),
    [
        ("page", True, False, False, True, 200, "key", False),  # the shell holds no data
        ("page", True, False, True, True, 200, "key", False),
        ("data", True, False, True, False, 401, "key", False),  # loopback too needs the key
        ("data", True, False, False, False, 401, "key", False),
        ("data", True, True, False, True, 200, "key", True),
        ("page", False, False, True, True, 200, "open", False),
        ("data", False, False, True, True, 200, "open", False),
        ("page", False, False, False, False, 403, "open", False),
        ("data", False, False, False, False, 403, "open", False),
    ],
)
def test_access_decision(
    kind: str,
    admin_configured: bool,
    is_admin: bool,
    local: bool,
    allowed: bool,
    status: int,
    mode: str,
    admin: bool,
) -> None:
    a = decide(
        kind, admin_configured=admin_configured, is_admin=is_admin, local=local, admin_env="K"
    )
    assert (a.allowed, a.status, a.mode, a.admin) == (allowed, status, mode, admin)
    if not admin_configured:
        assert "K" in a.message  # says how to set a key


def test_status_paths() -> None:
    assert kind_of("/status") == "page" and kind_of("/status.json") == "data"
    assert all(kind_of(p) == "page" for p in ASSETS)
    assert kind_of("/status/other.js") is None and kind_of("/statusx") is None


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.2", False),
        ("::ffff:10.0.0.2", False),
        ("", False),
        (None, False),
        ("not-an-address", False),
    ],
)
def test_loopback_addresses(addr: Optional[str], expected: bool) -> None:
    assert is_loopback_address(addr) is expected


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1:8080", True),
        ("localhost", True),
        ("LOCALHOST:1234", True),
        ("[::1]:8080", True),
        ("app.localhost:80", True),
        ("evil.example:8080", False),
        ("192.168.1.5:8080", False),
        ("", False),
    ],
)
def test_loopback_hosts(host: str, expected: bool) -> None:
    assert is_loopback_host(host) is expected


def test_a_proxy_makes_no_client_local() -> None:
    assert is_local_client("127.0.0.1", "localhost:8080", forwarded=False, behind_proxy=False)
    assert not is_local_client("127.0.0.1", "localhost:8080", forwarded=True, behind_proxy=False)
    assert not is_local_client("127.0.0.1", "localhost:8080", forwarded=False, behind_proxy=True)
    # A DNS-rebinding page reaches a loopback peer under its own name.
    assert not is_local_client("127.0.0.1", "evil.example", forwarded=False, behind_proxy=False)


def test_refresh_interval_leaves_half_the_admin_limit_to_actions() -> None:
    assert refresh_interval(None) == 5.0
    assert refresh_interval("60/minute") == 5.0
    assert refresh_interval("10/minute") == 12.0
    assert refresh_interval("10/minute;100/hour") == 72.0


# -- snapshot shaping


def test_spec_settings_show_the_usual_three_and_what_differs() -> None:
    assert spec_settings(ModelSpec()) == {"context_length": 4096, "max_tokens": 2048, "ttl_s": 0.0}
    s = spec_settings(ModelSpec(path="/m", prefill_step_size=256, demo_shape="llama-1b"))
    assert s["prefill_step_size"] == 256 and s["demo_shape"] == "llama-1b" and "path" not in s
    assert spec_settings(object()) == {}


def test_model_row() -> None:
    info = ModelInfo("demo", "builtin:demo", "loaded", memory_estimate_bytes=123)
    info.requests_served = 4
    row = model_row(
        info,
        ModelSpec(context_length=2048, max_tokens=512),
        running=1,
        waiting=2,
        counts=ModelCounts(3, 90, 30, 1, 2),
        tokens_per_s=1.23456,
        ttft_p50_s=0.0123456789,
        stats=stats(prompt_cache_bytes={"demo": 4096}, prompt_cache_entries={"demo": 2}),
        default=True,
        auto_load=True,
    )
    assert row["loaded"] and row["default"] and row["path"] == "builtin:demo"
    assert row["settings"] == {"context_length": 2048, "max_tokens": 512, "ttl_s": 0.0}
    assert (row["running"], row["waiting"], row["requests_served"]) == (1, 2, 4)
    assert (row["requests_finished"], row["tokens_generated"]) == (3, 90)
    assert row["tokens_per_s"] == 1.235 and row["ttft_p50_s"] == 0.012346
    assert (row["prompt_cache_bytes"], row["prompt_cache_entries"]) == (4096, 2)
    idle = model_row(
        ModelInfo("spare", "builtin:demo", "unloaded"),
        None,
        running=0,
        waiting=0,
        counts=None,
        tokens_per_s=0.0,
        ttft_p50_s=None,
        stats=stats(),
        default=False,
        auto_load=False,
    )
    assert idle["tokens_generated"] == 0 and idle["ttft_p50_s"] is None
    assert idle["prompt_cache_bytes"] is None and idle["settings"] == {}


def test_memory_and_cache_views() -> None:
    m = memory_view(MemoryStats(10, 200, 300, 50, 42.0), 1000, 600, None)
    assert (m["system_used"], m["mlx_active"], m["mlx_cache"], m["limit"]) == (400, 200, 50, None)
    c = cache_view(
        stats(prompt_cache_bytes={"a": 10, "b": 20}, prompt_cache_entries={"a": 1, "b": 2}),
        {"a": ModelCounts(cache_hits=3, cache_misses=1)},
        1 << 20,
    )
    assert (c["entries"], c["bytes"], c["hits"], c["misses"], c["hit_ratio"]) == (3, 30, 3, 1, 0.75)
    # An engine-process model cannot count its entries: the total is unknown, not short.
    partial = stats(prompt_cache_bytes={"a": 10, "b": 20}, prompt_cache_entries={"a": 1})
    c = cache_view(partial, {}, 0)
    assert c["entries"] is None and c["hit_ratio"] is None


def test_readiness_mirrors_readyz() -> None:
    assert readiness(False, [], ["demo"]) == {"ready": True, "reason": None}
    assert readiness(True, [], ["demo"])["reason"] == "draining before exit"
    assert "demo" in readiness(False, ["demo"], [])["reason"]
    assert readiness(False, [], [])["reason"] == "no model is loaded yet"


# -- the routes in process (no model loaded, no server)


def client(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *overrides: str, **env: str) -> Any:
    for k in ("LMX_ADMIN_KEY", "LMX_API_KEYS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    cfg = load(compose(["models.auto_load=[]", "logging.file=none", *overrides]))
    return falcon.testing.TestClient(build(cfg, safe_mode_reason=env.get("SAFE")).app)


def test_without_an_admin_key_only_this_machine_reads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # An API key alone does not close the page to loopback, nor open it to others.
    c = client(monkeypatch, tmp_path, "server.host=0.0.0.0", LMX_API_KEYS=API)
    for path in ("/status", "/status.json", *ASSETS):
        assert c.simulate_get(path, **LOCAL).status_code == 200, path
        r = c.simulate_get(path, host="10.0.0.9:8080", remote_addr="10.0.0.9")
        assert r.status_code == 403 and "LMX_ADMIN_KEY" in r.json["error"]["message"], path
        r = c.simulate_get(path, headers={"X-Forwarded-For": "10.0.0.9"}, **LOCAL)
        assert r.status_code == 403, path
    r = c.simulate_get("/status.json", host="evil.example", remote_addr="127.0.0.1")
    assert r.status_code == 403
    snap = c.simulate_get("/status.json", **LOCAL).json
    assert snap["access"]["mode"] == "open" and not snap["access"]["admin_actions"]
    assert "LMX_ADMIN_KEY" in snap["access"]["note"]
    assert [m["name"] for m in snap["models"]] == ["smollm2", "demo"]
    assert snap["readiness"] == {"ready": False, "reason": "no model is loaded yet"}


def test_with_an_admin_key_the_data_needs_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    c = client(monkeypatch, tmp_path, LMX_ADMIN_KEY=ADMIN, LMX_API_KEYS=API)
    page = c.simulate_get("/status", **LOCAL)
    assert page.status_code == 200 and 'data-mode="key"' in page.text
    for headers in ({}, {"Authorization": f"Bearer {API}"}, {"Authorization": "Bearer nope"}):
        r = c.simulate_get("/status.json", headers=headers, **LOCAL)
        assert r.status_code == 401 and r.json["error"]["code"] == "invalid_api_key"
    r = c.simulate_get("/status.json", headers=AH, **LOCAL)
    assert r.status_code == 200 and r.json["access"]["admin_actions"] is True
    # The key is refused in a URL: only the header counts.
    assert c.simulate_get("/status.json", query_string=f"key={ADMIN}", **LOCAL).status_code == 401
    # The errors the page lists include these refusals.
    errs = c.simulate_get("/status.json", headers=AH, **LOCAL).json["errors"]
    assert {"status": 401, "path": "/status.json", "count": 4} in [
        {k: e[k] for k in ("status", "path", "count")} for e in errs
    ]


def test_without_auth_in_the_stack_the_data_stays_closed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    c = client(monkeypatch, tmp_path, "middleware=[request_id]", LMX_ADMIN_KEY=ADMIN)
    assert c.simulate_get("/status.json", headers=AH, **LOCAL).status_code == 401
    assert c.simulate_get("/status", **LOCAL).status_code == 200


def test_the_admin_rate_limit_counts_the_page_and_its_data(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    c = client(monkeypatch, tmp_path, "rate_limits.admin=3/minute", LMX_ADMIN_KEY=ADMIN)
    assert c.simulate_get("/status", headers=AH, **LOCAL).status_code == 200
    assert c.simulate_get("/status.json", headers=AH, **LOCAL).status_code == 200
    r = c.simulate_get("/status.json", headers=AH, **LOCAL)
    assert r.status_code == 200 and r.headers["ratelimit-remaining"] == "0"
    assert r.json["access"]["refresh_s"] == 40.0  # half of 3 a minute
    r = c.simulate_get("/status.json", headers=AH, **LOCAL)
    assert r.status_code == 429 and "retry-after" in r.headers
    # The page's own files are not counted (cached, no data).
    assert c.simulate_get("/status/app.js", **LOCAL).status_code == 200


def test_leaving_safe_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    c = client(monkeypatch, tmp_path, LMX_ADMIN_KEY=ADMIN, SAFE="crash loop: 3 starts")
    snap = c.simulate_get("/status.json", headers=AH, **LOCAL).json
    assert snap["safe_mode"] == {"on": True, "reason": "crash loop: 3 starts"}
    assert c.simulate_post("/admin/safe-mode/exit", **LOCAL).status_code == 401
    r = c.simulate_post("/admin/safe-mode/exit", json={"force": True}, headers=AH, **LOCAL)
    assert r.status_code == 400
    r = c.simulate_post("/admin/safe-mode/exit", headers=AH, **LOCAL)
    assert r.status_code == 200
    assert r.json["was_on"] is True and r.json["reason"] == "crash loop: 3 starts"
    snap = c.simulate_get("/status.json", headers=AH, **LOCAL).json
    assert snap["safe_mode"] == {"on": False, "reason": None}
    assert not any("safe mode" in x["reason"] for x in snap["health"]["reasons"])
    r = c.simulate_post("/admin/safe-mode/exit", json={}, headers=AH, **LOCAL)
    assert r.status_code == 200 and r.json["was_on"] is False and r.json["safe_mode"] is False


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, Optional[str]]]] = []
        self.script_text = ""
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Optional[str]]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.script_text += data


@pytest.mark.parametrize("admin_key", [None, ADMIN])
def test_the_page_has_no_inline_code_and_strict_headers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, admin_key: Optional[str]
) -> None:
    env = {"LMX_ADMIN_KEY": admin_key} if admin_key else {}
    r = client(monkeypatch, tmp_path, **env).simulate_get("/status", **LOCAL)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))
    assert r.headers["content-security-policy"] == CSP
    assert csp["script-src"] == "'self'" and csp["style-src"] == "'self'"
    assert csp["default-src"] == "'none'" and csp["frame-ancestors"] == "'none'"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    page = _Tags()
    page.feed(r.text)
    scripts = [a for t, a in page.tags if t == "script"]
    assert scripts == [{"src": "/status/app.js", "defer": None}] and page.script_text == ""
    for tag, attrs in page.tags:
        assert tag != "style"
        assert "style" not in attrs, tag
        assert not [a for a in attrs if a.startswith("on")], (tag, attrs)
    dialog = [a for t, a in page.tags if t == "dialog"]
    assert dialog and dialog[0]["id"] == "confirm"
    # The key form shows only when an admin key is set; no data in the HTML either way.
    key_panel = next(a for t, a in page.tags if a.get("id") == "key-panel")
    assert ("hidden" in key_panel) is (admin_key is None)
    assert "builtin:demo" not in r.text


def test_every_asset_ships_in_the_package() -> None:
    folder = resources.files("appliance.api") / "status_assets"
    names = {p.name for p in folder.iterdir()}
    assert set(ASSETS.values()) | {"status.html"} <= names
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"appliance.api" = ["status_assets/*"]' in pyproject
