"""Engine failures on a real appliance: a generation thread that dies (through the test-only
fault injection, APPLIANCE_FAULT_INJECTION=1), and the memory governor under a tiny MLX memory
limit: requests that could never fit, wait, evict the prompt cache or are refused, never a crash."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from ._resilience import ADMIN_ENV, ADMIN_KEY, BASE, Stream, loaded, metric, wait_until

pytestmark = pytest.mark.timeout(120)

FAULTS = {"APPLIANCE_FAULT_INJECTION": "1"}


def _kill(url: str, model: str = "demo") -> None:
    r = httpx.post(url + "/testing/faults", json={"kill_model": model}, timeout=10)
    assert r.status_code == 200, r.text


def test_fault_route_is_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.builder import build
    from appliance.config import compose, load

    monkeypatch.delenv("APPLIANCE_FAULT_INJECTION", raising=False)
    app = build(load(compose(["logging.file=none"]))).app
    assert app._router.find("/testing/faults") is None
    assert app._router.find("/v1/embeddings") is not None
    monkeypatch.setenv("APPLIANCE_FAULT_INJECTION", "1")
    assert build(load(compose(["logging.file=none"]))).app._router.find("/testing/faults")


def test_dead_generation_thread_fails_its_requests_reloads_then_gives_up(
    appliance_factory: Any,
) -> None:
    a = appliance_factory(
        *BASE,
        "models.catalog.demo.max_tokens=2000",
        "limits.engine_restarts=1",
        "limits.engine_restart_backoff_s=1",
        env=FAULTS,
    )
    stream = Stream(a.url, "A long story about the valley", 2000)
    stream.start()
    assert stream.got_tokens.wait(30)
    plain: dict[str, Any] = {}

    def non_stream() -> None:
        r = httpx.post(
            a.url + "/v1/completions",
            json={"prompt": "Another one", "max_tokens": 2000},
            timeout=60,
        )
        plain.update(status=r.status_code, body=r.json())

    t = threading.Thread(target=non_stream, daemon=True)
    t.start()
    wait_until(lambda: metric(a.url, "lmx_num_requests_running") == 2.0, timeout=10)

    _kill(a.url)
    # Its requests end with a 500 error: an error chunk and [DONE] when streaming.
    stream.join(30)
    assert stream.done, stream.datas[-3:]
    assert stream.errors and stream.errors[0]["code"] == "engine_failure", stream.datas[-3:]
    t.join(30)
    assert plain["status"] == 500, plain
    assert plain["body"]["error"]["code"] == "engine_failure"
    # Not ready while it reloads (backoff 1 s), ready again after.
    r = wait_until(
        lambda: (x := httpx.get(a.url + "/readyz", timeout=5)).status_code == 503 and x,
        timeout=5,
        every=0.02,
        what="/readyz 503",
    )
    assert "reloading" in r.json()["error"]["message"]
    a.wait_for("/readyz", timeout=30)
    ok = httpx.post(
        a.url + "/v1/completions", json={"prompt": "again", "max_tokens": 4}, timeout=30
    )
    assert ok.status_code == 200, ok.text
    assert "reloading in 1 s" in a.log()
    assert "model demo reloaded after its generation thread died" in a.log()

    # A second death is past limits.engine_restarts=1: the process exits non-zero.
    _kill(a.url)
    assert a.proc.wait(timeout=30) == 3, a.log()[-3000:]
    assert "giving up" in a.log()
    state = json.loads((a.home / "state" / "appliance" / "state.json").read_text())
    assert state["clean_shutdown"] is False  # so the next start counts it as a crash


KV_PER_TOKEN = 2 * 4 * 2 * 32 * 4  # layers, KV heads, head_dim, float32 (the demo's config)
NO_EOS = {"1": -100, "4": -100}  # the demo's end tokens: every answer runs to max_tokens


def _tokens(n: int, seed: int) -> list[int]:
    """A prompt of n token ids, different for each seed (no shared cached prefix)."""
    return [10 + (seed * 131 + i * 7) % 1000 for i in range(n)]


def _long(prompt_tokens: int, max_tokens: int, seed: int, **extra: Any) -> dict[str, Any]:
    body = {"prompt": _tokens(prompt_tokens, seed), "max_tokens": max_tokens}
    return {**body, "logit_bias": NO_EOS, **extra}


@pytest.fixture(scope="module")
def tight(module_appliance_factory: Any, demo_model_dir: Path) -> Any:
    """Two models under an MLX memory limit that leaves the KV cache about 3 MB: one request of
    1400 tokens (2.9 MB) fits, not two. Each model fitted when it loaded (weights and a full
    context); with both loaded, demo's full context (4.2 MB) no longer can."""
    weights = (demo_model_dir / "model.safetensors").stat().st_size
    limit = 2 * weights + 3_000_000
    a = module_appliance_factory(
        *BASE,
        f"limits.mlx_memory_limit_bytes={limit}",
        "limits.max_queued=2",
        "limits.queue_timeout_s=1.5",
        "models.catalog.demo.max_tokens=2000",
        "+models.catalog.small.path=builtin:demo",
        "+models.catalog.small.context_length=256",
        "models.auto_load=[demo,small]",
    )
    assert f"MLX memory limit set to {limit} bytes" in a.log()
    wait_until(lambda: sorted(loaded(a.url)) == ["demo", "small"], what="both models loaded")
    return a


