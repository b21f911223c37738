"""The Prometheus exporter on a real server: every series with its type, exact counts after a
known sequence of requests, a fast scrape under load, and draining refusals counted once."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.timeout(120)

KEY = "sk-metrics-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
# One slot and no queue: a second request while one runs is refused at once (busy).
APPLIANCE_OVERRIDES = ["limits.max_running=1", "limits.max_queued=0"]
APPLIANCE_ENV = {"LMX_API_KEYS": KEY}
CHAT = "/v1/chat/completions"

Families = dict[str, Any]


def scrape(url: str, client: httpx.Client | None = None) -> Families:
    r = (client or httpx).get(url + "/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def value(fams: Families, name: str, suffix: str = "", **labels: str) -> float:
    """Sum of the samples of family `name` (sample name + suffix) matching `labels`."""
    fam = fams[name]
    total = 0.0
    for s in fam.samples:
        if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            total += s.value
    return total


def body(max_tokens: int, stream: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "messages": [{"role": "user", "content": "count the sheep"}],
        "max_tokens": max_tokens,
    }
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


class Stream:
    """A streaming chat request read on demand: `first_token()`, then `rest()`."""

    def __init__(self, client: httpx.Client, url: str, max_tokens: int) -> None:
        self._cm = client.stream(
            "POST", url + CHAT, json=body(max_tokens, True), headers=AUTH, timeout=60
        )
        self.resp = self._cm.__enter__()
        assert self.resp.status_code == 200, self.resp.read()
        self.lines: Iterator[str] = self.resp.iter_lines()
        self.chunks: list[dict[str, Any]] = []

    def _next(self) -> dict[str, Any] | None:
        for line in self.lines:
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                return None
            chunk: dict[str, Any] = json.loads(data)
            self.chunks.append(chunk)
            return chunk
        return None

    def first_token(self) -> None:
        """Read until a chunk with text: the request now holds its slot in the batch."""
        while (chunk := self._next()) is not None:
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                return
        raise AssertionError(f"no token came: {self.chunks}")

    def rest(self) -> dict[str, Any]:
        """Read to [DONE]; returns the usage chunk's usage."""
        while self._next() is not None:
            pass
        self._cm.__exit__(None, None, None)
        usage = [c["usage"] for c in self.chunks if c.get("usage")]
        errors = [c["error"] for c in self.chunks if c.get("error")]
        assert not errors, errors
        assert len(usage) == 1, self.chunks[-3:]
        return dict(usage[0])


