"""The auth matrix on a real server with keys from LMX_ADMIN_KEY / LMX_API_KEYS, the real
`openai` client with and without a key, and a server with no admin key (admin API closed)."""

from __future__ import annotations

import logging
from typing import Any

import falcon.testing
import httpx
import openai
import pytest

from appliance.builder import _warn_exposure, build
from appliance.config import compose, load
from appliance.middleware import fingerprint

pytestmark = pytest.mark.timeout(120)

ADMIN = "adm-Zq81Kx0PLm4"
API1 = "sk-test-Alpha1234"
API2 = "sk-test-Bravo5678"
APPLIANCE_ENV = {"LMX_ADMIN_KEY": ADMIN, "LMX_API_KEYS": f"{API1}, {API2}"}

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
ADMIN_GETS = ("/admin/health", "/admin/models", "/admin/config")
ADMIN_POSTS = ("/admin/models/load", "/admin/models/unload")


@pytest.fixture(scope="module")
def http() -> Any:
    with httpx.Client(timeout=30) as client:  # one client: building one per request is slow
        yield client


def assert_error(r: httpx.Response, status: int, type_: str, code: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["code"]) == (type_, code)
    for key in (ADMIN, API1, API2):  # no key, not even the one presented, in a message
        assert key not in r.text


@pytest.mark.parametrize(
    "headers, status",
    [
        ({}, 401),
        ({"Authorization": "Bearer sk-wrong"}, 401),
        ({"Authorization": f"Bearer {API1.upper()}"}, 401),  # keys are case sensitive
        ({"x-api-key": API1.swapcase()}, 401),
        ({"Authorization": f"Basic {API1}"}, 401),  # only the Bearer scheme
        ({"Authorization": "Bearer"}, 401),
        ({"Authorization": f"Bearer {API1}"}, 200),
        ({"authorization": f"bearer {API2}"}, 200),  # header name and scheme are not
        ({"x-api-key": API1}, 200),
        ({"X-API-Key": API2}, 200),
        ({"Authorization": f"Bearer {ADMIN}"}, 200),  # the admin key works on /v1 too
        ({"x-api-key": ADMIN}, 200),
    ],
)
def test_inference_matrix(
    module_appliance: Any, http: httpx.Client, headers: dict[str, str], status: int
) -> None:
    r = http.post(module_appliance.url + "/v1/chat/completions", json=CHAT, headers=headers)
    if status == 401:
        assert_error(r, 401, "authentication_error", "invalid_api_key")
    else:
        assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer sk-wrong"},
        {"Authorization": f"Bearer {API1}"},  # an API key is not an admin key
        {"x-api-key": API2},
        {"Authorization": f"Bearer {ADMIN.lower()}"},
    ],
)
def test_admin_refuses_without_the_admin_key(
    module_appliance: Any, http: httpx.Client, headers: dict[str, str]
) -> None:
    url = module_appliance.url
    for path in ADMIN_GETS:
        assert_error(
            http.get(url + path, headers=headers), 401, "authentication_error", "invalid_api_key"
        )
    for path in ADMIN_POSTS:
        r = http.post(url + path, json={"model": "demo"}, headers=headers)
        assert_error(r, 401, "authentication_error", "invalid_api_key")


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {ADMIN}"}, {"x-api-key": ADMIN}])
def test_admin_key_opens_admin(
    module_appliance: Any, http: httpx.Client, headers: dict[str, str]
) -> None:
    for path in ADMIN_GETS:
        r = http.get(module_appliance.url + path, headers=headers)
        assert r.status_code == 200, r.text


def test_other_v1_routes_need_a_key(module_appliance: Any, http: httpx.Client) -> None:
    url = module_appliance.url
    assert_error(http.get(url + "/v1/models"), 401, "authentication_error", "invalid_api_key")
    assert http.get(url + "/v1/models", headers={"x-api-key": API1}).status_code == 200
    r = http.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 1})
    assert_error(r, 401, "authentication_error", "invalid_api_key")


def test_probes_and_metrics_are_open(module_appliance: Any, http: httpx.Client) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert http.get(module_appliance.url + path).status_code == 200, path


