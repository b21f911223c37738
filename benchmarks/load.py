"""The load: closed-loop streaming chat clients, spread over client processes at high
concurrency, and the probes that time /healthz and /metrics while they run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import httpx
import orjson

from benchmarks.common import percentile, say
from benchmarks.procs import Proc, preexec
from benchmarks.scenarios import PROMPTS, Plan, prompt_text

JSON_HEADERS = {"content-type": "application/json"}
_SEQ = [0]  # the next request number: every prompt the servers see is new


@dataclass
class ReqResult:
    """One streamed request as the client saw it."""

    ok: bool
    status: int
    error: Optional[str]
    tokens: int
    events: int
    ttft_s: Optional[float]
    e2e_s: float
    itl_s: list[float]
    usage: bool
    text: str = ""


def chat_body(prompt: str, max_tokens: int, stream: bool = True) -> bytes:
    """A greedy chat completion request; streamed ones ask for usage in the last chunk."""
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


async def stream_chat(client: httpx.AsyncClient, body: bytes) -> ReqResult:
    """One streaming chat completion; times the content events as they arrive."""
    t0 = time.perf_counter()
    times: list[float] = []
    tokens: Optional[int] = None
    done = False
    error: Optional[str] = None
    pieces: list[str] = []
    status = 0
    try:
        async with client.stream(
            "POST", "/v1/chat/completions", content=body, headers=JSON_HEADERS
        ) as r:
            status = r.status_code
            if status != 200:
                text = (await r.aread())[:200].decode(errors="replace")
                return ReqResult(
                    False,
                    status,
                    f"HTTP {status}: {text}",
                    0,
                    0,
                    None,
                    time.perf_counter() - t0,
                    [],
                    False,
                )
            buf = b""
            async for chunk in r.aiter_raw():
                now = time.perf_counter()
                buf += chunk
                if b"\n" not in chunk:
                    continue
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        continue
                    obj = orjson.loads(payload)
                    if "error" in obj:
                        error = str(obj["error"])[:200]
                    usage = obj.get("usage")
                    if usage:
                        tokens = int(usage.get("completion_tokens") or 0)
                    for ch in obj.get("choices") or ():
                        delta = ch.get("delta") or {}
                        content = delta.get("content") or ch.get("text")
                        if content:
                            times.append(now)
                            pieces.append(content)
    except (httpx.HTTPError, OSError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
    e2e = time.perf_counter() - t0
    if error is None and not done:
        error = "stream ended without [DONE]"
    n_events = len(times)
    per_event = (tokens / n_events) if tokens and n_events else 1.0
    itl = [(b - a) / per_event for a, b in zip(times, times[1:], strict=False)]
    return ReqResult(
        ok=error is None,
        status=status,
        error=error,
        tokens=tokens or 0,
        events=n_events,
        ttft_s=(times[0] - t0) if times else None,
        e2e_s=e2e,
        itl_s=itl,
        usage=tokens is not None,
        text="".join(pieces) if tokens is None else "",
    )


class TokenCounter:
    """Counts tokens of returned text, for a server whose streams carry no usage."""

    def __init__(self, model_path: Path) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(model_path / "tokenizer.json"))

    def __call__(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False).ids)


def http_client(base_url: str, connections: int, timeout_s: float) -> httpx.AsyncClient:
    """A client to one server, `connections` kept open, no proxy from the environment."""
    return httpx.AsyncClient(
        base_url=base_url,
        trust_env=False,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        timeout=httpx.Timeout(timeout_s, connect=10.0),
    )


async def _probe(
    base_url: str,
    paths: Sequence[str],
    interval: float,
    stop: asyncio.Event,
    out: dict[str, list[float]],
    failures: dict[str, int],
) -> None:
    """GET each path in turn every `interval` seconds until stopped; records latencies."""
    async with http_client(base_url, 2, 10.0) as client:
        while not stop.is_set():
            for path in paths:
                t0 = time.perf_counter()
                try:
                    r = await client.get(path)
                    await r.aread()
                    if r.status_code == 200:
                        out.setdefault(path, []).append(time.perf_counter() - t0)
                    else:
                        failures[path] = failures.get(path, 0) + 1
                except httpx.HTTPError:
                    failures[path] = failures.get(path, 0) + 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


def _stats(values: Sequence[float], prefix: str) -> dict[str, Optional[float]]:
    return {f"{prefix}_p50": percentile(values, 50), f"{prefix}_p99": percentile(values, 99)}


def _seq_block(n: int) -> int:
    """The first of n request numbers reserved for one run."""
    first = _SEQ[0]
    _SEQ[0] += n
    return first


async def _run_clients(
    base_url: str,
    first: int,
    n: int,
    c: int,
    plan: Plan,
    seq0: int,
    start_at: Optional[float] = None,
) -> tuple[list[ReqResult], float]:
    """Clients first .. first+n-1 of c, each sending its requests back to back; from
    `start_at` (a time.monotonic() value, the same clock in every process) if given. Returns
    the results and when the clients began."""
    results: list[ReqResult] = []
    rpc = plan.requests_per_client
    async with http_client(base_url, n + 4, plan.timeout_s) as client:

        async def one_client(i: int) -> None:
            for j in range(rpc):
                body = chat_body(prompt_text(i + j * c, seq0 + i * rpc + j), plan.max_tokens)
                results.append(await stream_chat(client, body))

        if start_at is not None:
            await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        started = time.monotonic()
        await asyncio.gather(*(one_client(i) for i in range(first, first + n)))
    return results, started


def _client_process(
    base_url: str, first: int, n: int, c: int, plan: Plan, seq0: int, start_at: float
) -> dict[str, Any]:
    """In a client process (ClientPool): one share of a run's clients."""
    cpu0 = time.process_time()
    results, started = asyncio.run(_run_clients(base_url, first, n, c, plan, seq0, start_at))
    return {
        "results": [asdict(r) for r in results],
        "cpu_s": time.process_time() - cpu0,
        "started": started,
        "end": time.monotonic(),
    }