def test_counts_equal_what_happened(module_appliance: Any) -> None:
    """2 ok (one streamed, one not), 1 refused busy, 1 unauthorized: exact counts."""
    url = module_appliance.url
    with httpx.Client() as client:
        a = Stream(client, url, max_tokens=300)
        a.first_token()
        busy = client.post(url + CHAT, json=body(4), headers=AUTH, timeout=30)
        usage_a = a.rest()
        unauthorized = client.post(url + CHAT, json=body(4), timeout=30)
        ok = client.post(url + CHAT, json=body(8), headers=AUTH, timeout=30)

    assert busy.status_code == 429, busy.text
    assert busy.json()["error"]["code"] == "server_busy"
    assert busy.headers["Retry-After"].isdigit()
    assert unauthorized.status_code == 401
    assert ok.status_code == 200, ok.text
    usage_b = ok.json()["usage"]
    completions = [usage_a["completion_tokens"], usage_b["completion_tokens"]]
    prompts = [usage_a["prompt_tokens"], usage_b["prompt_tokens"]]
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in (usage_a, usage_b)]

    m = scrape(url)
    p = "lmx_"
    req = p + "requests"
    assert value(m, req, "_total") == 4
    assert value(m, req, "_total", model="demo", endpoint=CHAT, status="200") == 2
    assert value(m, req, "_total", model="demo", endpoint=CHAT, status="429") == 1
    assert value(m, req, "_total", model="", endpoint=CHAT, status="401") == 1
    assert value(m, p + "generation_tokens", "_total", model="demo") == sum(completions)
    assert value(m, p + "prompt_tokens", "_total", model="demo") == sum(prompts)
    for hist in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
    ):
        assert value(m, p + hist, "_count", model="demo") == 2, hist
    # One inter-token gap per token after the first.
    assert value(m, p + "inter_token_latency_seconds", "_count", model="demo") == sum(
        c - 1 for c in completions
    )
    rejected = {
        s.labels["reason"]: s.value
        for s in m[p + "rejected_requests"].samples
        if s.name.endswith("_total")
    }
    assert rejected["busy"] == 1
    assert rejected["unauthorized"] == 1
    assert sum(rejected.values()) == 2, rejected
    hits = value(m, p + "prompt_cache_hits", "_total")
    misses = value(m, p + "prompt_cache_misses", "_total")
    assert hits + misses == 2
    # Token counts, vLLM's way: every prompt token was looked up; the hits are what usage said.
    assert value(m, p + "prefix_cache_queries", "_total", model="demo") == sum(prompts)
    assert value(m, p + "prefix_cache_hits", "_total", model="demo") == sum(cached)
    # Both admitted requests joined the batch (one at a time: max_running is 1).
    assert value(m, p + "batch_joined_requests", "_total", model="demo") == 2
    assert value(m, p + "batch_joins", "_total", model="demo") == 2
    # Gauges from live state, now idle.
    assert value(m, p + "num_requests_running") == 0
    assert value(m, p + "num_requests_waiting") == 0
    assert value(m, p + "concurrent_limit") == 1
    assert value(m, p + "queue_limit") == 0
    assert value(m, p + "models_loaded") == 1
    assert value(m, p + "model_load_seconds", "_count", model="demo") == 1


COUNTERS = (
    "requests",
    "prompt_tokens",
    "generation_tokens",
    "rejected_requests",
    "prompt_cache_hits",
    "prompt_cache_misses",
    "prefix_cache_queries",
    "prefix_cache_hits",
    "batch_joins",
    "batch_joined_requests",
)
HISTOGRAMS = (
    "time_to_first_token_seconds",
    "inter_token_latency_seconds",
    "e2e_request_latency_seconds",
    "request_queue_time_seconds",
    "model_load_seconds",
    "event_loop_lag_seconds",
)
GAUGES = (
    "num_requests_running",
    "num_requests_waiting",
    "concurrent_limit",
    "queue_limit",
    "models_loaded",
    "memory_bytes",
    "prompt_cache_bytes",
    "safe_mode",
    "uptime_seconds",
    "system_memory_percent",
    "generation_threads_alive",
    "queued_requests",
)
REASONS = (
    "busy",
    "rate_limited",
    "shed",
    "unauthorized",
    "forbidden_host",
    "too_large",
    "draining",
    "insufficient_memory",
    "safe_mode",
)


def test_every_series_has_its_type(module_appliance: Any) -> None:
    r = httpx.get(module_appliance.url + "/metrics", timeout=10)
    m = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in COUNTERS:
        assert m["lmx_" + name].type == "counter", name
    for name in HISTOGRAMS:
        assert m["lmx_" + name].type == "histogram", name
    for name in GAUGES:
        assert m["lmx_" + name].type == "gauge", name
    # An Info family: the text format shows it as a gauge `_info` of value 1 with labels.
    info = m["lmx_build_info"]
    assert info.type == "gauge"
    assert info.samples[0].value == 1
    assert info.samples[0].labels["version"] and info.samples[0].labels["backend"]
    kinds = {s.labels["kind"] for s in m["lmx_memory_bytes"].samples}
    assert {"rss", "mlx_active", "mlx_peak", "mlx_cache"} <= kinds  # MLX's CPU backend reports them
    reasons = {s.labels["reason"] for s in m["lmx_rejected_requests"].samples}
    assert set(REASONS) <= reasons
    assert value(m, "lmx_prompt_cache_bytes", model="demo") > 0
    assert value(m, "lmx_safe_mode") == 0
    assert value(m, "lmx_uptime_seconds") > 0
    # The hardening plan's name, beside vLLM's.
    assert value(m, "lmx_queued_requests") == value(m, "lmx_num_requests_waiting")
    # Lifetime counters from the state file: this is the first start in a fresh state folder.
    assert m["lmx_process_starts"].type == "counter"
    assert value(m, "lmx_process_starts", "_total") == 1
    assert value(m, "lmx_unclean_starts", "_total") == 0
    # *_created series are switched off (see CHANGELOG).
    assert "_created" not in r.text
    # The vLLM stems with _total on counters, in the text as Prometheus scrapes it.
    for line in ("# TYPE lmx_requests_total counter", "# TYPE lmx_generation_tokens_total counter"):
        assert line in r.text


