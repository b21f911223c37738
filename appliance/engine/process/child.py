"""The engine process: a ModelWorker whose results go down the socket to the server."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import sys
import threading
from concurrent.futures import Future
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

from ... import exits
from ...errors import EngineFailure, ModelLoadError
from .. import governor
from ..commands import Call, Cancel, Fault, Stop, Submit
from ..loading import load_model, weight_plan
from ..types import Generation
from ..worker import ModelWorker
from .client import STATS_S

log = logging.getLogger("appliance.engine")


class _EngineWorker(ModelWorker):
    """ModelWorker whose results go down the socket instead of to an event loop."""

    def __init__(self, conn: Connection, init: dict[str, Any]) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._stats_at = 0.0
        trust = bool(init["trust_remote_code"])
        path = init["path"]

        def loader() -> tuple[Any, Any]:
            # The server resolved the folder and checked memory; the weights' plan (float32 on
            # the CPU, dense or not) is made again here, on the same BLAS (LD_PRELOAD is
            # inherited) and the same rule.
            folder = Path(path)
            plan = weight_plan(folder, init.get("cpu_weights", "auto"))[0]
            return load_model(
                init["name"], folder, builtin_dir=None, trust_remote_code=trust, plan=plan
            )

        super().__init__(
            init["name"],
            path,
            loader=loader,
            loop=cast(asyncio.AbstractEventLoop, None),
            **init["batching"],
            prompt_cache_bytes=init["prompt_cache_bytes"],
            prompt_cache_min_tokens=init["prompt_cache_min_tokens"],
            prompt_cache_dir=init.get("prompt_cache_dir"),
            prompt_cache_disk_bytes=init.get("prompt_cache_disk_bytes", 0),
            prompt_cache_preload_s=init.get("prompt_cache_preload_s", 0.0),
            unfused_attention_elements=init["unfused_attention_elements"],
            decode_kernel=init["decode_kernel"],
        )

    def send(self, msg: tuple[Any, ...]) -> None:
        with self._lock:
            self._conn.send(msg)

    def _out_step(self, events: list[tuple[Any, ...]], now: float) -> None:
        wire = []
        for g, token, finish, lp, top in events:
            wire.append((g.rid, token, finish, lp, top, g.cached_tokens))
        self.send(("step", wire))
        if now - self._stats_at >= STATS_S:
            self._stats_at = now
            self.report()

    def _out_fail(self, victims: list[Generation], err: BaseException) -> None:
        self.send(("fail", [g.rid for g in victims], err))

    def _out_death(self, exc: BaseException) -> None:
        self.send(("died", f"{type(exc).__name__}: {exc}"))
        os._exit(exits.ENGINE_PROCESS_DIED)  # the server fails what remains and reloads the model

    def report(self) -> None:
        import mlx.core as mx

        mem = (int(mx.get_active_memory()), int(mx.get_peak_memory()), int(mx.get_cache_memory()))
        cache = self.prompt_cache.nbytes if self.prompt_cache is not None else 0
        self.send(("stats", dict(self.stats), cache, mem))


class _LogToServer(logging.Handler):
    def __init__(self, worker: _EngineWorker) -> None:
        super().__init__()
        self.worker = worker

    def emit(self, record: logging.LogRecord) -> None:
        try:
            exc_text = (
                logging.Formatter().formatException(record.exc_info) if record.exc_info else None
            )
            self.worker.send(("log", record.levelno, record.name, record.getMessage(), exc_text))
        except Exception:  # the socket is gone: nobody to tell
            pass


def _result(worker: _EngineWorker, cid: int, fut: Future[Any]) -> None:
    exc = fut.exception()
    try:
        worker.send(("result", cid, exc is None, fut.result() if exc is None else exc))
    except Exception as err:  # an unpicklable result or error: say so instead
        worker.send(("result", cid, False, EngineFailure(f"the engine could not return it: {err}")))


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from ..mlx_ext import cuda, transformers_imports

    transformers_imports.install()
    cuda.mlx_env_defaults()
    conn = Connection(int(sys.argv[1]))
    init = conn.recv()
    worker = governor.engine_worker = _EngineWorker(conn, init)
    root = logging.getLogger()
    root.handlers[:] = [_LogToServer(worker)]
    root.setLevel(init["log_level"])
    if init["memory_limit"] is not None:
        import mlx.core as mx

        mx.set_memory_limit(init["memory_limit"])
    worker._thread.start()
    try:
        worker._loaded.result()
    except BaseException as exc:
        worker.send(
            ("load_failed", exc if isinstance(exc, ModelLoadError) else ModelLoadError(str(exc)))
        )
        os._exit(1)
    worker.report()
    worker.send(("loaded", {"vocab_size": worker.vocab_size, "pid": os.getpid()}))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the server is gone
            os._exit(0)
        if isinstance(msg, Submit):
            worker.submit(Generation(worker.name, msg.prompt, msg.params), rid=msg.rid)
        elif isinstance(msg, Cancel):
            gen = worker._gens.get(msg.rid)
            if gen is not None:
                gen.cancel()  # leaves the batch at the next step; the server forgot it already
        elif isinstance(msg, Call):
            fut = worker.call(msg.fn)
            fut.add_done_callback(functools.partial(_result, worker, msg.cid))
        elif isinstance(msg, Fault):
            worker.inject_fault(RuntimeError(msg.message))
        elif isinstance(msg, Stop):
            worker.stop()
            worker.join(30)
            conn.close()
            # os._exit: MLX's CUDA backend can abort in its destructors at interpreter exit.
            os._exit(0)