def test_openai_client(module_appliance: Any) -> None:
    base = module_appliance.url + "/v1"
    ok = openai.OpenAI(base_url=base, api_key=API2, max_retries=0)
    out = ok.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert out.usage is not None and out.usage.completion_tokens >= 1
    assert [m.id for m in ok.models.list()] == ["smollm2", "demo"]
    wrong = openai.OpenAI(base_url=base, api_key="sk-not-a-key", max_retries=0)
    # The client insists on a key; `omit` on the request sends none at all.
    for bad, extra in ((wrong, {}), (ok, {"Authorization": openai.omit})):
        with pytest.raises(openai.AuthenticationError) as info:
            bad.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "hi"}], extra_headers=extra
            )
        assert info.value.status_code == 401
        assert info.value.code == "invalid_api_key"


def test_keys_never_logged(module_appliance: Any) -> None:
    """Last: every request above ran; the log has fingerprints, never a key."""
    log = module_appliance.log()
    assert '"path":"/v1/chat/completions"' in log
    for key in (ADMIN, API1, API2):
        assert key not in log
        assert key.upper() not in log
    assert fingerprint(API1) in log  # the access log names the key by its fingerprint


def test_no_admin_key_closes_the_admin_api(appliance_factory: Any, http: httpx.Client) -> None:
    a = appliance_factory()  # no LMX_ADMIN_KEY, no LMX_API_KEYS
    for path in ADMIN_GETS:
        for headers in ({}, {"Authorization": "Bearer anything"}):
            r = http.get(a.url + path, headers=headers)
            assert_error(r, 403, "permission_error", "admin_disabled")
            assert "LMX_ADMIN_KEY" in r.json()["error"]["message"]
    for path in ADMIN_POSTS:
        r = http.post(a.url + path, json={"model": "demo"})
        assert_error(r, 403, "permission_error", "admin_disabled")
    for path in ("/healthz", "/readyz", "/metrics", "/v1/models"):
        assert http.get(a.url + path).status_code == 200
    assert http.post(a.url + "/v1/chat/completions", json=CHAT).status_code == 200
    log = a.log()
    assert "no API key is set: /v1 is open" in log
    assert "the admin API is closed" in log


def test_exposure_warnings(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("LMX_API_KEYS", raising=False)
    monkeypatch.delenv("LMX_ADMIN_KEY", raising=False)
    with caplog.at_level(logging.INFO, logger="appliance"):
        _warn_exposure(load(compose([])))
    open_v1 = [r for r in caplog.records if "/v1 is open" in r.getMessage()]
    assert [r.levelno for r in open_v1] == [logging.INFO]  # loopback: said, not warned
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="appliance"):
        _warn_exposure(load(compose(["server.host=0.0.0.0"])))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("/v1 is open" in m for m in warned), warned
    assert any("plain HTTP" in m for m in warned), warned
    caplog.clear()
    monkeypatch.setenv("LMX_API_KEYS", API1)
    with caplog.at_level(logging.INFO, logger="appliance"):
        _warn_exposure(load(compose(["server.host=0.0.0.0", "security.behind_tls_proxy=true"])))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert API1 not in caplog.text


def test_probes_and_metrics_can_be_closed(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """In process (no model needed): open_probes / open_metrics false ask for any key."""
    monkeypatch.setenv("LMX_API_KEYS", API1)
    monkeypatch.setenv("LMX_ADMIN_KEY", ADMIN)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    cfg = load(
        compose(
            [
                "security.open_probes=false",
                "security.open_metrics=false",
                "models.auto_load=[]",
                "middleware=[request_id,auth]",
            ]
        )
    )
    client = falcon.testing.TestClient(build(cfg).app)
    for path in ("/healthz", "/metrics"):
        r = client.simulate_get(path)
        assert r.status_code == 401 and r.json["error"]["code"] == "invalid_api_key"
        assert client.simulate_get(path, headers={"x-api-key": "nope"}).status_code == 401
        assert client.simulate_get(path, headers={"x-api-key": API1}).status_code == 200
        assert (
            client.simulate_get(path, headers={"Authorization": f"Bearer {ADMIN}"}).status_code
            == 200
        )
    # /readyz needs a key too; past auth it reports no model loaded.
    assert client.simulate_get("/readyz").status_code == 401
    assert client.simulate_get("/readyz", headers={"x-api-key": API1}).status_code == 503
