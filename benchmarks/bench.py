"""The benchmark harness: the appliance side by side with mlx_lm.server and the bare engine.

    python -m benchmarks [--shape demo|llama-1b | --model-path DIR] [--concurrency 1,4,8]
                              [--max-tokens N] [--requests-per-client N] [--repeat 3]
                              [--out bench-results] [--skip-costs] [--no-chart] [--quick]

On one model and one machine, in one run:

- the ceiling: mlx_lm's BatchGenerator driven directly in a loop, no server, in a subprocess of
  its own (`--ceiling-worker`, driven over stdin); c prompts inserted at once, greedy, fixed
  max_tokens; on a GPU a second worker runs it under the appliance's MLX settings
  (engine/cuda.py's MLX_ENV_DEFAULTS, CUDA graphs off), and the faster of the two counts;
- mlx_lm.server and the appliance, both started once on loopback ports; for each repetition,
  for each concurrency, the ceiling, then mlx_lm.server, then the appliance take their turn (one
  at a time) with closed-loop streaming chat clients (asyncio + httpx; more than 16 clients are
  spread over client processes, `--clients-per-process`, so the client is not what limits);
  generated tokens are counted from the usage each stream reports (stream_options.include_usage);
- the appliance's own costs: 429 latency when busy, /healthz and /metrics latency under load,
  /metrics scrape time after many requests, RSS after load, cold start to /readyz 200.

Progress goes to stderr; the tables to stdout; JSON and a PNG chart to --out. Every process it
starts is stopped by PID (SIGTERM, then SIGKILL), also on Ctrl-C; all traffic is to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import httpx
import orjson

__all__ = ["PROMPTS", "main", "percentile"]

HOST = "127.0.0.1"
APPLIANCE = "appliance"
MLX_SERVER = "mlx_lm.server"
SERVERS = (MLX_SERVER, APPLIANCE)

# Short, different chat prompts; client i sends PROMPTS[(i + j * c) % len] as its j-th request,
# with a request number in front (see prompt_text).
PROMPTS = (
    "Write a short note about the sea.",
    "Describe a quiet morning in a small town.",
    "List three uses for a paper clip.",
    "Explain how a bicycle stays upright.",
    "Tell a story about a lost key.",
    "What makes bread rise?",
    "Give advice to a new gardener.",
    "Summarise the water cycle.",
    "Describe the sound of rain on a roof.",
    "Why do cats purr?",
    "Plan a picnic for four people.",
    "Explain what a map legend is.",
    "Write a haiku about winter light.",
    "How does a lighthouse work?",
    "Describe an old library.",
    "What is a good name for a boat?",
)


@dataclass(frozen=True)
class TargetSet:
    """Throughput and latency targets: {concurrency: ratio}."""

    vs_mlx: dict[int, float]
    vs_ceiling: float
    ttft_p99_vs_mlx: dict[int, float]
    zero_errors_at: tuple[int, ...] = ()


# Targets of issue 7 (demo model, 2-core CPU) and issue 9 (1B shape on an accelerator).
CPU_TARGETS = TargetSet(vs_mlx={1: 1.5, 8: 1.15}, vs_ceiling=0.8, ttft_p99_vs_mlx={8: 0.7})
ACCEL_TARGETS = TargetSet(vs_mlx={1: 2.0, 32: 2.0}, vs_ceiling=0.8, ttft_p99_vs_mlx={32: 0.5},
                          zero_errors_at=(64,))
CEILING_TRIES = 3  # ceiling batches per repetition and concurrency (they are short)
BUSY_P99_S = 0.050
METRICS_SCRAPE_S = 0.020
COLD_START_S = 3.0

_T0 = time.monotonic()

# benchmarks/ is not installed: the processes the bench starts (the ceiling worker, the appliance)
# find it, and this checkout's appliance, through the repository root on PYTHONPATH.
ROOT = Path(__file__).resolve().parent.parent


def child_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """This process's environment with the repository root first on PYTHONPATH."""
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def say(msg: str) -> None:
    """A progress line on stderr."""
    print(f"[bench {time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The q-th percentile (0..100) with linear interpolation; None for no values."""
    if not values:
        return None
    s = sorted(values)
    if len(s) == 1:
        return float(s[0])
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


def _stats(values: Sequence[float], prefix: str) -> dict[str, Optional[float]]:
    return {f"{prefix}_p50": percentile(values, 50), f"{prefix}_p99": percentile(values, 99)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# Processes


def _die_with_parent() -> None:
    # Linux: the child gets SIGTERM if the bench dies without cleaning up (SIGKILL, OOM).
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Proc:
    """One subprocess of the bench, stopped by PID."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path,
                 log_path: Path) -> None:
        self.name, self.argv, self.env, self.cwd, self.log_path = name, argv, env, cwd, log_path
        self.popen: Optional[subprocess.Popen[bytes]] = None
        self.started = 0.0

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.started = time.perf_counter()
            self.popen = subprocess.Popen(
                self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        """SIGTERM, wait, then SIGKILL; returns the exit status."""
        p = self.popen
        if p is None:
            return None
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.wait(10)
        return p.returncode

    def cpu_seconds(self) -> Optional[float]:
        """User + system CPU seconds of the process and its children so far."""
        if not self.alive():
            return None
        import psutil

        try:
            proc = psutil.Process(self.pid)
            t = proc.cpu_times()
            total = float(t.user + t.system)
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    ct = child.cpu_times()
                    total += float(ct.user + ct.system)
            return total
        except psutil.Error:
            return None

    def rss_bytes(self) -> Optional[int]:
        """RSS of the process and its children."""
        if not self.alive():
            return None
        import psutil

        try:
            proc = psutil.Process(self.pid)
            total = int(proc.memory_info().rss)
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += int(child.memory_info().rss)
            return total
        except psutil.Error:
            return None


class Procs:
    """Every process the bench started; `stop_all` in a finally block."""

    def __init__(self) -> None:
        self.items: list[Proc] = []

    def add(self, proc: Proc) -> Proc:
        self.items.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.items:
            self.items.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.items):
            if proc.alive():
                say(f"stopping {proc.name} (pid {proc.pid})")
            proc.stop()
        self.items.clear()


def wait_ready(proc: Proc, url: str, timeout: float, interval: float = 0.01) -> float:
    """Poll url until 200; returns seconds since the process was started."""
    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited while starting:\n{proc.log_tail()}")
            try:
                if client.get(url).status_code == 200:
                    return time.perf_counter() - proc.started
            except httpx.HTTPError:
                pass
            time.sleep(interval)
    raise TimeoutError(f"{proc.name}: {url} never answered 200 in {timeout:.0f} s:\n{proc.log_tail()}")


def _hydra_value(value: str) -> str:
    if all(ch.isalnum() or ch in "_./-" for ch in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass
class Plan:
    """What one bench run does, from the command line."""

    model_path: Path
    model_label: str
    concurrency: list[int]
    max_tokens: int
    requests_per_client: int
    repeat: int
    out: Path
    costs: bool
    chart: bool
    metrics_requests: int
    busy_requests: int
    cold_starts: int
    targets: str
    timeout_s: float
    probe_interval_s: float
    appliance_args: list[str] = field(default_factory=list)
    mlx_server_args: list[str] = field(default_factory=list)
    clients_per_process: int = 16
    second_ceiling: bool = True
    # A run sends at least this many requests: at low concurrency each client sends more than
    # requests_per_client (on one H200 a one-client run of 3 requests, 1.4 s, gave 1.50x
    # mlx_lm.server, and runs of 6 requests minutes later 1.98x and 2.05x).
    min_requests: int = 8

    @property
    def cmax(self) -> int:
        return max(self.concurrency)

    def per_client(self, c: int) -> int:
        """Requests each of c clients sends in a run: requests_per_client, or more so that the
        run sends at least min_requests."""
        return max(self.requests_per_client, -(-self.min_requests // c))


def appliance_argv(plan: Plan, port: int, *, max_running: Optional[int] = None,
                   max_queued: Optional[int] = None, max_tokens: Optional[int] = None) -> list[str]:
    """`python -m appliance` with its catalog on the bench model and limits for the load."""
    c = plan.cmax
    cap = max(512, plan.max_tokens, max_tokens or 0)
    return [
        sys.executable, "-m", "appliance",
        # `++` sets a key whether the YAML has it or not (the catalog entry may lack some).
        f"++server.port={port}",
        f"++server.host={HOST}",
        "++server.drain_timeout_s=5",
        f"++models.catalog.demo.path={_hydra_value(str(plan.model_path))}",
        f"++models.catalog.demo.max_tokens={cap}",
        f"++models.catalog.demo.context_length={max(2048, cap + 512)}",
        f"++models.catalog.demo.completion_batch_size={max(32, c)}",
        "++models.default=demo",
        "++models.auto_load=[demo]",
        f"++limits.max_running={max_running if max_running is not None else max(8, c)}",
        f"++limits.max_queued={max_queued if max_queued is not None else max(32, 2 * c)}",
        f"++limits.request_timeout_s={max(300, int(plan.timeout_s))}",
        "++rate_limits.inference=null",
        "++rate_limits.admin=null",
        "++logging.file=none",
        "++logging.level=WARNING",
        *plan.appliance_args,
    ]


def mlx_server_argv(plan: Plan, port: int) -> list[str]:
    return [
        sys.executable, "-m", "mlx_lm.server",
        "--model", str(plan.model_path),
        "--host", HOST,
        "--port", str(port),
        "--decode-concurrency", str(max(32, plan.cmax)),
        "--prompt-concurrency", "8",
        "--max-tokens", str(plan.max_tokens),
        "--log-level", "WARNING",
        *plan.mlx_server_args,
    ]


# ---------------------------------------------------------------------------------------------
# The ceiling: BatchGenerator alone, in a subprocess


def ceiling_worker(model_path: str, concurrency: list[int], max_tokens: int) -> None:
    """`python -m benchmarks --ceiling-worker`: BatchGenerator alone, driven over stdin.

    Loads the model, warms up, prints {"ready": ..., "device": ...}; then for each line "c" on
    stdin runs one batch of c prompts and prints its result as one JSON line; "quit" ends it.
    """
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    t = time.perf_counter()
    loaded = load(model_path)
    model, tok = loaded[0], loaded[1]
    print(f"ceiling: model loaded in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    seq = itertools.count()

    def tokens_of(text: str) -> list[int]:
        ids = tok.apply_chat_template([{"role": "user", "content": text}],
                                      add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(x) for x in ids]
    gen = BatchGenerator(
        model,
        stop_tokens=[[int(t)] for t in sorted(tok.eos_token_ids)],
        # The appliance's batch settings in this bench: a batch of c is prefilled in one call.
        completion_batch_size=max(32, max(concurrency)),
        prefill_batch_size=max(32, max(concurrency)),
        stream=mx.default_stream(mx.default_device()),
    )

    def one(c: int) -> dict[str, float]:
        prompts = [tokens_of(prompt_text(i, next(seq))) for i in range(c)]
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        gen.insert(prompts, max_tokens=[max_tokens] * c)
        live, tokens, first = c, 0, None
        while live:
            _, responses = gen.next()
            for r in responses:
                if first is None:
                    first = time.perf_counter() - t0
                if r.finish_reason != "stop":  # the end-of-sequence token is not text
                    tokens += 1
                if r.finish_reason is not None:
                    live -= 1
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        return {"concurrency": c, "tokens": tokens, "wall_s": wall,
                "tokens_per_s": tokens / wall, "ttft_s": first or wall,
                "cpu_s": cpu, "cpu_ms_per_token": cpu * 1000 / max(tokens, 1)}

    # Warm-up, untimed: one full pass of every batch size, so kernels for each shape are
    # compiled and buffers allocated, as they are in a server that has served for a while.
    for c in concurrency:
        one(c)
    print(json.dumps({"ready": True, "device": str(mx.default_device())}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit" or not cmd:
            break
        print(json.dumps(one(int(cmd))), flush=True)
    gen.close()


class Ceiling:
    """The ceiling worker subprocess; `run(c)` times one batch of c."""

    def __init__(self, plan: Plan, procs: Procs, work: Path, mlx_env: str = "mlx defaults",
                 env: Optional[dict[str, str]] = None) -> None:
        argv = [sys.executable, "-m", "benchmarks", "--ceiling-worker",
                "--model-path", str(plan.model_path),
                "--concurrency", ",".join(map(str, plan.concurrency)),
                "--max-tokens", str(plan.max_tokens)]
        self.mlx_env = mlx_env
        self.log_path = work / f"ceiling-{len(list(work.glob('ceiling*.log')))}.log"
        self.proc = Proc("ceiling", argv, child_env(env), work, self.log_path)
        self.timeout = plan.timeout_s
        with open(self.log_path, "wb") as err:
            self.proc.started = time.perf_counter()
            self.proc.popen = subprocess.Popen(
                argv, cwd=work, env=self.proc.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=err, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        procs.add(self.proc)
        self._buf = b""
        ready = self._read(600)
        self.device = str(ready.get("device", "?"))

    def _read(self, timeout: float) -> dict[str, Any]:
        import select

        p = self.proc.popen
        assert p is not None and p.stdout is not None
        fd = p.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the ceiling worker did not answer in {timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"the ceiling worker exited:\n{self.proc.log_tail()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        out: dict[str, Any] = json.loads(line)
        return out

    def run(self, c: int) -> dict[str, Any]:
        p = self.proc.popen
        assert p is not None and p.stdin is not None
        p.stdin.write(f"{c}\n".encode())
        p.stdin.flush()
        return self._read(self.timeout)

    def close(self, procs: Procs) -> None:
        p = self.proc.popen
        with contextlib.suppress(OSError, ValueError):
            assert p is not None and p.stdin is not None
            p.stdin.write(b"quit\n")
            p.stdin.close()
            p.wait(10)
        procs.stop(self.proc)


# ---------------------------------------------------------------------------------------------
# Load: closed-loop streaming clients


@dataclass
class ReqResult:
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


_SEQ = [0]  # the next request number: every prompt the servers see is new


def prompt_text(i: int, n: int) -> str:
    """The i-th fixed prompt, made unique by a leading request number: no server skips the
    prefill of a repeated prompt through its prompt cache (the ceiling has none)."""
    return f"Request {n}. {PROMPTS[i % len(PROMPTS)]}"


def _chat_body(prompt: str, max_tokens: int, stream: bool = True) -> bytes:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


_JSON = {"content-type": "application/json"}


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
        async with client.stream("POST", "/v1/chat/completions", content=body,
                                 headers=_JSON) as r:
            status = r.status_code
            if status != 200:
                text = (await r.aread())[:200].decode(errors="replace")
                return ReqResult(False, status, f"HTTP {status}: {text}", 0, 0, None,
                                 time.perf_counter() - t0, [], False)
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
        ok=error is None, status=status, error=error, tokens=tokens or 0, events=n_events,
        ttft_s=(times[0] - t0) if times else None, e2e_s=e2e, itl_s=itl,
        usage=tokens is not None, text="".join(pieces) if tokens is None else "",
    )


class TokenCounter:
    """Counts tokens of returned text, for a server whose streams carry no usage."""

    def __init__(self, model_path: Path) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(model_path / "tokenizer.json"))

    def __call__(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False).ids)


def _client(base_url: str, connections: int, timeout_s: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url, trust_env=False,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        timeout=httpx.Timeout(timeout_s, connect=10.0),
    )


async def _probe(base_url: str, paths: Sequence[str], interval: float, stop: asyncio.Event,
                 out: dict[str, list[float]], failures: dict[str, int]) -> None:
    """GET each path in turn every `interval` seconds until stopped; records latencies."""
    async with _client(base_url, 2, 10.0) as client:
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


def _seq_block(n: int) -> int:
    """The first of n request numbers reserved for one run."""
    first = _SEQ[0]
    _SEQ[0] += n
    return first


async def _run_clients(base_url: str, first: int, n: int, c: int, plan: Plan, seq0: int,
                       start_at: Optional[float] = None) -> tuple[list[ReqResult], float]:
    """Clients first .. first+n-1 of c, each sending its requests back to back; from
    `start_at` (a time.monotonic() value, the same clock in every process) if given. Returns
    the results and when the clients began."""
    results: list[ReqResult] = []
    rpc = plan.requests_per_client
    async with _client(base_url, n + 4, plan.timeout_s) as client:

        async def one_client(i: int) -> None:
            for j in range(rpc):
                body = _chat_body(prompt_text(i + j * c, seq0 + i * rpc + j), plan.max_tokens)
                results.append(await stream_chat(client, body))

        if start_at is not None:
            await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        started = time.monotonic()
        await asyncio.gather(*(one_client(i) for i in range(first, first + n)))
    return results, started


def _client_process(base_url: str, first: int, n: int, c: int, plan: Plan, seq0: int,
                    start_at: float) -> dict[str, Any]:
    """In a client process (ClientPool): one share of a run's clients."""
    cpu0 = time.process_time()
    results, started = asyncio.run(_run_clients(base_url, first, n, c, plan, seq0, start_at))
    return {"results": [asdict(r) for r in results], "cpu_s": time.process_time() - cpu0,
            "started": started, "end": time.monotonic()}


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
            # By the module's own name, not __main__ (`python -m benchmarks`): the workers
            # import it as such.
            from benchmarks import bench as named

            self._pool = ProcessPoolExecutor(
                n, mp_context=multiprocessing.get_context("spawn"),
                initializer=named._die_with_parent if sys.platform.startswith("linux") else None)
            self._size = n

            pids: set[int] = set()
            for _ in range(10):  # each worker busy at once: all n have started
                pids |= set(self._pool.map(named._idle, [0.2] * n))
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


async def closed_loop(base_url: str, c: int, plan: Plan, probe_paths: Sequence[str] = (),
                      probes: Optional[dict[str, list[float]]] = None,
                      probe_failures: Optional[dict[str, int]] = None,
                      counter: Optional[TokenCounter] = None,
                      server: Optional[Proc] = None) -> dict[str, Any]:
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
            _probe(base_url, probe_paths, plan.probe_interval_s, stop, probes, probe_failures))
    srv0 = server.cpu_seconds() if server is not None else None
    if pool is None:
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        results, _ = await _run_clients(base_url, 0, c, c, plan, seq0)
        wall = time.perf_counter() - t0
        cpu_fraction = cpu_total = (time.process_time() - cpu0) / wall if wall > 0 else 0.0
        late = 0.0
    else:
        from benchmarks import bench as named

        loop = asyncio.get_running_loop()
        start_at = time.monotonic() + 0.2
        shares = [(k * c // nproc, (k + 1) * c // nproc) for k in range(nproc)]
        outs = await asyncio.gather(*(
            loop.run_in_executor(pool, named._client_process, base_url, a, b - a, c, plan, seq0,
                                 start_at)
            for a, b in shares))
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
        "cpu_ms_per_token": server_cpu * 1000 / tokens if server_cpu is not None and tokens else None,
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
    async with _client(base_url, 2, plan.timeout_s) as client:
        first = await stream_chat(client, _chat_body(PROMPTS[0], 8))
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
    for key in ("ttft_s_p50", "ttft_s_p99", "itl_s_p50", "itl_s_p99", "e2e_s_p50", "e2e_s_p99",
                "cpu_ms_per_token"):
        vals = [r[key] for r in runs if r[key] is not None]
        best[key] = min(vals) if vals else None
    best["errors"] = sum(r["errors"] for r in runs)
    best["non_200"] = sum(r["non_200"] for r in runs)
    best["requests"] = sum(r["requests"] for r in runs)
    best["tokens_counted_by"] = ("tokenizer" if any(r["tokens_counted_by"] == "tokenizer" for r in runs)
                                 else "usage")
    best["client_cpu_fraction_max"] = max(r["client_cpu_fraction"] for r in runs)
    best["client_processes_max"] = max(r.get("client_processes", 1) for r in runs)
    return best


# ---------------------------------------------------------------------------------------------
# The appliance's own costs


async def busy_rejection(base_url: str, n: int, long_tokens: int, timeout_s: float) -> dict[str, Any]:
    """While one long stream holds the only slot, time n requests that must get 429."""
    lat: list[float] = []
    statuses: dict[str, int] = {}
    async with _client(base_url, 4, timeout_s) as client:
        started = asyncio.Event()
        finished = asyncio.Event()

        async def long_stream() -> None:
            body = _chat_body(PROMPTS[0], long_tokens)
            try:
                async with client.stream("POST", "/v1/chat/completions", content=body,
                                         headers=_JSON) as r:
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
        body = _chat_body(PROMPTS[1], 4, stream=False)
        deadline = time.monotonic() + 120
        for _ in range(n):
            if finished.is_set() or time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            r = await client.post("/v1/chat/completions", content=body, headers=_JSON)
            dt = time.perf_counter() - t0
            statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
            if r.status_code == 429:
                lat.append(dt)
        long_ran_through = not finished.is_set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return {"requests": sum(statuses.values()), "statuses": statuses, "rejected": len(lat),
            "p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99),
            "max_s": max(lat) if lat else None, "long_request_held_slot": long_ran_through}


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


async def metrics_after_requests(base_url: str, n: int, metrics_path: str, namespace: str,
                                 timeout_s: float, scrapes: int = 30) -> dict[str, Any]:
    """Send n cheap generation requests (1 token, non-streaming), then time /metrics scrapes.

    Nine in ten are chat completions and one in ten plain completions, so the per-endpoint
    request series and every latency histogram grow as they do in use.
    """
    chat = [_chat_body(p, 1, stream=False) for p in PROMPTS]
    comp = [orjson.dumps({"prompt": p, "max_tokens": 1, "temperature": 0.0}) for p in PROMPTS]
    statuses: dict[str, int] = {}
    sent = done = 0
    c = 8
    t_start = time.perf_counter()
    async with _client(base_url, c + 2, timeout_s) as client:

        async def worker(i: int) -> None:
            nonlocal sent, done
            while sent < n:
                k = sent
                sent += 1
                path, body = (("/v1/completions", comp[k % len(comp)]) if k % 10 == 9
                              else ("/v1/chat/completions", chat[k % len(chat)]))
                try:
                    r = await client.post(path, content=body, headers=_JSON)
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
    return {"requests": n, "statuses": statuses, "send_s": spent,
            "requests_total_in_metrics": seen, "scrapes": len(lat),
            "p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99), "max_s": max(lat),
            "bytes": len(text), "lines": text.count(b"\n")}


# ---------------------------------------------------------------------------------------------
# Machine


def machine_info() -> dict[str, Any]:
    import psutil

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    os_name = f"{platform.system()} {platform.release()}"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"') + f" (kernel {platform.release()})"
    if sys.platform == "darwin":
        with contextlib.suppress(Exception):
            cpu = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                 text=True, timeout=5).stdout.strip() or cpu
            os_name = f"macOS {platform.mac_ver()[0]}"
    versions = {}
    for pkg in ("mlx", "mlx-lm", "mlx-cuda", "mlx-metal", "falcon", "uvicorn", "httpx"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[pkg] = version(pkg)
    gpus: list[str] = []
    with contextlib.suppress(Exception):
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
        gpus = [g.strip() for g in r.stdout.splitlines() if g.strip()]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "os": os_name,
        "python": platform.python_version(),
        "versions": versions,
        "gpus": gpus,
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# ---------------------------------------------------------------------------------------------
# Report


@dataclass
class Target:
    name: str
    value: Optional[float]
    target: str
    passed: Optional[bool]


def evaluate(res: dict[str, Any], kind: str) -> list[Target]:
    t = ACCEL_TARGETS if kind == "accelerator" else CPU_TARGETS
    out: list[Target] = []
    best = res["servers"]
    ratios = res["ratios"]
    for c, limit in t.vs_mlx.items():
        v = ratios.get(str(c), {}).get("vs_mlx")
        out.append(Target(f"tokens/s c={c} appliance / mlx_lm.server", v, f">= {limit}x",
                          None if v is None else v >= limit))
    for c in res["plan"]["concurrency"]:
        v = ratios.get(str(c), {}).get("vs_ceiling")
        lim = t.vs_ceiling
        out.append(Target(f"tokens/s c={c} appliance / ceiling", v, f">= {lim}x",
                          None if v is None else v >= lim))
    for c, limit in t.ttft_p99_vs_mlx.items():
        v = ratios.get(str(c), {}).get("ttft_p99_vs_mlx")
        out.append(Target(f"TTFT p99 c={c} appliance / mlx_lm.server", v, f"<= {limit}x",
                          None if v is None else v <= limit))
    for c in t.zero_errors_at:
        app = best[APPLIANCE].get(str(c))
        v = None if app is None else float(app["errors"])
        out.append(Target(f"failed requests c={c} (appliance)", v, "== 0",
                          None if v is None else v == 0))
    costs = res.get("costs") or {}
    busy = costs.get("busy_rejection") or {}
    v = busy.get("p99_s")
    out.append(Target("busy rejection (429) p99, s", v, f"< {BUSY_P99_S}",
                      None if v is None else v < BUSY_P99_S))
    m = costs.get("metrics_after_requests") or {}
    v = m.get("p50_s")
    out.append(Target(f"/metrics scrape after {m.get('requests', '?')} requests (median), s", v,
                      f"< {METRICS_SCRAPE_S}", None if v is None else v < METRICS_SCRAPE_S))
    cs = costs.get("cold_start") or {}
    v = cs.get("median_s")
    out.append(Target("cold start to /readyz 200 (median), s", v, f"< {COLD_START_S}",
                      None if v is None else v < COLD_START_S))
    return out


def _f(v: Optional[float], fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def _ceiling_median(runs: list[dict[str, Any]]) -> float:
    """A check on the ceiling's best: under noise a best of many beats a server's single run by
    chance. The median of the warm batches (not a turn's first) under the MLX setting whose
    batch was the best."""
    env = max(runs, key=lambda r: r["tokens_per_s"])["mlx_env"]
    same = [r for r in runs if r["mlx_env"] == env]
    warm = [r for r in same if r.get("warm")] or same
    return float(statistics.median(r["tokens_per_s"] for r in warm))


def tables(res: dict[str, Any]) -> str:
    """The result tables in Markdown."""
    conc = res["plan"]["concurrency"]
    ceil = res["ceiling"]["best"]
    srv = res["servers"]
    ratios = res["ratios"]
    plan, mach = res["plan"], res["machine"]
    loads = [r.get("load_average_1m") for rs in res["ceiling"]["runs"].values() for r in rs]
    loads += [r.get("load_average_1m") for n in SERVERS for rs in res["runs"][n].values() for r in rs]
    got = [x for x in loads if isinstance(x, (int, float))]
    lines = [
        f"Model: {plan['model_label']} ({plan['model_path']}); {plan['max_tokens']} tokens per "
        f"request, greedy; {plan['requests_per_client']} requests per client per run"
        + (f" (at least {plan['min_requests']} a run: more per client at low concurrency)"
           if plan.get("min_requests", 0) > plan["requests_per_client"] else "")
        + "; "
        f"device {res['ceiling']['device']}.",
        f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['ram_bytes'] / 2**30:.0f} GiB, "
        f"{mach['os']}; MLX {mach['versions'].get('mlx', '?')}, mlx-lm "
        f"{mach['versions'].get('mlx-lm', '?')}"
        + (f"; GPU {', '.join(mach['gpus'])}" if mach.get("gpus") else "") + ".",
        "Load average (1 min) during the runs: "
        + (f"{min(got):.1f} to {max(got):.1f}" if got else "n/a") + ".",
        "",
        "Throughput (aggregate generated tokens/s, best of "
        f"{res['plan']['repeat']} repetitions, the ceiling best of "
        f"{len(res['ceiling']['runs'][str(conc[0])])} batches, and its median: of the warm batches "
        "under the MLX setting of its best; servers' tokens from each stream's "
        "usage):",
        "",
        "| clients | ceiling | mlx_lm.server | appliance | appliance / mlx_lm.server | appliance / ceiling "
        "| ceiling, median | appliance / that |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in conc:
        k = str(c)
        m, a, r = srv[MLX_SERVER].get(k, {}), srv[APPLIANCE].get(k, {}), ratios.get(k, {})
        lines.append(
            f"| {c} | {_f(ceil.get(k, {}).get('tokens_per_s'))} | {_f(m.get('tokens_per_s'))} | "
            f"{_f(a.get('tokens_per_s'))} | {_f(r.get('vs_mlx'), '{:.2f}x')} | "
            f"{_f(r.get('vs_ceiling'), '{:.2f}x')} | {_f(ceil.get(k, {}).get('tokens_per_s_median'))} | "
            f"{_f(r.get('vs_ceiling_median'), '{:.2f}x')} |")
    envs = res["ceiling"].get("mlx_envs", [])
    if len(envs) > 1:
        lines += ["", "The ceiling ran under " + " and under ".join(envs) + "; the faster counts: "
                  + ", ".join(f"c={c} {ceil.get(str(c), {}).get('mlx_env', '?')}" for c in conc)
                  + "."]
    lines += [
        "",
        "CPU per generated token, ms (the server's whole process, all threads; least of the "
        "repetitions). Contention from other work on the machine distorts it far less than tokens/s:",
        "",
        "| clients | ceiling | mlx_lm.server | appliance | appliance / mlx_lm.server |",
        "|---:|---:|---:|---:|---:|",
    ]
    for c in conc:
        k = str(c)
        cc = ceil.get(k, {}).get("cpu_ms_per_token")
        mc = srv[MLX_SERVER].get(k, {}).get("cpu_ms_per_token")
        ac = srv[APPLIANCE].get(k, {}).get("cpu_ms_per_token")
        lines.append(f"| {c} | {_f(cc, '{:.2f}')} | {_f(mc, '{:.2f}')} | {_f(ac, '{:.2f}')} | "
                     f"{_f(ac / mc if ac and mc else None, '{:.2f}x')} |")
    lines += [
        "",
        "Latency in ms (p50 / p99, best of the repetitions per figure) and failed requests (all repetitions):",
        "",
        "| clients | server | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | e2e p50 | e2e p99 | failed / requests |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in conc:
        k = str(c)
        lines.append(f"| {c} | ceiling (batch) | {_ms(ceil.get(k, {}).get('ttft_s'))} | | | | | | |")
        for name in SERVERS:
            s = srv[name].get(k)
            if not s:
                continue
            lines.append(
                f"| {c} | {name} | {_ms(s['ttft_s_p50'])} | {_ms(s['ttft_s_p99'])} | "
                f"{_ms(s['itl_s_p50'])} | {_ms(s['itl_s_p99'])} | {_ms(s['e2e_s_p50'])} | "
                f"{_ms(s['e2e_s_p99'])} | {s['errors']} / {s['requests']} |")
    joins = [(c, r) for c in conc for r in res["runs"][APPLIANCE].get(str(c), []) if r.get("joins")]
    if joins:
        lines += ["", "The appliance's joins into the running batch (prefill calls for arriving requests), "
                  "requests / joins per run: " + ", ".join(
                      f"c={c} {r['joined']}/{r['joins']}" for c, r in joins) + "."]
    costs = res.get("costs")
    if costs:
        lines += ["", "The appliance's own costs:", "", "| cost | value |", "|---|---:|"]
        for path, st in (costs.get("probes_during_load") or {}).get(APPLIANCE, {}).items():
            lines.append(f"| GET {path} during c={max(conc)} load, p50 / p99 / max (ms), n={st['n']} "
                         f"| {_ms(st['p50_s'])} / {_ms(st['p99_s'])} / {_ms(st['max_s'])} |")
        for path, st in (costs.get("probes_during_load") or {}).get(MLX_SERVER, {}).items():
            lines.append(f"| (mlx_lm.server GET {path} during c={max(conc)} load, p50 / p99 / max, ms) "
                         f"| {_ms(st['p50_s'])} / {_ms(st['p99_s'])} / {_ms(st['max_s'])} |")
        b = costs.get("busy_rejection") or {}
        if b:
            lines.append(f"| busy rejection 429, p50 / p99 / max (ms), n={b['rejected']} "
                         f"| {_ms(b['p50_s'])} / {_ms(b['p99_s'])} / {_ms(b['max_s'])} |")
        m = costs.get("metrics_after_requests") or {}
        if m:
            lines.append(f"| /metrics after {m['requests']} more requests "
                         f"({int(m['requests_total_in_metrics'])} in requests_total), p50 / p99 (ms), "
                         f"{m['bytes']} bytes | {_ms(m['p50_s'])} / {_ms(m['p99_s'])} |")
        for name, rss in (costs.get("rss_after_load_bytes") or {}).items():
            lines.append(f"| RSS after load, {name} (MiB) | {_f(rss / 2**20 if rss else None, '{:.0f}')} |")
        rss2 = costs.get("appliance_rss_after_metrics_requests_bytes")
        if rss2:
            lines.append(f"| RSS after the /metrics requests, appliance (MiB) | {rss2 / 2**20:.0f} |")
        cs = costs.get("cold_start") or {}
        if cs:
            samples = ", ".join(f"{s:.2f}" for s in cs["samples_s"])
            lines.append(f"| cold start to /readyz 200, median (s) [samples: {samples}] "
                         f"| {_f(cs['median_s'], '{:.2f}')} |")
    lines += ["", f"Targets ({res['targets_kind']}):", "", "| target | value | wanted | result |",
              "|---|---:|---:|---|"]
    for t in res["targets"]:
        v = t["value"]
        shown = "-" if v is None else (f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}")
        verdict = "n/a" if t["passed"] is None else ("PASS" if t["passed"] else "FAIL")
        lines.append(f"| {t['name']} | {shown} | {t['target']} | {verdict} |")
    if any(srv[n].get(str(c), {}).get("tokens_counted_by") == "tokenizer"
           for n in SERVERS for c in conc):
        lines += ["", "Note: a server sent no usage in its streams; its tokens were counted by "
                      "tokenizing the returned text."]
    cpu_frac = max((srv[n][str(c)]["client_cpu_fraction_max"] for n in SERVERS for c in conc
                    if str(c) in srv[n]), default=0.0)
    nproc = max((srv[n][str(c)].get("client_processes_max", 1) for n in SERVERS for c in conc
                 if str(c) in srv[n]), default=1)
    lines += ["", f"Load client CPU: at most {cpu_frac:.0%} of one core during a run"
              + (f" (the busiest of up to {nproc} client processes)." if nproc > 1 else ".")]
    if cpu_frac > 0.7:
        lines.append("Warning: the load client was near one full core; at that rate it may limit "
                     "the servers' figures (fewer clients or a faster machine for the client).")
    return "\n".join(lines)


def chart(res: dict[str, Any], path: Path) -> None:
    """Tokens/s per concurrency for the three, and TTFT p99 for the two servers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = res["plan"]["concurrency"]
    xs = list(range(len(conc)))
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    series = [("ceiling (BatchGenerator)", [res["ceiling"]["best"].get(str(c), {}).get("tokens_per_s") for c in conc], "k--")]
    for name, style in ((MLX_SERVER, "o-"), (APPLIANCE, "s-")):
        series.append((name, [res["servers"][name].get(str(c), {}).get("tokens_per_s") for c in conc], style))
    for label, ys, style in series:
        ax1.plot(xs, [y if y is not None else float("nan") for y in ys], style, label=label)
    ax1.set_xticks(xs, [str(c) for c in conc])
    ax1.set_xlabel("concurrent streaming clients")
    ax1.set_ylabel("generated tokens / s")
    ax1.set_title(f"Aggregate throughput (best of {res['plan']['repeat']})")
    ax1.grid(alpha=0.3)
    ax1.legend()
    width = 0.38
    for k, (name, color) in enumerate(((MLX_SERVER, "tab:blue"), (APPLIANCE, "tab:orange"))):
        ys = [res["servers"][name].get(str(c), {}).get("ttft_s_p99") for c in conc]
        ax2.bar([x + (k - 0.5) * width for x in xs], [(y or 0) * 1000 for y in ys], width,
                label=name, color=color)
    ax2.set_xticks(xs, [str(c) for c in conc])
    ax2.set_xlabel("concurrent streaming clients")
    ax2.set_ylabel("ms")
    ax2.set_title("Time to first token, p99")
    ax2.grid(alpha=0.3, axis="y")
    ax2.legend()
    third = width * 2 / 3
    for k, (name, color) in enumerate((("ceiling", "0.4"), (MLX_SERVER, "tab:blue"),
                                       (APPLIANCE, "tab:orange"))):
        src = res["ceiling"]["best"] if name == "ceiling" else res["servers"][name]
        ys = [src.get(str(c), {}).get("cpu_ms_per_token") for c in conc]
        ax3.bar([x + (k - 1) * third for x in xs], [y or 0 for y in ys], third, label=name,
                color=color)
    ax3.set_xticks(xs, [str(c) for c in conc])
    ax3.set_xlabel("concurrent streaming clients")
    ax3.set_ylabel("CPU ms per generated token")
    ax3.set_title("Process CPU per token (lower is better)")
    ax3.grid(alpha=0.3, axis="y")
    ax3.legend()
    fig.suptitle(f"{res['plan']['model_label']}, max_tokens {res['plan']['max_tokens']} — "
                 f"{res['machine']['cpu']} ({res['machine']['cores']} cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The run


def _start_appliance(plan: Plan, procs: Procs, work: Path, name: str, **kw: Any) -> tuple[Proc, str, float]:
    port = free_port()
    home = work / name
    home.mkdir(parents=True, exist_ok=True)
    env = child_env({"XDG_STATE_HOME": str(home / "state"), "PYTHONUNBUFFERED": "1"})
    for key in ("LMX_ADMIN_KEY", "LMX_API_KEYS"):
        env.pop(key, None)
    proc = procs.add(Proc(name, appliance_argv(plan, port, **kw), env, home, home / "server.log"))
    proc.start()
    url = f"http://{HOST}:{port}"
    cold = wait_ready(proc, url + "/readyz", timeout=300)
    return proc, url, cold


def _start_mlx_server(plan: Plan, procs: Procs, work: Path) -> tuple[Proc, str]:
    port = free_port()
    home = work / "mlx_lm_server"
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = procs.add(Proc(MLX_SERVER, mlx_server_argv(plan, port), env, home, home / "server.log"))
    proc.start()
    url = f"http://{HOST}:{port}"
    wait_ready(proc, url + "/health", timeout=300, interval=0.05)
    return proc, url


def _probe_stats(samples: dict[str, list[float]], failures: dict[str, int]) -> dict[str, Any]:
    return {path: {"n": len(v), "failed": failures.get(path, 0), "p50_s": percentile(v, 50),
                   "p99_s": percentile(v, 99), "max_s": max(v) if v else None}
            for path, v in samples.items()}


def run(plan: Plan, procs: Procs, work: Path) -> dict[str, Any]:
    res: dict[str, Any] = {"plan": {k: (str(v) if isinstance(v, Path) else v)
                                    for k, v in asdict(plan).items()},
                           "machine": machine_info(),
                           "command": "python -m benchmarks " + " ".join(sys.argv[1:]),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    say(f"model {plan.model_label} at {plan.model_path}")
    say(f"machine: {res['machine']['cpu']}, {res['machine']['cores']} cores, "
        f"load average {res['machine']['load_average_start']}")

    say("ceiling: BatchGenerator alone, in a subprocess (loading, warming up)")
    ceiling = Ceiling(plan, procs, work)
    res["targets_kind"] = plan.targets if plan.targets != "auto" else (
        "accelerator" if "gpu" in ceiling.device.lower() else "cpu")
    say(f"ceiling ready on {ceiling.device}")
    ceilings = [ceiling]
    from appliance.engine.cuda import MLX_ENV_DEFAULTS

    # As the appliance sets them: where the environment already sets one, that value.
    own = {k: os.environ.get(k, v) for k, v in MLX_ENV_DEFAULTS.items()}
    if "gpu" in ceiling.device.lower() and plan.second_ceiling and any(
            os.environ.get(k) != v for k, v in own.items()):
        # The appliance runs MLX with its own settings (CUDA graphs off): the engine alone gets
        # them too, in a second worker (a second copy of the model in memory), and the better
        # of the two is the ceiling.
        say("ceiling: a second worker under the appliance's MLX settings")
        ceilings.append(Ceiling(plan, procs, work, "the appliance's MLX settings", own))

    say("starting the appliance")
    app, app_url, cold0 = _start_appliance(plan, procs, work, "appliance")
    cold = [cold0]
    say(f"appliance ready in {cold0:.2f} s (pid {app.pid}, {app_url})")
    say("starting mlx_lm.server")
    mlx, mlx_url = _start_mlx_server(plan, procs, work)
    say(f"mlx_lm.server up (pid {mlx.pid}, {mlx_url})")
    urls = {MLX_SERVER: mlx_url, APPLIANCE: app_url}
    procs_by_name = {MLX_SERVER: mlx, APPLIANCE: app}
    counter: Optional[TokenCounter] = None
    with contextlib.suppress(Exception):
        counter = TokenCounter(plan.model_path)

    for name in SERVERS:
        say(f"warm-up: {name}")
        asyncio.run(warm_up(urls[name], plan))

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {n: {str(c): [] for c in plan.concurrency}
                                                       for n in SERVERS}
    probes: dict[str, dict[str, list[float]]] = {n: {} for n in SERVERS}
    probe_fail: dict[str, dict[str, int]] = {n: {} for n in SERVERS}
    probe_paths = {MLX_SERVER: ("/health",), APPLIANCE: ("/healthz", "/metrics")}
    ceil_runs: dict[str, list[dict[str, Any]]] = {str(c): [] for c in plan.concurrency}
    for rep in range(plan.repeat):
        for c in plan.concurrency:
            # The ceiling is an upper bound: each worker gets CEILING_TRIES batches per turn, best
            # kept.
            for w in ceilings:
                for i in range(CEILING_TRIES):
                    cr = w.run(c)
                    cr["rep"] = rep + 1
                    cr["warm"] = i > 0  # the first batch of a turn may meet new shapes
                    cr["mlx_env"] = w.mlx_env
                    cr["load_average_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
                    ceil_runs[str(c)].append(cr)
            tries = CEILING_TRIES * len(ceilings)
            best_now = max(ceil_runs[str(c)][-tries:], key=lambda r: r["tokens_per_s"])
            say(f"rep {rep + 1}/{plan.repeat} c={c} ceiling: {best_now['tokens_per_s']:.1f} tok/s "
                f"(best of {tries}, {best_now['mlx_env']}), first token "
                f"{best_now['ttft_s'] * 1000:.0f} ms")
            for name in SERVERS:
                time.sleep(0.3)  # let the other server settle
                at_max = c == plan.cmax and plan.costs
                joins0 = batch_joins(urls[name]) if name == APPLIANCE else None
                r = asyncio.run(closed_loop(
                    urls[name], c, plan, probe_paths[name] if at_max else (),
                    probes[name], probe_fail[name], counter, procs_by_name[name]))
                joins1 = batch_joins(urls[name]) if joins0 is not None else None
                if joins0 is not None and joins1 is not None:
                    r["joins"], r["joined"] = joins1[0] - joins0[0], joins1[1] - joins0[1]
                r["rep"] = rep + 1
                r["load_average_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
                runs[name][str(c)].append(r)
                err = f", {r['errors']} failed" if r["errors"] else ""
                joins = f", {r['joined']} requests in {r['joins']} joins" if r.get("joins") else ""
                say(f"rep {rep + 1}/{plan.repeat} c={c} {name}: {r['tokens_per_s']:.1f} tok/s, "
                    f"TTFT p50 {_ms(r['ttft_s_p50'])} p99 {_ms(r['ttft_s_p99'])} ms, ITL p50 "
                    f"{_ms(r['itl_s_p50'])} ms, {r['ok']}/{r['requests']} ok{err}{joins}")
    for w in ceilings:
        w.close(procs)
    res["ceiling"] = {"device": ceiling.device, "runs": ceil_runs,
                      "mlx_envs": [w.mlx_env for w in ceilings],
                      "best": {c: {"tokens_per_s": max(r["tokens_per_s"] for r in rs),
                                   "mlx_env": max(rs, key=lambda r: r["tokens_per_s"])["mlx_env"],
                                   "tokens_per_s_median": _ceiling_median(rs),
                                   "ttft_s": min(r["ttft_s"] for r in rs),
                                   "cpu_ms_per_token": min(r["cpu_ms_per_token"] for r in rs)}
                               for c, rs in ceil_runs.items()}}
    res["runs"] = runs
    res["servers"] = {n: {c: best_of(rs) for c, rs in runs[n].items()} for n in SERVERS}
    ratios: dict[str, dict[str, Optional[float]]] = {}
    for c in plan.concurrency:
        k = str(c)
        a, m = res["servers"][APPLIANCE][k], res["servers"][MLX_SERVER][k]
        ceil = res["ceiling"]["best"][k]["tokens_per_s"]
        ceil_median = res["ceiling"]["best"][k]["tokens_per_s_median"]
        ratios[k] = {
            "vs_mlx": a["tokens_per_s"] / m["tokens_per_s"] if m["tokens_per_s"] else None,
            "vs_ceiling": a["tokens_per_s"] / ceil if ceil else None,
            "vs_ceiling_median": a["tokens_per_s"] / ceil_median if ceil_median else None,
            "ttft_p99_vs_mlx": (a["ttft_s_p99"] / m["ttft_s_p99"]
                                if a["ttft_s_p99"] is not None and m["ttft_s_p99"] else None),
            "cpu_per_token_vs_mlx": (a["cpu_ms_per_token"] / m["cpu_ms_per_token"]
                                     if a["cpu_ms_per_token"] and m["cpu_ms_per_token"] else None),
        }
    res["ratios"] = ratios

    if plan.costs:
        costs: dict[str, Any] = {}
        costs["probes_during_load"] = {n: _probe_stats(probes[n], probe_fail[n]) for n in SERVERS}
        costs["rss_after_load_bytes"] = {APPLIANCE: app.rss_bytes(), MLX_SERVER: mlx.rss_bytes()}
        say("RSS after load: " + ", ".join(
            f"{n} {v / 2**20:.0f} MiB" for n, v in costs["rss_after_load_bytes"].items() if v))
        procs.stop(mlx)  # not needed any more; frees a core for the cost measurements
        say(f"/metrics: sending {plan.metrics_requests} one-token requests to the appliance")
        costs["metrics_after_requests"] = asyncio.run(metrics_after_requests(
            app_url, plan.metrics_requests, "/metrics", "lmx", plan.timeout_s))
        m = costs["metrics_after_requests"]
        say(f"/metrics scrape: p50 {_ms(m['p50_s'])} ms, p99 {_ms(m['p99_s'])} ms, {m['bytes']} bytes")
        costs["appliance_rss_after_metrics_requests_bytes"] = app.rss_bytes()
        procs.stop(app)

        say("busy rejection: an appliance with max_running=1, max_queued=0")
        long_tokens = 1900
        busy, busy_url, cold1 = _start_appliance(plan, procs, work, "appliance-busy", max_running=1,
                                                 max_queued=0, max_tokens=long_tokens)
        cold.append(cold1)
        costs["busy_rejection"] = asyncio.run(busy_rejection(busy_url, plan.busy_requests,
                                                             long_tokens, plan.timeout_s))
        b = costs["busy_rejection"]
        say(f"busy rejection: {b['rejected']} x 429, p99 {_ms(b['p99_s'])} ms, statuses {b['statuses']}")
        procs.stop(busy)
        while len(cold) < plan.cold_starts:
            p, _, t = _start_appliance(plan, procs, work, f"appliance-cold{len(cold)}")
            cold.append(t)
            procs.stop(p)
        say("cold starts to /readyz 200: " + ", ".join(f"{t:.2f} s" for t in cold))
        # Every start counts: the main appliance, the busy one, then extra starts if needed.
        costs["cold_start"] = {"samples_s": cold, "median_s": percentile(cold, 50)}
        res["costs"] = costs
    else:
        res["costs"] = None
    res["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    res["targets"] = [asdict(t) for t in evaluate(res, res["targets_kind"])]
    res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return res


# ---------------------------------------------------------------------------------------------
# Command line


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError("concurrency values must be >= 1")
    return sorted(set(vals))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=("demo", "llama-1b"), default="demo",
                   help="demo model shape, built on first use (default demo)")
    p.add_argument("--model-path", type=Path, help="any local model folder instead of the demo model")
    p.add_argument("--concurrency", type=_ints, default=[1, 4, 8], help="e.g. 1,4,8 (default)")
    p.add_argument("--max-tokens", type=int, help="tokens per request (default 64; 128 for llama-1b)")
    p.add_argument("--requests-per-client", type=int, default=8,
                   help="requests each closed-loop client sends per run (default 8)")
    p.add_argument("--min-requests", type=int, default=8,
                   help="requests a run sends at least: at low concurrency each client sends more "
                        "than --requests-per-client (default 8; 0 turns it off)")
    p.add_argument("--repeat", type=int, default=3, help="repetitions; best of (default 3)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for JSON and PNG")
    p.add_argument("--skip-costs", action="store_true", help="only throughput and latency")
    p.add_argument("--no-chart", action="store_true", help="no PNG")
    p.add_argument("--quick", action="store_true",
                   help="a short sanity run: repeat 1, 2 requests per client, small cost counts")
    p.add_argument("--metrics-requests", type=int, default=10_000,
                   help="requests before timing /metrics (default 10000)")
    p.add_argument("--busy-requests", type=int, default=200, help="429 requests timed (default 200)")
    p.add_argument("--cold-starts", type=int, default=3, help="appliance starts timed (default 3)")
    p.add_argument("--targets", choices=("auto", "cpu", "accelerator"), default="auto",
                   help="which targets: issue 7 (cpu) or issue 9 (accelerator); auto by MLX device")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, s")
    p.add_argument("--probe-interval", type=float, default=0.1,
                   help="seconds between /healthz + /metrics probes during the top load")
    p.add_argument("--appliance-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for the appliance (repeatable)")
    p.add_argument("--mlx-server-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for mlx_lm.server (repeatable, e.g. --mlx-server-arg=--prefill-step-size=512)")
    p.add_argument("--clients-per-process", type=int, default=16,
                   help="more clients than this are spread over client processes (default 16)")
    p.add_argument("--one-ceiling", action="store_true",
                   help="on a GPU, no second ceiling worker under the appliance's MLX settings "
                        "(it holds a second copy of the model)")
    p.add_argument("--ceiling-worker", action="store_true", help=argparse.SUPPRESS)
    return p


def plan_from(args: argparse.Namespace) -> Plan:
    if args.model_path is not None:
        path = args.model_path.expanduser().resolve()
        if not (path / "config.json").is_file():
            raise SystemExit(f"--model-path {path}: no config.json there")
        label = path.name
    else:
        from appliance.engine.demo import ensure_demo_model

        say(f"demo model ({args.shape}): building it if missing")
        path = ensure_demo_model(shape=args.shape, progress=say)
        label = f"demo model ({args.shape})"
    max_tokens = args.max_tokens or (128 if args.shape == "llama-1b" and args.model_path is None else 64)
    rpc, repeat, min_requests = args.requests_per_client, args.repeat, args.min_requests
    metrics_n, busy_n, colds = args.metrics_requests, args.busy_requests, args.cold_starts
    if args.quick:
        rpc, repeat, min_requests = min(rpc, 2), 1, min(min_requests, 2)
        metrics_n, busy_n, colds = min(metrics_n, 500), min(busy_n, 50), 1
    for name, v in (("--max-tokens", max_tokens), ("--requests-per-client", rpc),
                    ("--repeat", repeat), ("--metrics-requests", metrics_n),
                    ("--busy-requests", busy_n), ("--cold-starts", colds),
                    ("--clients-per-process", args.clients_per_process)):
        if v < 1:
            raise SystemExit(f"{name} must be >= 1")
    if min_requests < 0:
        raise SystemExit("--min-requests must be >= 0")
    return Plan(
        model_path=path, model_label=label, concurrency=args.concurrency, max_tokens=max_tokens,
        requests_per_client=rpc, repeat=repeat, out=args.out, costs=not args.skip_costs,
        chart=not args.no_chart, metrics_requests=metrics_n, busy_requests=busy_n,
        cold_starts=colds, targets=args.targets, timeout_s=args.timeout,
        probe_interval_s=args.probe_interval, appliance_args=list(args.appliance_arg),
        mlx_server_args=list(args.mlx_server_arg), clients_per_process=args.clients_per_process,
        second_ceiling=not args.one_ceiling, min_requests=min_requests,
    )


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        # As SIGINT: asyncio.run then cancels its task cleanly instead of dying mid-callback.
        os.kill(os.getpid(), signal.SIGINT)

    old = signal.signal(signal.SIGTERM, handler)
    # Started in the background by a non-interactive shell, the bench inherits SIGINT ignored:
    # the SIGINT above would then do nothing (and asyncio.run would not handle it).
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, old_int)


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.ceiling_worker:
        ceiling_worker(str(args.model_path), args.concurrency, args.max_tokens)
        return 0
    plan = plan_from(args)
    plan.out.mkdir(parents=True, exist_ok=True)
    procs = Procs()
    with _sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="appliance-bench-") as tmp:
        try:
            res = run(plan, procs, Path(tmp))
        except KeyboardInterrupt:
            say("interrupted; stopping every process the bench started")
            return 130
        finally:
            try:
                procs.stop_all()
            finally:
                CLIENT_POOL.close()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = tables(res)
    res["table_markdown"] = text
    json_path = plan.out / f"bench-{stamp}.json"
    res["chart"] = None
    if plan.chart:
        png = plan.out / f"bench-{stamp}.png"
        try:
            chart(res, png)
            res["chart"] = str(png)
        except Exception as exc:  # no matplotlib, no fonts: the figures matter more than the PNG
            say(f"no chart: {type(exc).__name__}: {exc}")
    json_path.write_text(json.dumps(res, indent=2, default=str))
    print(text)
    print(f"\nJSON: {json_path}")
    if res["chart"]:
        print(f"chart: {res['chart']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
