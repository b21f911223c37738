"""The middleware stack on real servers: host guard, CORS, body limit, request ids, the access
log, and profiles that reorder or drop middleware."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import falcon.testing
import httpx
import pytest

from appliance.builder import build
from appliance.config import compose, load
from appliance.engine import arrivals as arrivals_mod
from appliance.middleware import fingerprint

pytestmark = pytest.mark.timeout(120)

KEY = "sk-middleware-5151"
ADMIN = "adm-Middleware-6262"
OK_ORIGIN = "https://ok.example"
APPLIANCE_OVERRIDES = [
    "server.allowed_hosts=[appliance.lan]",
    f"security.cors_origins=['{OK_ORIGIN}']",
    "limits.max_body_bytes=4096",
]
APPLIANCE_ENV = {"LMX_API_KEYS": KEY}
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
PREFLIGHT = {
    "Origin": OK_ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as client:
        yield client


@pytest.mark.parametrize(
    "host, status",
    [
        ("evil.example", 403),
        ("evil.example:8080", 403),
        ("192.168.1.20", 403),
        ("localhost.evil.example", 403),
        ("appliance.lan", 200),  # in server.allowed_hosts
        ("localhost", 200),
        ("LOCALHOST:8080", 200),
        ("127.0.0.1", 200),
        ("[::1]:8080", 200),
    ],
)
def test_host_guard(module_appliance: Any, http: httpx.Client, host: str, status: int) -> None:
    r = http.get(module_appliance.url + "/v1/models", headers={**AUTH, "Host": host})
    assert r.status_code == status, r.text
    if status == 403:
        err = r.json()["error"]
        assert (err["type"], err["code"]) == ("permission_error", "forbidden_host")
        assert "server.allowed_hosts" in err["message"]


def test_cors(module_appliance: Any, http: httpx.Client) -> None:
    url = module_appliance.url + "/v1/chat/completions"
    # A listed origin: preflight answered without a key (browsers send none), headers echoed.
    r = http.options(url, headers=PREFLIGHT)
    assert r.status_code == 204, r.text
    assert r.headers["Access-Control-Allow-Origin"] == OK_ORIGIN
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "authorization" in r.headers["Access-Control-Allow-Headers"].lower()
    assert "Origin" in r.headers["Vary"]
    ok = http.post(url, json=CHAT, headers={**AUTH, "Origin": OK_ORIGIN})
    assert ok.status_code == 200 and ok.headers["Access-Control-Allow-Origin"] == OK_ORIGIN
    # Errors carry the header too, so the page can read the error object.
    denied = http.post(url, json=CHAT, headers={"Origin": OK_ORIGIN})
    assert denied.status_code == 401 and denied.headers["Access-Control-Allow-Origin"] == OK_ORIGIN
    # An unlisted origin: preflight refused, and no allow header on a real request.
    bad = http.options(url, headers={**PREFLIGHT, "Origin": "https://evil.example"})
    assert bad.status_code == 403
    assert bad.json()["error"]["code"] == "cors_forbidden"
    assert "Access-Control-Allow-Origin" not in bad.headers
    r = http.post(url, json=CHAT, headers={**AUTH, "Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers
    r = http.post(url, json=CHAT, headers=AUTH)  # no Origin: not a browser, nothing to add
    assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers


def test_body_limit(module_appliance: Any, http: httpx.Client) -> None:
    url = module_appliance.url + "/v1/chat/completions"
    big = {"messages": [{"role": "user", "content": "x" * 5000}], "max_tokens": 1}
    r = http.post(url, json=big, headers=AUTH)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    # Without Content-Length (chunked), the read stops at the limit.
    payload = json.dumps(big).encode()
    chunks = (payload[i : i + 1000] for i in range(0, len(payload), 1000))
    r = http.post(url, content=chunks, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413
    # Under the limit it is served.
    assert http.post(url, json=CHAT, headers=AUTH).status_code == 200


def test_body_limit_answers_before_the_body(module_appliance: Any) -> None:
    """Headers announce 100 MB and only the first KB is sent: the 413 comes anyway.

    (Falcon waits for the first body event before it runs any middleware, so one chunk must
    arrive; the rest is never read.)
    """
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        "Content-Length: 100000000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", module_appliance.port), timeout=10) as s:
        s.sendall(head.encode() + b'{"messages": "' + b"x" * 1000)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 413"), data[:200]


def test_request_id_and_access_log(module_appliance: Any, http: httpx.Client) -> None:
    url = module_appliance.url
    r = http.post(
        url + "/v1/chat/completions", json=CHAT, headers={**AUTH, "X-Request-ID": "trace-abc-123"}
    )
    assert r.status_code == 200 and r.headers["X-Request-ID"] == "trace-abc-123"
    fresh = http.get(url + "/healthz").headers["X-Request-ID"]
    assert len(fresh) == 32 and int(fresh, 16) >= 0
    assert http.get(url + "/healthz").headers["X-Request-ID"] != fresh
    bad = http.get(url + "/healthz", headers={"X-Request-ID": "x" * 200}).headers["X-Request-ID"]
    assert bad != "x" * 200  # over 128 characters: replaced
    lines = []
    for line in module_appliance.log().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("logger") == "appliance.access" and rec.get("request_id") == "trace-abc-123":
            lines.append(rec)
    assert len(lines) == 1, lines
    rec = lines[0]
    assert (rec["method"], rec["path"], rec["status"], rec["model"]) == (
        "POST",
        "/v1/chat/completions",
        200,
        "demo",
    )
    assert isinstance(rec["latency_ms"], float)
    assert rec["key"] == fingerprint(KEY)
    assert rec["api"] == "openai"
    usage = r.json()["usage"]
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert KEY not in module_appliance.log()


def _access(appliance: Any, rid: str) -> list[dict[str, Any]]:
    out = []
    for line in appliance.log().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("logger") == "appliance.access" and rec.get("request_id") == rid:
            out.append(rec)
    return out


def test_a_stream_is_logged_at_its_end_with_its_tokens(
    module_appliance: Any, http: httpx.Client
) -> None:
    body = {
        "prompt": "Once upon",
        "max_tokens": 7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {**AUTH, "X-Request-ID": "stream-log-1"}
    usage = None
    url = module_appliance.url + "/v1/completions"
    with http.stream("POST", url, json=body, headers=headers) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"usage"' in line:
                usage = json.loads(line[6:]).get("usage") or usage
    assert usage is not None
    for path, api in (("/healthz", "probe"), ("/admin/health", "admin"), ("/nowhere", "other")):
        http.get(module_appliance.url + path, headers={"X-Request-ID": f"api-{api}"})
    deadline = time.monotonic() + 5
    while not _access(module_appliance, "stream-log-1") and time.monotonic() < deadline:
        time.sleep(0.05)
    (rec,) = _access(module_appliance, "stream-log-1")
    assert rec["stream"] is True and rec["status"] == 200 and rec["api"] == "openai"
    assert rec["completion_tokens"] == usage["completion_tokens"] > 0
    assert rec["prompt_tokens"] == usage["prompt_tokens"]
    for api in ("probe", "admin", "other"):
        (line,) = _access(module_appliance, f"api-{api}")
        assert line["api"] == api and line["prompt_tokens"] is None


def test_unknown_middleware_is_a_config_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LMX_API_KEYS", "LMX_ADMIN_KEY")}
    p = subprocess.run(
        [sys.executable, "-m", "appliance", "middleware=[request_id,bogus,auth]"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "middleware[1]" in lines[0] and "bogus" in lines[0], p.stderr


def test_reordered_and_dropped_middleware(appliance_factory: Any, http: httpx.Client) -> None:
    """auth before cors: a preflight meets auth first (401). Without host_guard any Host passes;
    without load_shedding memory_percent=1 sheds nothing. The module's server shows the
    default stack doing the opposite."""
    a = appliance_factory(
        "middleware=[request_id,access_log,body_limit,auth,cors,rate_limit]",
        "shedding.memory_percent=1",
        f"security.cors_origins=['{OK_ORIGIN}']",
        env={"LMX_API_KEYS": KEY},
    )
    url = a.url
    assert http.get(url + "/healthz", headers={"Host": "evil.example"}).status_code == 200
    r = http.options(url + "/v1/chat/completions", headers=PREFLIGHT)
    assert r.status_code == 401, r.text
    assert http.post(url + "/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
    assert http.post(url + "/v1/chat/completions", json=CHAT).status_code == 401


def test_without_auth_v1_is_open_and_admin_closed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """In process (no model needed): a stack without auth opens /v1 even with LMX_API_KEYS
    set, and leaves the admin API closed even with the admin key."""
    monkeypatch.setenv("LMX_API_KEYS", KEY)
    monkeypatch.setenv("LMX_ADMIN_KEY", ADMIN)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    cfg = load(
        compose(
            [
                "middleware=[request_id,body_limit,cors,load_shedding,rate_limit]",
                "models.auto_load=[]",
                f"state.path={tmp_path / 'state.json'}",
            ]
        )
    )
    client = falcon.testing.TestClient(build(cfg).app)
    assert client.simulate_get("/v1/models").status_code == 200  # no key, yet served
    for path in ("/admin/health", "/admin/config"):
        r = client.simulate_get(path, headers={"x-api-key": ADMIN})
        assert r.status_code == 403
        assert r.json["error"]["code"] == "admin_disabled"
        assert "auth" in r.json["error"]["message"]
    r = client.simulate_post(
        "/admin/models/load", json={"model": "demo"}, headers={"x-api-key": ADMIN}
    )
    assert r.status_code == 403


def test_refused_requests_are_no_longer_counted_as_on_their_way(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """In process: the count of requests on their way to an engine (engine/arrivals.py) that
    the generation thread waits for goes back to 0 after requests refused for bad input, an
    unknown model or a wrong method; a leak would hold every later join for ARRIVING_WAIT_S."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    cfg = load(
        compose(
            ["models.auto_load=[]", "logging.file=none", f"state.path={tmp_path / 'state.json'}"]
        )
    )
    a = build(cfg)
    arrivals = a.engine.arrivals
    client = falcon.testing.TestClient(arrivals.wrap(a.app))
    url, H = "/v1/chat/completions", "127.0.0.1"
    assert (
        client.simulate_post(
            url, body=b"{not json", headers={"content-type": "application/json"}, host=H
        ).status_code
        == 400
    )
    assert client.simulate_post(url, json={"model": "demo"}, host=H).status_code == 400
    assert (
        client.simulate_post(
            "/v1/completions/", json={"model": "demo", "prompt": "x", "max_tokens": 0}, host=H
        ).status_code
        == 400
    )
    r = client.simulate_post(
        url, json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, host=H
    )
    assert r.status_code == 404 and r.json["error"]["param"] == "model"
    assert client.simulate_get(url, host=H).status_code == 405
    assert client.simulate_get("/healthz", host=H).status_code == 200
    assert (arrivals.started, arrivals.pending, arrivals()) == (0, 0, 0)


