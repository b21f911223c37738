"""The appliance's own costs: 429 latency when busy, the /metrics scrape after many requests,
probe latencies under load, and its joins into the running batch."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, Optional

import httpx
import orjson

from benchmarks.common import percentile, say
from benchmarks.load import JSON_HEADERS, chat_body, http_client
from benchmarks.scenarios import PROMPTS


async def busy_rejection(
    base_url: str, n: int, long_tokens: int, timeout_s: float
) -> dict[str, Any]:
    """While one long stream holds the only slot, time n requests that must get 429."""
    lat: list[float] = []
    statuses: dict[str, int] = {}
    async with http_client(base_url, 4, timeout_s) as client:
        started = asyncio.Event()
        finished = asyncio.Event()

        async def long_stream() -> None:
            body = chat_body(PROMPTS[0], long_tokens)
            try:
                async with client.stream(
                    "POST", "/v1/chat/completions", content=body, headers=JSON_HEADERS
                ) as r:
                    async for chunk in r.aiter_raw():
                        if b'"content":"' in chunk and b'"content":""' not in chunk:
                            started.set()
            except (httpx.HTTPError, asyncio.CancelledError):
                pass
            finally:
                started.set()
                finished.set()

        task = asyncio.create_task(long_stream())
        await asyncio.wait_for(started.wait(), 120)
        body = chat_body(PROMPTS[1], 4, stream=False)
        deadline = time.monotonic() + 120
        for _ in range(n):
            if finished.is_set() or time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            r = await client.post("/v1/chat/completions", content=body, headers=JSON_HEADERS)
            dt = time.perf_counter() - t0
            statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
            if r.status_code == 429:
                lat.append(dt)
        long_ran_through = not finished.is_set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return {
        "requests": sum(statuses.values()),
        "statuses": statuses,
        "rejected": len(lat),
        "p50_s": percentile(lat, 50),
        "p99_s": percentile(lat, 99),
        "max_s": max(lat) if lat else None,
        "long_request_held_slot": long_ran_through,
    }


def batch_joins(base_url: str) -> Optional[tuple[int, int]]:
    """The appliance's joins into the running batch so far and the requests they took
    (lmx_batch_joins_total, lmx_batch_joined_requests_total, summed over models); None if
    /metrics does not answer. Read between runs: how many prefill calls a run's waves took."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(base_url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    totals = {"lmx_batch_joins_total": 0.0, "lmx_batch_joined_requests_total": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return int(totals["lmx_batch_joins_total"]), int(totals["lmx_batch_joined_requests_total"])


async def metrics_after_requests(
    base_url: str, n: int, metrics_path: str, namespace: str, timeout_s: float, scrapes: int = 30
) -> dict[str, Any]:
    """Send n cheap generation requests (1 token, non-streaming), then time /metrics scrapes.

    Nine in ten are chat completions and one in ten plain completions, so the per-endpoint
    request series and every latency histogram grow as they do in use.
    """
    chat = [chat_body(p, 1, stream=False) for p in PROMPTS]
    comp = [orjson.dumps({"prompt": p, "max_tokens": 1, "temperature": 0.0}) for p in PROMPTS]
    statuses: dict[str, int] = {}
    sent = done = 0
    c = 8
    t_start = time.perf_counter()
    async with http_client(base_url, c + 2, timeout_s) as client:

        async def worker(i: int) -> None:
            nonlocal sent, done
            while sent < n:
                k = sent
                sent += 1
                path, body = (
                    ("/v1/completions", comp[k % len(comp)])
                    if k % 10 == 9
                    else ("/v1/chat/completions", chat[k % len(chat)])
                )
                try:
                    r = await client.post(path, content=body, headers=JSON_HEADERS)
                    key = str(r.status_code)
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                statuses[key] = statuses.get(key, 0) + 1
                done += 1
                if done % 1000 == 0:
                    say(f"  /metrics warm-up: {done}/{n} requests answered")

        await asyncio.gather(*(worker(i) for i in range(c)))
        spent = time.perf_counter() - t_start
        await asyncio.sleep(0.5)
        lat: list[float] = []
        text = b""
        for _ in range(scrapes):
            t0 = time.perf_counter()
            r = await client.get(metrics_path)
            text = await r.aread()
            lat.append(time.perf_counter() - t0)
    prefix = (namespace + "_" if namespace else "") + "requests_total{"
    seen = 0.0
    for line in text.decode(errors="replace").splitlines():
        if line.startswith(prefix):
            with contextlib.suppress(ValueError, IndexError):
                seen += float(line.rsplit(" ", 1)[1])
    return {
        "requests": n,
        "statuses": statuses,
        "send_s": spent,
        "requests_total_in_metrics": seen,
        "scrapes": len(lat),
        "p50_s": percentile(lat, 50),
        "p99_s": percentile(lat, 99),
        "max_s": max(lat),
        "bytes": len(text),
        "lines": text.count(b"\n"),
    }


def probe_stats(samples: dict[str, list[float]], failures: dict[str, int]) -> dict[str, Any]:
    """Per probed path: how many answered, how many failed, p50 / p99 / max latency."""
    return {
        path: {
            "n": len(v),
            "failed": failures.get(path, 0),
            "p50_s": percentile(v, 50),
            "p99_s": percentile(v, 99),
            "max_s": max(v) if v else None,
        }
        for path, v in samples.items()
    }
