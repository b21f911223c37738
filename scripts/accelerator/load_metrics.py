"""Closed-loop streaming chat clients against a running appliance, with the server's own view.

    python3 scripts/accelerator/load_metrics.py http://127.0.0.1:18500 CLIENTS REQUESTS_EACH

Prints one line: tokens/s, the joins the engine made (lmx_batch_joins_total and the requests per
join), the client's CPU share and TTFT, and the server's means over the run from /metrics
(time to first token from admission, inter-token latency, end-to-end, queue time), so a
client-side delay can be told from the server's. Used for BENCHMARKS.md's engine-process A/B.
"""

import asyncio
import json
import statistics
import sys
import time

import httpx

URL = sys.argv[1]
C = int(sys.argv[2])
N = int(sys.argv[3])
HISTOGRAMS = (
    "lmx_time_to_first_token_seconds",
    "lmx_request_queue_time_seconds",
    "lmx_e2e_request_latency_seconds",
    "lmx_inter_token_latency_seconds",
    "lmx_event_loop_lag_seconds",
)
LAG_BUCKET = 'lmx_event_loop_lag_seconds_bucket{le="'

COUNTERS = ("lmx_batch_joins_total", "lmx_batch_joined_requests_total")


def scrape() -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(URL + "/metrics").text.splitlines():
        if line.startswith(LAG_BUCKET):
            out["lag_le_" + line[len(LAG_BUCKET):].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
        for name in COUNTERS:
            if line.startswith(name + "{"):
                out[name] = out.get(name, 0) + float(line.rsplit(" ", 1)[1])
        for name in HISTOGRAMS:
            for suffix in ("_sum", "_count"):
                if line.startswith(name + suffix):
                    key = name + suffix
                    out[key] = out.get(key, 0) + float(line.rsplit(" ", 1)[1])
    return out


ttfts: list[float] = []


async def client(c: httpx.AsyncClient, i: int) -> int:
    n = 0
    for j in range(N):
        body = {
            "messages": [{"role": "user", "content": f"{i} {j} hello there"}],
            "max_tokens": 128, "stream": True, "stream_options": {"include_usage": True},
        }
        t0 = time.perf_counter()
        first = None
        async with c.stream("POST", URL + "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if first is None and '"content":"' in line and '"content":""' not in line:
                    first = time.perf_counter() - t0
                if line.startswith("data: {") and '"usage"' in line:
                    n += json.loads(line[6:])["usage"]["completion_tokens"]
        if first is not None:
            ttfts.append(first)
    return n


async def main() -> None:
    before = scrape()
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=C + 4)) as c:
        t0, cpu0 = time.perf_counter(), time.process_time()
        ns = await asyncio.gather(*(client(c, i) for i in range(C)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    after = scrape()
    d = {k: after[k] - before.get(k, 0) for k in after}
    server = {
        k[4:-4]: round(1000 * d[k] / d[k[:-4] + "_count"], 1)
        for k in d if k.endswith("_sum") and d.get(k[:-4] + "_count")
    }
    lag = sorted((float(k[7:]), v) for k, v in d.items() if k.startswith("lag_le_"))
    lag_p90 = next((le for le, v in lag if lag and v >= 0.9 * lag[-1][1]), None)
    joins = d.get("lmx_batch_joins_total", 0)
    per_join = d.get("lmx_batch_joined_requests_total", 0) / joins if joins else 0
    print(
        f"c={C} N={N}: joins {joins:.0f}, {per_join:.1f} per join, {sum(ns) / wall:.0f} tok/s, "
        f"client cpu {cpu / wall:.2f}, client TTFT p50 {1000 * statistics.median(ttfts):.0f} ms "
        f"mean {1000 * statistics.mean(ttfts):.0f}; loop lag p90 <= {lag_p90} s; server means ms "
        f"{server}"
    )


asyncio.run(main())
