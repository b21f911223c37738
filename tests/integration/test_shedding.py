"""Load shedding: with the memory threshold below current use, inference gets 503 with
Retry-After while probes, /metrics and /admin/health still answer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import falcon
import falcon.asgi
import falcon.testing
import httpx
import pytest

from appliance.api import errors as api_errors
from appliance.config import LimitsConfig, SheddingConfig
from appliance.engine import memory
from appliance.engine.limits import Limits, LimitsInForce
from appliance.middleware import LoadShedding

pytestmark = pytest.mark.timeout(120)

ADMIN = "adm-Shed-Test-3131"
APPLIANCE_OVERRIDES = ["shedding.memory_percent=1", "shedding.retry_after_s=7"]
APPLIANCE_ENV = {"LMX_ADMIN_KEY": ADMIN}


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as client:
        yield client


@pytest.mark.parametrize(
    "path, body",
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
        ),
        ("/v1/completions", {"prompt": "a", "max_tokens": 1}),
    ],
)
def test_inference_is_shed(
    module_appliance: Any, http: httpx.Client, path: str, body: dict[str, Any]
) -> None:
    r = http.post(module_appliance.url + path, json=body)
    assert r.status_code == 503
    assert r.headers["Retry-After"] == "7"
    err = r.json()["error"]
    assert (err["type"], err["code"]) == ("service_unavailable", "overloaded")
    assert "memory" in err["message"]


def test_everything_else_answers(module_appliance: Any, http: httpx.Client) -> None:
    url = module_appliance.url
    for path in ("/healthz", "/readyz", "/metrics", "/v1/models"):
        assert http.get(url + path).status_code == 200, path
    r = http.get(url + "/admin/health", headers={"x-api-key": ADMIN})
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "degraded"
    assert any("shedding" in x["reason"] for x in h["reasons"]), h["reasons"]
    # An admin POST is not inference: not shed.
    r = http.post(url + "/admin/models/load", json={"model": "demo"}, headers={"x-api-key": ADMIN})
    assert r.status_code == 200


def test_sheds_counted(module_appliance: Any, http: httpx.Client) -> None:
    text = http.get(module_appliance.url + "/metrics").text
    assert 'lmx_rejected_requests_total{reason="shed"} 2.0' in text


class _Echo:
    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.media = {"ok": True}


def _app(
    cfg: SheddingConfig, reasons: list[str], safe: Optional[SheddingConfig] = None
) -> tuple[falcon.testing.TestClient, LimitsInForce]:
    limits = LimitsInForce(
        Limits.of(LimitsConfig(), cfg), Limits.of(LimitsConfig(), safe) if safe else None
    )
    app = falcon.asgi.App(middleware=[LoadShedding(limits, reasons.append, memory.mlx_active)])
    api_errors.install(app)
    app.add_route("/v1/completions", _Echo())
    app.add_route("/admin/models/load", _Echo())
    return falcon.testing.TestClient(app), limits


def test_mlx_active_threshold() -> None:
    """MLX active memory past shedding.mlx_active_bytes sheds too (read from the real MLX)."""
    import mlx.core as mx

    x = mx.ones((1024, 256))
    mx.eval(x)
    active = memory.mlx_active()
    assert active is not None and active > 0
    reasons: list[str] = []
    over, _ = _app(SheddingConfig(memory_percent=100, mlx_active_bytes=1), reasons)
    r = over.simulate_post("/v1/completions", json={})
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"
    assert r.json["error"]["code"] == "overloaded"
    assert "MLX active memory" in r.json["error"]["message"]
    assert over.simulate_post("/admin/models/load", json={}).status_code == 200
    assert reasons == ["shed"]
    under, _ = _app(SheddingConfig(memory_percent=100, mlx_active_bytes=active * 1000), reasons)
    assert under.simulate_post("/v1/completions", json={}).status_code == 200
    del x


def test_the_thresholds_in_force_change_at_run_time() -> None:
    """Safe mode's stricter shedding (here: any MLX memory at all) applies while it is in force
    and ends with it, in the same running middleware."""
    import mlx.core as mx

    x = mx.ones((1024, 256))  # some MLX memory in use, so the safe threshold is passed
    mx.eval(x)
    reasons: list[str] = []
    client, limits = _app(
        SheddingConfig(memory_percent=100),
        reasons,
        safe=SheddingConfig(memory_percent=100, mlx_active_bytes=1, retry_after_s=9),
    )
    assert client.simulate_post("/v1/completions", json={}).status_code == 200
    limits.use(safe_mode=True)
    r = client.simulate_post("/v1/completions", json={})
    assert r.status_code == 503 and r.headers["Retry-After"] == "9"
    limits.use(safe_mode=False)
    assert client.simulate_post("/v1/completions", json={}).status_code == 200
    del x
