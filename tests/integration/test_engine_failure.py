"""Engine failures on a real appliance: a generation thread that dies (through the test-only
fault injection, APPLIANCE_FAULT_INJECTION=1), and the KV-cache memory guard under a tiny MLX
memory limit."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from ._resilience import BASE, Stream, metric, wait_until

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


def test_a_request_whose_kv_cache_would_not_fit_is_refused(
    appliance_factory: Any, demo_model_dir: Path
) -> None:
    weights = (demo_model_dir / "model.safetensors").stat().st_size
    kv_per_token = 2 * 4 * 2 * 32 * 4  # layers, KV heads, head_dim, float32 (the demo's config)
    # Room for the weights and about 6 MB: one 1900-token request (3.9 MB) fits, not two.
    limit = weights + 6_000_000
    a = appliance_factory(
        *BASE,
        f"limits.mlx_memory_limit_bytes={limit}",
        "models.prompt_cache_bytes=0",
        "models.catalog.demo.max_tokens=2000",
    )
    assert f"MLX memory limit set to {limit} bytes" in a.log()
    big = {"prompt": "Once upon a time", "max_tokens": 1900}
    assert 1900 * kv_per_token > 2_500_000

    with httpx.Client(base_url=a.url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json={**big, "stream": True}) as first:
            assert first.status_code == 200
            lines = first.iter_lines()
            wait_until(lambda: next(lines).startswith("data:"), timeout=30, what="the first tokens")
            refused = client.post("/v1/completions", json=big)
            assert refused.status_code == 503, refused.text
            err = refused.json()["error"]
            assert err["code"] == "insufficient_memory"
            assert "KV cache" in err["message"]
            assert refused.headers.get("Retry-After")
            small = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 50})
            assert small.status_code == 200, small.text

        # The first stream is gone (client closed): the big request fits again.
        def fits() -> bool:
            with client.stream("POST", "/v1/completions", json={**big, "stream": True}) as r:
                return r.status_code == 200  # the guard answers before prefill

        wait_until(fits, timeout=30, every=0.3, what="room again")
    assert (metric(a.url, "lmx_rejected_requests_total", reason="insufficient_memory") or 0) >= 1


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