def test_event_loop_lag_is_watched_while_serving(module_appliance: Any) -> None:
    """The server watches its own loop from the start: the timer's count grows by itself."""
    before = value(scrape(module_appliance.url), "lmx_event_loop_lag_seconds", "_count")
    time.sleep(0.3)  # 0.05 s a wake-up: several more by now
    assert value(scrape(module_appliance.url), "lmx_event_loop_lag_seconds", "_count") >= before + 3


def test_scrape_stays_fast_under_load(module_appliance: Any) -> None:
    url = module_appliance.url
    done = threading.Event()
    result: dict[str, Any] = {}

    def load() -> None:
        try:
            r = httpx.post(url + CHAT, json=body(400), headers=AUTH, timeout=60)
            result["status"] = r.status_code
        finally:
            done.set()

    worker = threading.Thread(target=load)
    times = []
    with httpx.Client() as client:
        client.get(url + "/metrics")  # connection up
        worker.start()
        while value(scrape(url, client), "lmx_num_requests_running") < 1 and not done.is_set():
            pass
        while not done.is_set() and len(times) < 30:
            t0 = time.perf_counter()
            fams = scrape(url, client)
            times.append(time.perf_counter() - t0)
        assert value(fams, "lmx_num_requests_running") in (0, 1)
    worker.join()
    assert result.get("status") == 200
    assert times, "the generation ended before any scrape"
    times.sort()
    assert times[len(times) // 2] < 0.1, times
    assert times[-1] < 0.5, times


def test_draining_refusals_counted_once(module_appliance: Any) -> None:
    """Last in the module: SIGTERM with a request in flight; new work gets 503 draining."""
    a = module_appliance
    url = a.url
    with httpx.Client() as client:
        before = value(scrape(url, client), "lmx_rejected_requests", "_total", reason="draining")
        s = Stream(client, url, max_tokens=512)
        s.first_token()
        a.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while client.get(url + "/readyz").status_code != 503:
            assert time.monotonic() < deadline
        refused = client.post(url + CHAT, json=body(4), headers=AUTH)
        client.get(url + "/readyz")  # a probe's 503 is not a refused request
        after = value(scrape(url, client), "lmx_rejected_requests", "_total", reason="draining")
        s.rest()
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "draining"
    assert refused.headers["Retry-After"].isdigit()
    assert after - before == 1
    assert a.proc.wait(30) == 0


def test_event_loop_lag_counts_a_blocked_loop() -> None:
    """A callback that holds the loop 0.2 s shows up as one wake-up at least 0.1 s late."""
    import asyncio

    from appliance.config import MetricsConfig
    from appliance.metrics import Metrics

    m = Metrics(MetricsConfig())

    async def run() -> None:
        watch = asyncio.create_task(m.watch_loop_lag(0.01))
        await asyncio.sleep(0.05)
        time.sleep(0.2)  # the loop is blocked: the watcher's timer cannot fire
        await asyncio.sleep(0.05)
        watch.cancel()

    asyncio.run(run())
    fams = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    samples = {
        (s.name, s.labels.get("le")): s.value for s in fams["lmx_event_loop_lag_seconds"].samples
    }
    assert samples[("lmx_event_loop_lag_seconds_count", None)] >= 3
    late = (
        samples[("lmx_event_loop_lag_seconds_count", None)]
        - samples[("lmx_event_loop_lag_seconds_bucket", "0.1")]
    )
    assert late == 1, samples