def test_a_request_that_could_never_fit_is_400_naming_the_field(tight: Any) -> None:
    with httpx.Client(base_url=tight.url, timeout=60) as client:
        r = client.post("/v1/completions", json={"prompt": "Once", "max_tokens": 2000})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "max_tokens" and err["code"] == "insufficient_memory", err
        assert "max_tokens may be at most" in err["message"]
        room = int(err["message"].rsplit(" ", 1)[1])
        assert 1300 < room < 1500  # about 3 MB / 2048 bytes a token, less the prompt
        # (the ceiling counts the weights; MLX holds a few KB more besides)
        body = {"prompt": "Once", "max_tokens": room - 50, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as ok:
            assert ok.status_code == 200  # admitted (the answer itself is not needed)

        r = client.post("/v1/completions", json={"prompt": _tokens(1700, 1), "max_tokens": 1})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "prompt" and "shorten the prompt" in err["message"], err
    assert tight.proc.poll() is None


def test_a_request_that_fits_later_waits_then_is_refused_with_retry_after(tight: Any) -> None:
    big = _long(4, 1100, seed=2)
    with httpx.Client(base_url=tight.url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json={**big, "stream": True}) as first:
            assert first.status_code == 200
            lines = first.iter_lines()
            wait_until(lambda: next(lines).startswith("data:"), timeout=30, what="the first tokens")
            # (prompt + max_tokens) x bytes per token, reserved while it runs
            assert metric(tight.url, "lmx_kv_reserved_bytes") == (4 + 1100) * KV_PER_TOKEN
            t0 = time.monotonic()
            refused = client.post("/v1/completions", json=big)
            waited = time.monotonic() - t0
            assert refused.status_code == 503, refused.text
            err = refused.json()["error"]
            assert err["code"] == "insufficient_memory" and "KV cache" in err["message"]
            assert refused.headers.get("Retry-After")
            assert waited >= 1.4  # it waited in the queue (queue_timeout_s) before the refusal
            small = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 50})
            assert small.status_code == 200, small.text

        # The first stream is gone (client closed): the big request fits again.
        def fits() -> bool:
            with client.stream("POST", "/v1/completions", json={**big, "stream": True}) as r:
                return r.status_code == 200

        wait_until(fits, timeout=30, every=0.3, what="room again")
    assert (
        metric(tight.url, "lmx_rejected_requests_total", reason="insufficient_memory") or 0
    ) >= 1
    wait_until(lambda: metric(tight.url, "lmx_kv_reserved_bytes") == 0, what="nothing reserved")


def test_the_prompt_cache_is_evicted_before_a_request_is_refused(tight: Any) -> None:
    url = tight.url
    evicted0 = metric(url, "lmx_prompt_cache_evicted_bytes_total") or 0
    with httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/completions", json=_long(400, 200, seed=3))
        assert r.status_code == 200, r.text
        held = wait_until(
            lambda: metric(url, "lmx_prompt_cache_bytes", model="demo"), what="a cached prefix"
        )
        assert held >= 600 * KV_PER_TOKEN * 0.9
        # 2.5 MB with the copy of its prompt the cache takes: fits in the 3 MB only without
        # the cached 1.2 MB
        body = _long(400, 420, seed=4, stream=True)
        with client.stream("POST", "/v1/completions", json=body) as second:
            assert second.status_code == 200
            lines = second.iter_lines()
            wait_until(lambda: next(lines).startswith("data:"), timeout=30, what="the first tokens")
            # evicted before this one ran (its own prompt is in the cache now, from its prefill)
            assert (metric(url, "lmx_prompt_cache_evicted_bytes_total") or 0) - evicted0 >= held
            for _ in lines:  # to the end
                pass
    evicted = metric(url, "lmx_prompt_cache_evicted_bytes_total") or 0
    assert evicted - evicted0 >= held * 0.5
    assert "prompt cache to admit a request" in tight.log()