def _idle(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


class ClientPool:
    """Processes for the load client: one Python process streaming from 64 clients runs near a
    full core (on an H100 host, ~5,000 events/s), and then its own delays count against the server
    it measures. closed_loop spreads more than plan.clients_per_process clients over these."""

    def __init__(self) -> None:
        self._pool: Optional[Any] = None
        self._size = 0

    def get(self, n: int) -> Any:
        """A pool of at least n started processes (started now, so no run waits for them)."""
        if self._pool is None or self._size < n:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.close()
            self._pool = ProcessPoolExecutor(
                n, mp_context=multiprocessing.get_context("spawn"), initializer=preexec()
            )
            self._size = n

            pids: set[int] = set()
            for _ in range(10):  # each worker busy at once: all n have started
                pids |= set(self._pool.map(_idle, [0.2] * n))
                if len(pids) >= n:
                    break
        return self._pool

    def close(self) -> None:
        """Stop the client processes now, whatever they were doing (an interrupted run)."""
        pool, self._pool, self._size = self._pool, None, 0
        if pool is not None:
            for proc in list(getattr(pool, "_processes", {}).values()):
                with contextlib.suppress(Exception):
                    proc.terminate()
            pool.shutdown(wait=True, cancel_futures=True)


CLIENT_POOL = ClientPool()


async def closed_loop(
    base_url: str,
    c: int,
    plan: Plan,
    probe_paths: Sequence[str] = (),
    probes: Optional[dict[str, list[float]]] = None,
    probe_failures: Optional[dict[str, int]] = None,
    counter: Optional[TokenCounter] = None,
    server: Optional[Proc] = None,
) -> dict[str, Any]:
    """c clients, each sending plan.per_client(c) streaming requests back to back.

    More than plan.clients_per_process clients are spread over that many client processes
    (CLIENT_POOL), started together; client_cpu_fraction is then the busiest one's. With
    `server`, also the CPU seconds that server's process used during the run: a figure that
    contention from other work on the machine distorts far less than tokens/s.
    """
    plan = replace(plan, requests_per_client=plan.per_client(c), min_requests=0)
    seq0 = _seq_block(c * plan.requests_per_client)
    nproc = -(-c // max(1, plan.clients_per_process))
    pool = CLIENT_POOL.get(nproc) if nproc > 1 else None
    stop = asyncio.Event()
    probe_task = None
    if probe_paths and probes is not None and probe_failures is not None:
        probe_task = asyncio.create_task(
            _probe(base_url, probe_paths, plan.probe_interval_s, stop, probes, probe_failures)
        )
    srv0 = server.cpu_seconds() if server is not None else None
    if pool is None:
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        results, _ = await _run_clients(base_url, 0, c, c, plan, seq0)
        wall = time.perf_counter() - t0
        cpu_fraction = cpu_total = (time.process_time() - cpu0) / wall if wall > 0 else 0.0
        late = 0.0
    else:
        loop = asyncio.get_running_loop()
        start_at = time.monotonic() + 0.2
        shares = [(k * c // nproc, (k + 1) * c // nproc) for k in range(nproc)]
        outs = await asyncio.gather(
            *(
                loop.run_in_executor(
                    pool, _client_process, base_url, a, b - a, c, plan, seq0, start_at
                )
                for a, b in shares
            )
        )
        wall = max(o["end"] for o in outs) - start_at
        results = [ReqResult(**r) for o in outs for r in o["results"]]
        cpu_fraction = max(o["cpu_s"] for o in outs) / wall if wall > 0 else 0.0
        cpu_total = sum(o["cpu_s"] for o in outs) / wall if wall > 0 else 0.0
        late = max(o["started"] for o in outs) - start_at
        if late > 0.05:
            say(f"warning: a client process started its clients {late * 1000:.0f} ms late")
    srv1 = server.cpu_seconds() if server is not None else None
    stop.set()
    if probe_task is not None:
        await probe_task
    counted_by = "usage"
    for r in results:
        if r.ok and not r.usage:
            counted_by = "tokenizer"
            if counter is not None:
                r.tokens = counter(r.text)
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    errors = [r for r in results if not r.ok]
    server_cpu = srv1 - srv0 if srv0 is not None and srv1 is not None else None
    return {
        "server_cpu_s": server_cpu,
        "cpu_ms_per_token": (
            server_cpu * 1000 / tokens if server_cpu is not None and tokens else None
        ),
        "requests": len(results),
        "ok": len(ok),
        "errors": len(errors),
        "non_200": sum(1 for r in errors if r.status not in (0, 200)),
        "error_samples": sorted({r.error or "" for r in errors})[:3],
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        **_stats([r.ttft_s for r in ok if r.ttft_s is not None], "ttft_s"),
        **_stats([x for r in ok for x in r.itl_s], "itl_s"),
        **_stats([r.e2e_s for r in ok], "e2e_s"),
        "tokens_per_request": tokens / len(ok) if ok else 0.0,
        "events_per_request": sum(r.events for r in ok) / len(ok) if ok else 0.0,
        "client_cpu_fraction": cpu_fraction,  # the busiest client process, in cores
        "client_cpu_total": cpu_total,  # all client processes together, in cores
        "client_processes": nproc,
        "client_start_late_s": late,
        "tokens_counted_by": counted_by,
    }


async def warm_up(base_url: str, plan: Plan) -> None:
    """One request per client at every concurrency, untimed: the server has compiled and
    allocated for every batch size before the measured runs, as the ceiling worker has."""
    async with http_client(base_url, 2, plan.timeout_s) as client:
        first = await stream_chat(client, chat_body(PROMPTS[0], 8))
        if not first.ok:
            raise RuntimeError(f"warm-up request to {base_url} failed: {first.error}")
    once = replace(plan, requests_per_client=1, min_requests=0)
    for c in plan.concurrency:
        r = await closed_loop(base_url, c, once)
        if r["errors"]:
            # mlx_lm.server drops requests under load: count it in the measured runs, go on.
            say(f"warm-up at c={c} on {base_url}: {r['errors']} failed ({r['error_samples'][:1]})")


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per figure, the best of the repetitions (max tokens/s, min latency); errors summed."""
    best: dict[str, Any] = {"tokens_per_s": max(r["tokens_per_s"] for r in runs)}
    for key in (
        "ttft_s_p50",
        "ttft_s_p99",
        "itl_s_p50",
        "itl_s_p99",
        "e2e_s_p50",
        "e2e_s_p99",
        "cpu_ms_per_token",
    ):
        vals = [r[key] for r in runs if r[key] is not None]
        best[key] = min(vals) if vals else None
    best["errors"] = sum(r["errors"] for r in runs)
    best["non_200"] = sum(r["non_200"] for r in runs)
    best["requests"] = sum(r["requests"] for r in runs)
    by_tokenizer = any(r["tokens_counted_by"] == "tokenizer" for r in runs)
    best["tokens_counted_by"] = "tokenizer" if by_tokenizer else "usage"
    best["client_cpu_fraction_max"] = max(r["client_cpu_fraction"] for r in runs)
    best["client_processes_max"] = max(r.get("client_processes", 1) for r in runs)
    return best
