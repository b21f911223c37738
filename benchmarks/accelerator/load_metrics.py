"""Closed-loop streaming chat clients against a running appliance, with the server's own view.

    python3 -m benchmarks.accelerator.load_metrics http://127.0.0.1:18500 CLIENTS REQUESTS_EACH

Prints one line: tokens/s, the joins the engine made (lmx_batch_joins_total and the requests per
join), the client's CPU share and TTFT, and the server's means over the run from /metrics
(time to first token from admission, inter-token latency, end-to-end, queue time), so a
client-side delay can be told from the server's. The clients run in processes of at most 16 each
(one process at 64 clients ran at 82-90 % of a core on an H100 machine). server_ab.sh and
profile_server.sh drive it.
"""

import asyncio
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

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
            out["lag_le_" + line[len(LAG_BUCKET) :].split('"', 1)[0]] = float(
                line.rsplit(" ", 1)[1]
            )
        for name in COUNTERS:
            if line.startswith(name + "{"):
                out[name] = out.get(name, 0) + float(line.rsplit(" ", 1)[1])
        for name in HISTOGRAMS:
            for suffix in ("_sum", "_count"):
                if line.startswith(name + suffix):
                    key = name + suffix
                    out[key] = out.get(key, 0) + float(line.rsplit(" ", 1)[1])
    return out


PROCS = max(1, (C + 15) // 16)  # at most 16 clients a process: one process can't keep up with 64


async def client(c: httpx.AsyncClient, i: int, ttfts: list[float]) -> int:
    n = 0
    for j in range(N):
        body = {
            "messages": [{"role": "user", "content": f"{i} {j} hello there"}],
            "max_tokens": 128,
            "stream": True,
            "stream_options": {"include_usage": True},
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


async def clients(ids: list[int], start_at: float) -> tuple[int, list[float], float, float, float]:
    ttfts: list[float] = []
    limits = httpx.Limits(max_connections=len(ids) + 4)
    async with httpx.AsyncClient(timeout=60, limits=limits) as c:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        t0, cpu0 = time.time(), time.process_time()
        ns = await asyncio.gather(*(client(c, i, ttfts) for i in ids))
        return sum(ns), ttfts, t0, time.time(), time.process_time() - cpu0


def run_part(ids: list[int], start_at: float) -> tuple[int, list[float], float, float, float]:
    return asyncio.run(clients(ids, start_at))


def main() -> None:
    before = scrape()
    parts = [list(range(C))[k::PROCS] for k in range(PROCS)]
    start_at = time.time() + 1.0
    with ProcessPoolExecutor(PROCS) as pool:
        results = list(pool.map(run_part, parts, [start_at] * PROCS))
    after = scrape()
    tokens = sum(r[0] for r in results)
    ttfts = [t for r in results for t in r[1]]
    wall = max(r[3] for r in results) - min(r[2] for r in results)
    late = max(r[2] for r in results) - start_at
    if late > 0.05:
        print(f"warning: a client process started {1000 * late:.0f} ms late", file=sys.stderr)
    cpu = max(r[4] / (r[3] - r[2]) for r in results)
    d = {k: after[k] - before.get(k, 0) for k in after}
    server = {
        k[4:-4]: round(1000 * d[k] / d[k[:-4] + "_count"], 1)
        for k in d
        if k.endswith("_sum") and d.get(k[:-4] + "_count")
    }
    lag = sorted((float(k[7:]), v) for k, v in d.items() if k.startswith("lag_le_"))
    lag_p90 = next((le for le, v in lag if lag and v >= 0.9 * lag[-1][1]), None)
    joins = d.get("lmx_batch_joins_total", 0)
    per_join = d.get("lmx_batch_joined_requests_total", 0) / joins if joins else 0
    print(
        f"c={C} N={N}: joins {joins:.0f}, {per_join:.1f} per join, {tokens / wall:.0f} tok/s, "
        f"client cpu {cpu:.2f} (busiest of {PROCS}), "
        f"client TTFT p50 {1000 * statistics.median(ttfts):.0f} ms "
        f"mean {1000 * statistics.mean(ttfts):.0f}; loop lag p90 <= {lag_p90} s; server means ms "
        f"{server}"
    )


if __name__ == "__main__":
    main()
