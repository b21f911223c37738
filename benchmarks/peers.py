"""The three measured side by side: the appliance, mlx_lm.server, and the ceiling (mlx-lm's
BatchGenerator alone, in a worker process of its own, driven over stdin)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.common import HOST, child_env, free_port
from benchmarks.procs import Proc, Procs, preexec, wait_ready
from benchmarks.scenarios import MLX_SERVER, Plan, prompt_text


def _hydra_value(value: str) -> str:
    if all(ch.isalnum() or ch in "_./-" for ch in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def appliance_argv(
    plan: Plan,
    port: int,
    *,
    max_running: Optional[int] = None,
    max_queued: Optional[int] = None,
    max_tokens: Optional[int] = None,
) -> list[str]:
    """`python -m appliance` with its catalog on the bench model and limits for the load."""
    c = plan.cmax
    cap = max(512, plan.max_tokens, max_tokens or 0)
    return [
        sys.executable,
        "-m",
        "appliance",
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
    """`python -m mlx_lm.server` on the bench model, its decode batch as wide as the top load."""
    return [
        sys.executable,
        "-m",
        "mlx_lm.server",
        "--model",
        str(plan.model_path),
        "--host",
        HOST,
        "--port",
        str(port),
        "--decode-concurrency",
        str(max(32, plan.cmax)),
        "--prompt-concurrency",
        "8",
        "--max-tokens",
        str(plan.max_tokens),
        "--log-level",
        "WARNING",
        *plan.mlx_server_args,
    ]


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
        ids = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
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
        return {
            "concurrency": c,
            "tokens": tokens,
            "wall_s": wall,
            "tokens_per_s": tokens / wall,
            "ttft_s": first or wall,
            "cpu_s": cpu,
            "cpu_ms_per_token": cpu * 1000 / max(tokens, 1),
        }

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

    def __init__(
        self,
        plan: Plan,
        procs: Procs,
        work: Path,
        mlx_env: str = "mlx defaults",
        env: Optional[dict[str, str]] = None,
    ) -> None:
        argv = [
            sys.executable,
            "-m",
            "benchmarks",
            "--ceiling-worker",
            "--model-path",
            str(plan.model_path),
            "--concurrency",
            ",".join(map(str, plan.concurrency)),
            "--max-tokens",
            str(plan.max_tokens),
        ]
        self.mlx_env = mlx_env
        self.log_path = work / f"ceiling-{len(list(work.glob('ceiling*.log')))}.log"
        self.proc = Proc("ceiling", argv, child_env(env), work, self.log_path)
        self.timeout = plan.timeout_s
        with open(self.log_path, "wb") as err:
            self.proc.started = time.perf_counter()
            self.proc.popen = subprocess.Popen(
                argv,
                cwd=work,
                env=self.proc.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
                preexec_fn=preexec(),
            )
        procs.add(self.proc)
        self._buf = b""
        ready = self._read(600)
        self.device = str(ready.get("device", "?"))

    def _read(self, timeout: float) -> dict[str, Any]:
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


def start_appliance(
    plan: Plan, procs: Procs, work: Path, name: str, **kw: Any
) -> tuple[Proc, str, float]:
    """An appliance on a free port, its home under `work`; returns it, its URL and the seconds
    from its start to /readyz 200 (a cold start)."""
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


def start_mlx_server(plan: Plan, procs: Procs, work: Path) -> tuple[Proc, str]:
    """mlx_lm.server on a free port, up once /health answers; returns it and its URL."""
    port = free_port()
    home = work / "mlx_lm_server"
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = procs.add(Proc(MLX_SERVER, mlx_server_argv(plan, port), env, home, home / "server.log"))
    proc.start()
    url = f"http://{HOST}:{port}"
    wait_ready(proc, url + "/health", timeout=300, interval=0.05)
    return proc, url