def test_concurrent_long_prompts_get_clean_answers_and_the_server_serves_on(tight: Any) -> None:
    url = tight.url
    results: list[httpx.Response] = []

    def send(seed: int) -> None:
        r = httpx.post(url + "/v1/completions", json=_long(400, 1000, seed=seed), timeout=60)
        results.append(r)

    threads = [threading.Thread(target=send, args=(10 + i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    statuses = sorted(r.status_code for r in results)
    assert len(statuses) == 6 and set(statuses) <= {200, 429, 503}, statuses
    assert 200 in statuses and statuses.count(200) < 6, statuses
    for r in results:
        if r.status_code != 200:
            assert r.headers.get("Retry-After"), r.text
            assert r.json()["error"]["code"] in ("server_busy", "insufficient_memory"), r.text
    assert httpx.get(url + "/healthz", timeout=5).status_code == 200
    ok = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 8}, timeout=30)
    assert ok.status_code == 200, ok.text
    assert tight.proc.poll() is None
    wait_until(lambda: metric(url, "lmx_kv_reserved_bytes") == 0, what="nothing reserved")


@pytest.mark.timeout(60)
def test_a_start_cancelled_mid_load_leaves_the_thread_quiet() -> None:
    """Shutdown during a slow load cancels the wait for it; the thread still ends its load and
    stops without an error of its own (an unhandled one would print a traceback on a clean
    stop)."""
    import asyncio

    from appliance.engine.worker import ModelWorker

    release = threading.Event()
    errors: list[BaseException] = []
    hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)  # type: ignore[assignment]

    def slow_loader() -> tuple[Any, Any]:
        release.wait(30)
        raise RuntimeError("no model here")

    async def scenario() -> ModelWorker:
        worker = ModelWorker(
            "slow",
            "/nowhere",
            loader=slow_loader,
            loop=asyncio.get_running_loop(),
            prefill_step_size=64,
            completion_batch_size=1,
            prefill_batch_size=1,
            max_kv_size=None,
            prompt_cache_bytes=0,
        )
        start = asyncio.ensure_future(worker.start())
        await asyncio.sleep(0.05)
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
        release.set()
        worker.stop()
        await asyncio.to_thread(worker.join, 20)
        return worker

    try:
        worker = asyncio.run(scenario())
        assert not worker._thread.is_alive()
        assert isinstance(worker.dead, RuntimeError)
        assert errors == []
    finally:
        threading.excepthook = hook


def test_a_load_evicts_the_other_models_prompt_caches_before_it_is_refused(
    appliance_factory: Any, demo_model_dir: Path
) -> None:
    """`small` (weights and 1000 tokens of KV, 2 MB) fits the limit beside demo's weights only
    while demo's prompt cache (1.2 MB and more) is not held."""
    weights = (demo_model_dir / "model.safetensors").stat().st_size
    a = appliance_factory(
        *BASE,
        f"limits.mlx_memory_limit_bytes={2 * weights + 3_000_000}",
        "+models.catalog.small.path=builtin:demo",
        "+models.catalog.small.context_length=1000",
        "models.auto_load=[demo]",
        env=ADMIN_ENV,
    )
    with httpx.Client(base_url=a.url, timeout=60) as client:
        r = client.post("/v1/completions", json=_long(400, 200, seed=5))
        assert r.status_code == 200, r.text
        held = wait_until(
            lambda: metric(a.url, "lmx_prompt_cache_bytes", model="demo"), what="a cached prefix"
        )
        assert held >= 600 * KV_PER_TOKEN * 0.9
        r = client.post(
            "/admin/models/load",
            json={"model": "small"},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert sorted(loaded(a.url)) == ["demo", "small"]
        assert (metric(a.url, "lmx_prompt_cache_evicted_bytes_total") or 0) >= held * 0.5
        assert "prompt cache to load model small" in a.log()
        # Both serve.
        for model in ("demo", "small"):
            r = client.post(
                "/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 3}
            )
            assert r.status_code == 200, r.text
