"""security.metrics_allow: /metrics without a key only from the listed networks (the client
address taken from the ASGI scope), with a key from anywhere; empty keeps open_metrics."""

from __future__ import annotations

from typing import Any

import falcon.testing
import httpx
import pytest

from appliance.builder import build
from appliance.config import compose, load

pytestmark = pytest.mark.timeout(120)

API_KEY = "sk-metrics-access-7171"
ADMIN = "adm-metrics-access-8282"
# The real server's clients come from 127.0.0.1, which this list leaves out.
APPLIANCE_OVERRIDES = ("logging.file=none", "security.metrics_allow=[192.0.2.0/24]")
APPLIANCE_ENV = {"LMX_API_KEYS": API_KEY, "LMX_ADMIN_KEY": ADMIN}


def test_a_client_outside_the_list_needs_a_key(module_appliance: Any) -> None:
    url = module_appliance.url + "/metrics"
    r = httpx.get(url, timeout=10)
    assert r.status_code == 401, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_api_key"
    assert "security.metrics_allow" in err["message"] and "127.0.0.1" in err["message"]
    for key in (API_KEY, ADMIN):
        ok = httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert ok.status_code == 200 and "lmx_num_requests_running" in ok.text
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    # The probes are untouched by it.
    assert httpx.get(module_appliance.url + "/healthz", timeout=10).status_code == 200


def _client(*overrides: str) -> falcon.testing.TestClient:
    base = [
        "logging.file=none",
        "models.auto_load=[]",
        "server.allowed_hosts=[falconframework.org]",
    ]
    cfg = load(compose([*base, *overrides]))
    return falcon.testing.TestClient(build(cfg).app)


@pytest.mark.parametrize(
    ("allow", "addr", "status"),
    [
        ("[10.0.0.0/24]", "10.0.0.7", 200),
        ("[10.0.0.0/24]", "10.0.1.7", 401),
        ("[10.0.0.5/32,'::1/128']", "::1", 200),
        ("[10.0.0.5/32]", "::ffff:10.0.0.5", 200),  # IPv4-mapped, as a dual-stack socket says
        ("[10.0.0.5/32]", "2001:db8::5", 401),
    ],
)
def test_addresses_in_and_out_of_the_list(
    monkeypatch: pytest.MonkeyPatch, allow: str, addr: str, status: int
) -> None:
    monkeypatch.setenv("LMX_API_KEYS", API_KEY)
    client = _client(f"security.metrics_allow={allow}")
    assert client.simulate_get("/metrics", remote_addr=addr).status_code == status
    keyed = client.simulate_get("/metrics", remote_addr=addr, headers={"X-API-Key": API_KEY})
    assert keyed.status_code == 200


def test_without_a_key_configured_only_the_list_gets_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LMX_API_KEYS", raising=False)
    monkeypatch.delenv("LMX_ADMIN_KEY", raising=False)
    client = _client("security.metrics_allow=[10.0.0.0/8]")
    assert client.simulate_get("/metrics", remote_addr="10.1.2.3").status_code == 200
    assert client.simulate_get("/metrics", remote_addr="192.168.1.9").status_code == 401


def test_an_empty_list_keeps_open_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMX_API_KEYS", API_KEY)
    assert _client().simulate_get("/metrics", remote_addr="203.0.113.9").status_code == 200
    closed = _client("security.open_metrics=false")
    assert closed.simulate_get("/metrics", remote_addr="127.0.0.1").status_code == 401
