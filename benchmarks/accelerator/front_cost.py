"""The HTTP front's own CPU per request and per streamed token, read from /proc.

    python3 -m benchmarks.accelerator.front_cost URL PID [REQUESTS] [CONCURRENCY]

Sends REQUESTS streaming chat completions (default 200, CONCURRENCY at a time, default 1) with
max_tokens 1 and then 33, and prints the CPU time the threads of process PID used per request
(user + system, all threads, and the busiest thread, i.e. the event loop when the engine runs in
a process of its own: models.catalog.NAME.engine_process). From the two: the front's fixed cost
of a request and its cost per token streamed.
"""

import asyncio
import os
import sys
import time

import httpx
import orjson

URL, PID = sys.argv[1], int(sys.argv[2])
N = int(sys.argv[3]) if len(sys.argv) > 3 else 200
C = int(sys.argv[4]) if len(sys.argv) > 4 else 1
TICK = os.sysconf("SC_CLK_TCK")


def cpu() -> dict[int, float]:
    out = {}
    for tid in os.listdir(f"/proc/{PID}/task"):
        try:
            with open(f"/proc/{PID}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile (its CPU is not counted)
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / TICK
    return out


async def run(max_tokens: int) -> float:
    async with httpx.AsyncClient(timeout=120) as client:
        left = [N]

        async def one() -> None:
            while left[0] > 0:
                left[0] -= 1
                body = orjson.dumps(
                    {
                        "messages": [
                            {
                                "role": "user",
                                "content": (
                                    f"Request {left[0]}-{max_tokens}. "
                                    "Explain in a few sentences how a hash table handles "
                                    "collisions."
                                ),
                            }
                        ],
                        "max_tokens": max_tokens,
                        "temperature": 0.0,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    }
                )
                async with client.stream(
                    "POST",
                    URL + "/v1/chat/completions",
                    content=body,
                    headers={"content-type": "application/json"},
                ) as r:
                    async for _ in r.aiter_lines():
                        pass

        t = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(C)))
        return time.perf_counter() - t


def main() -> None:
    asyncio.run(run(1))  # warm-up
    per = {}
    for mt in (1, 33):
        before = cpu()
        wall = asyncio.run(run(mt))
        after = cpu()
        d = {t: after[t] - before.get(t, 0.0) for t in after}
        total, top = sum(d.values()), max(d.values())
        per[mt] = (total, top)
        print(
            f"max_tokens {mt}: {N} requests at {C} in {wall:.2f} s; CPU ms a request: "
            f"all threads {1000 * total / N:.3f}, busiest thread {1000 * top / N:.3f}",
            flush=True,
        )
    tok = (per[33][1] - per[1][1]) / (32 * N)
    print(
        f"busiest thread: {1000 * per[1][1] / N:.3f} ms a request, "
        f"{1e6 * tok:.1f} us a further token"
    )


main()
