"""Rate limits (the `limits` library) on a real server: per key, POSTs only, 429 with
Retry-After and RateLimit-* headers; the admin limit works the same way."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.timeout(120)

ADMIN = "adm-Rate-Limit-9090"
KEY_A = "sk-rate-a-111111"
KEY_B = "sk-rate-b-222222"
APPLIANCE_OVERRIDES = ["rate_limits.inference=3/minute", "rate_limits.admin=2/minute"]
APPLIANCE_ENV = {"LMX_ADMIN_KEY": ADMIN, "LMX_API_KEYS": f"{KEY_A},{KEY_B}"}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as client:
        yield client


def chat(
    http: httpx.Client, url: str, key: str, path: str = "/v1/chat/completions"
) -> httpx.Response:
    body: dict[str, Any] = (
        CHAT if path.endswith("chat/completions") else {"prompt": "a", "max_tokens": 1}
    )
    return http.post(url + path, json=body, headers={"Authorization": f"Bearer {key}"})


def test_fourth_post_is_429(module_appliance: Any, http: httpx.Client) -> None:
    url = module_appliance.url
    for remaining in (2, 1, 0):
        r = chat(http, url, KEY_A)
        assert r.status_code == 200, r.text
        assert r.headers["RateLimit-Limit"] == "3"
        assert r.headers["RateLimit-Remaining"] == str(remaining)
        assert 0 <= int(r.headers["RateLimit-Reset"]) <= 60
    r = chat(http, url, KEY_A)
    assert r.status_code == 429
    err = r.json()["error"]
    assert (err["type"], err["code"]) == ("rate_limit_error", "rate_limited")
    assert KEY_A not in r.text
    assert 1 <= int(r.headers["Retry-After"]) <= 61
    assert r.headers["RateLimit-Limit"] == "3"
    assert r.headers["RateLimit-Remaining"] == "0"
    assert int(r.headers["RateLimit-Reset"]) >= 1
    # The limit covers every generation route of the key, not one path.
    assert chat(http, url, KEY_A, "/v1/completions").status_code == 429


def test_other_key_unaffected(module_appliance: Any, http: httpx.Client) -> None:
    r = chat(http, module_appliance.url, KEY_B)
    assert r.status_code == 200
    assert r.headers["RateLimit-Remaining"] == "2"


def test_gets_and_probes_not_limited(module_appliance: Any, http: httpx.Client) -> None:
    url = module_appliance.url
    for _ in range(5):
        r = http.get(url + "/v1/models", headers={"x-api-key": KEY_A})
        assert r.status_code == 200
        assert "RateLimit-Limit" not in r.headers
        for path in ("/healthz", "/readyz", "/metrics"):
            assert http.get(url + path).status_code == 200


def test_admin_limit(module_appliance: Any, http: httpx.Client) -> None:
    url = module_appliance.url
    h = {"x-api-key": ADMIN}
    for _ in range(2):
        r = http.post(url + "/admin/models/load", json={"model": "demo"}, headers=h)
        assert r.status_code == 200, r.text
    r = http.post(url + "/admin/models/load", json={"model": "demo"}, headers=h)
    assert r.status_code == 429
    assert r.headers["Retry-After"].isdigit() and r.headers["RateLimit-Limit"] == "2"
    # GETs to /admin are not limited; the admin key on /v1 counts in the inference scope.
    assert http.get(url + "/admin/models", headers=h).status_code == 200
    assert chat(http, url, ADMIN).status_code == 200


def test_refusals_counted(module_appliance: Any, http: httpx.Client) -> None:
    text = http.get(module_appliance.url + "/metrics").text
    assert 'lmx_rejected_requests_total{reason="rate_limited"} 3.0' in text