def test_a_generation_request_counts_as_on_its_way_while_its_body_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From its handler's start a generation POST counts as on its way (a generation thread
    that looked between the start and the parse used to see nobody coming and start a join
    alone), for READING_S at most while its body is not parsed (a stalled client must not hold
    every join), then as parsed until handed over; other routes count only until their handler
    starts."""
    monkeypatch.setattr(arrivals_mod, "READING_S", 0.05)
    arrivals = arrivals_mod.Arrivals()
    seen: dict[str, list[int]] = {}

    async def handler(scope: dict[str, Any], receive: Any, send: Any) -> None:
        counts = seen.setdefault(f"{scope['method']} {scope['path']}", [])
        counts.append(arrivals())  # its body not read yet
        await asyncio.sleep(0.06)  # a client slower than READING_S
        counts.append(arrivals())
        if scope["path"].startswith("/v1/chat"):
            arrivals.on_the_way(scope)  # parsed
            counts.append(arrivals())
            arrivals.admitting(scope)  # in the inbox
            counts.append(arrivals())

    async def go() -> None:
        app = arrivals.wrap(handler)
        for method, path in (
            ("POST", "/v1/chat/completions"),
            ("POST", "/v1/messages/"),
            ("GET", "/v1/models"),
            ("POST", "/v1/embeddings"),
        ):
            await app({"type": "http", "method": method, "path": path}, None, None)

    asyncio.run(go())
    assert seen == {
        "POST /v1/chat/completions": [1, 0, 1, 0],
        "POST /v1/messages/": [1, 0],
        "GET /v1/models": [0, 0],
        "POST /v1/embeddings": [0, 0],
    }
    assert arrivals() == 0 and not arrivals.reading


def test_requests_in_a_load_or_in_the_batch_are_not_counted_as_on_their_way(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, demo_cache: Path
) -> None:
    """In process, with the real engine (engine/arrivals.py): a request whose model is not loaded
    yet waits seconds for the load, and meanwhile other models' joins must not wait for it; a
    request is on its way until it is in the generation thread's inbox and not after (the thread
    counts before it looks at its inbox, so it neither misses one handed over meanwhile nor
    waits for one it has)."""
    import asyncio

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_cache))
    cfg = load(
        compose(
            ["models.auto_load=[]", "logging.file=none", f"state.path={tmp_path / 'state.json'}"]
        )
    )
    a = build(cfg)
    arrivals = a.engine.arrivals
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    async def scenario() -> tuple[int, list[int], int]:
        async with falcon.testing.ASGIConductor(arrivals.wrap(a.app)) as conductor:
            post = asyncio.ensure_future(
                conductor.simulate_post("/v1/chat/completions", json=body, host="127.0.0.1")
            )
            for _ in range(20_000):
                if a.engine.registry.info("demo").state == "loading":
                    break
                await asyncio.sleep(0.001)
            loading = arrivals()
            assert (await post).status_code == 200
            worker = a.engine.registry.worker("demo")
            assert worker is not None
            at_submit: list[int] = []
            submit = worker.submit
            monkeypatch.setattr(
                worker, "submit", lambda g: (at_submit.append(arrivals()), submit(g))
            )
            r = await conductor.simulate_post("/v1/chat/completions", json=body, host="127.0.0.1")
            assert r.status_code == 200
            return loading, at_submit, arrivals()

    assert asyncio.run(scenario()) == (0, [1], 0)
