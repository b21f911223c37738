"""Helper nodes and local embeddings: a real second appliance serves /v1/embeddings and
/v1/rerank to the first; stopping it trips the circuit breaker, starting it again closes it."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import time
from typing import Any

import httpx
import openai
import pytest

from appliance.config import HelperNode
from appliance.helper_nodes import CircuitBreaker, HelperClient

from ._resilience import ADMIN_ENV, BASE, admin_get, metric, wait_until

pytestmark = pytest.mark.timeout(120)


def test_circuit_breaker_opens_half_opens_and_closes() -> None:
    now = [0.0]
    b = CircuitBreaker(threshold=2, reset_after_s=10, clock=lambda: now[0])
    assert b.allow()
    assert not b.failure() and b.state == "closed"
    assert b.failure() and b.state == "open"
    assert not b.allow() and b.retry_after() == 10
    now[0] = 4.0
    assert not b.allow() and b.retry_after() == 6
    now[0] = 10.0
    assert b.allow() and b.state == "half_open"  # one trial
    assert not b.allow()  # the others wait for it
    assert b.failure() and b.state == "open" and b.opened_at == 10.0  # failed trial: open again
    now[0] = 20.0
    assert b.allow()
    assert b.success() and b.state == "closed" and b.failures == 0
    assert b.allow()


def test_helper_retries_then_counts_one_failure_and_relays_client_errors() -> None:
    # A unit test of the retry policy: httpx's MockTransport stands in for the network.
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        body = json.loads(request.content)
        if body.get("input") == "bad":
            return httpx.Response(400, json={"error": {"code": "invalid_request"}})
        if len(calls) <= 2:
            return httpx.Response(503, json={"error": {"code": "not_ready"}})
        return httpx.Response(200, json={"ok": True, "model": body.get("model")})

    counted: list[tuple[str, str]] = []
    node = HelperNode(url="http://helper:8080", retries=2, failure_threshold=2, model="embedder")
    h = HelperClient(
        "embedding",
        node,
        lambda role, status: counted.append((role, status)),
        httpx.MockTransport(handler),
    )

    async def main() -> None:
        ok = await h.post("/v1/embeddings", {"input": "x", "model": "demo"})
        assert ok.status == 200 and json.loads(ok.body) == {"ok": True, "model": "embedder"}
        assert len(calls) == 3 and h.breaker.failures == 0  # two 503s retried, then 200
        bad = await h.post("/v1/embeddings", {"input": "bad"})
        assert bad.status == 400  # a client error is relayed, not retried, not a failure
        assert len(calls) == 4 and h.breaker.state == "closed"
        await h.close()

    asyncio.run(main())
    assert counted == [("embedding", "200"), ("embedding", "400")]


def _vectors(r: httpx.Response) -> list[list[float]]:
    assert r.status_code == 200, r.text
    return [d["embedding"] for d in r.json()["data"]]


def check_local_embeddings_and_rerank(a: Any) -> None:
    """/v1/embeddings and /v1/rerank served from the local demo model."""
    client = openai.OpenAI(base_url=a.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    texts = ["the cat sat on the mat", "stock markets fell sharply", "a cat on a mat"]
    floats = client.embeddings.create(model="demo", input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2]
    assert floats.model == "demo" and floats.usage.prompt_tokens > 0
    vecs = [d.embedding for d in floats.data]
    assert len(vecs[0]) == 128  # the demo model's hidden size
    for v in vecs:
        assert math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-4)
    # base64 (the openai client's default) decodes to the same floats.
    b64 = client.embeddings.create(model="demo", input=texts)
    for got, want in zip(b64.data, vecs, strict=True):
        assert got.embedding == pytest.approx(want, abs=1e-6)
    # Deterministic, and one string is the same as a list of one.
    one = _vectors(httpx.post(a.url + "/v1/embeddings", json={"input": texts[0]}, timeout=30))
    assert one[0] == pytest.approx(vecs[0], abs=1e-6)
    short = _vectors(
        httpx.post(a.url + "/v1/embeddings", json={"input": texts[0], "dimensions": 16}, timeout=30)
    )
    assert len(short[0]) == 16

    r = httpx.post(
        a.url + "/v1/rerank",
        timeout=30,
        json={
            "model": "demo",
            "query": "the cat sat on the mat",
            "documents": texts[1:] + [texts[0]],
            "top_n": 2,
        },
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 2
    assert results[0]["index"] == 2 and results[0]["document"] == {"text": texts[0]}
    assert results[0]["relevance_score"] == pytest.approx(1.0, abs=1e-5)
    assert results[0]["relevance_score"] >= results[1]["relevance_score"]

    bad = httpx.post(a.url + "/v1/embeddings", json={"input": []}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input"
    bad = httpx.post(a.url + "/v1/rerank", json={"query": "q", "documents": "x"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "documents"
    missing = httpx.post(a.url + "/v1/embeddings", json={"input": "x", "model": "nope"}, timeout=10)
    assert missing.status_code == 404


def test_local_embeddings_then_a_second_appliance_as_embedding_helper(
    appliance_factory: Any, tmp_path: Any
) -> None:
    helper = appliance_factory(*BASE, home=tmp_path / "helper", wait="")
    port = helper.port
    node = (
        f'helpers.embedding={{url:"{helper.url}",retries:1,failure_threshold:2,'
        f"reset_after_s:2,timeout_s:5}}"
    )
    main = appliance_factory(
        *BASE, node, "maintenance.helper_probe.interval_s=0.5", env=ADMIN_ENV, wait=""
    )
    helper.wait_for("/readyz")
    main.wait_for("/readyz")
    check_local_embeddings_and_rerank(helper)
    texts = ["proxied to the helper", "and back"]

    def embed() -> httpx.Response:
        return httpx.post(main.url + "/v1/embeddings", json={"input": texts}, timeout=30)

    # Proxied: the same vectors as the helper's own, counted as helper requests.
    direct = _vectors(httpx.post(helper.url + "/v1/embeddings", json={"input": texts}, timeout=30))
    for got, want in zip(_vectors(embed()), direct, strict=True):
        assert got == pytest.approx(want, abs=1e-6)
    assert metric(main.url, "lmx_helper_requests_total", helper="embedding", status="200") == 1.0
    # Rerank without a rerank helper: cosine similarity of the helper's embeddings.
    r = httpx.post(
        main.url + "/v1/rerank", json={"query": texts[0], "documents": texts[::-1]}, timeout=30
    )
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["index"] == 1
    wait_until(lambda: metric(main.url, "lmx_helper_up", helper="embedding") == 1.0, timeout=10)
    assert metric(main.url, "lmx_helper_circuit_open", helper="embedding") == 0.0

    # The helper goes away: failures after retries, then the circuit opens: fast 503s.
    assert helper.stop() == 0
    for _ in range(2):
        r = embed()
        assert r.status_code == 503 and r.json()["error"]["code"] == "helper_unavailable", r.text
    t0 = time.monotonic()
    r = embed()
    fast = time.monotonic() - t0
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "helper_unavailable"
    assert "circuit open" in r.json()["error"]["message"]
    assert 1 <= int(r.headers["Retry-After"]) <= 2
    assert fast < 0.5, fast
    assert metric(main.url, "lmx_helper_circuit_open", helper="embedding") == 1.0
    assert (
        metric(main.url, "lmx_helper_requests_total", helper="embedding", status="circuit_open")
        or 0
    ) >= 1
    health = admin_get(main.url, "/admin/health")
    assert health["status"] == "degraded"
    assert health["helpers"]["embedding"]["circuit"] == "open"
    assert any("embedding helper" in x["reason"] for x in health["reasons"])
    assert "circuit open" in main.log()
    wait_until(lambda: metric(main.url, "lmx_helper_up", helper="embedding") == 0.0, timeout=10)

    # Back on the same port: after reset_after_s the circuit closes again.
    appliance_factory(*BASE, home=tmp_path / "helper", port=port)
    wait_until(lambda: embed().status_code == 200, timeout=15, every=0.3, what="the circuit closed")
    assert metric(main.url, "lmx_helper_circuit_open", helper="embedding") == 0.0
    assert admin_get(main.url, "/admin/health")["helpers"]["embedding"]["circuit"] == "closed"
    assert "circuit closed" in main.log()
    main.stop(signal.SIGTERM)
