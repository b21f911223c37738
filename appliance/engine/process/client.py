"""The server's side of a model in an engine process: the ModelWorker interface over a socket."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Optional, Union, cast

from ...errors import EngineFailure, ModelLoadError
from .. import memory
from ..commands import Call, Cancel, Fault, Stop, Submit
from ..types import Generation
from ..worker import ModelWorker, WorkerThread, _deliver, _fail_all, empty_stats

log = logging.getLogger("appliance.engine")

STATS_S = 0.25  # the engine reports its counters and MLX memory at most this often


class _CacheSize:
    """What the server shows of the engine's prompt cache: its size as last reported."""

    nbytes = 0


class ProcessWorker(WorkerThread):
    """The server's side of a model in an engine process; the interface of ModelWorker."""

    def __init__(
        self,
        name: str,
        path: str,
        *,
        prepare: Callable[[], Path],
        loop: asyncio.AbstractEventLoop,
        batching: dict[str, Any],
        prompt_cache_bytes: int,
        prompt_cache_min_tokens: Optional[int],
        unfused_attention_elements: int,
        decode_kernel: bool,
        trust_remote_code: bool,
        memory_limit: Optional[int],
        cpu_weights: str = "auto",
        on_death: Optional[Callable[[str, BaseException], None]] = None,
        prompt_cache_dir: Optional[str] = None,
        prompt_cache_disk_bytes: int = 0,
        prompt_cache_preload_s: float = 0.0,
    ) -> None:
        self.name = name
        self.path = path
        self._prepare = prepare  # on the manager thread: resolve the folder, check memory
        self._loop = loop
        self._init = {
            "name": name,
            "batching": batching,
            "prompt_cache_bytes": prompt_cache_bytes,
            "prompt_cache_min_tokens": prompt_cache_min_tokens,
            "prompt_cache_dir": prompt_cache_dir,
            "prompt_cache_disk_bytes": prompt_cache_disk_bytes,
            "prompt_cache_preload_s": prompt_cache_preload_s,
            "unfused_attention_elements": unfused_attention_elements,
            "decode_kernel": decode_kernel,
            "trust_remote_code": trust_remote_code,
            "cpu_weights": cpu_weights,
            "memory_limit": memory_limit,
            "log_level": logging.getLogger().getEffectiveLevel(),
        }
        self._on_death = on_death
        self._rids = itertools.count(1)
        self._gens: dict[int, Generation] = {}  # in the engine's batch or on the way there
        self._calls: dict[int, Future[Any]] = {}
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"gen-{name}", daemon=True)
        self._sender = threading.Thread(target=self._send_all, name=f"send-{name}", daemon=True)
        self._loaded: Future[None] = Future()
        self._stopping = False
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self._conn: Optional[Connection] = None
        self.model: Any = None  # lives in the engine process
        self.tokenizer: Any = None
        self.prompt_cache = _CacheSize()
        self.stats = empty_stats()
        self.dead: Optional[BaseException] = None
        self.vocab_size = 0

    # -- the ModelWorker interface (called from the event loop)
    @property
    def active_count(self) -> int:
        return len(self._gens)

    def submit(self, gen: Generation) -> None:
        if not self.alive:
            gen.fail(EngineFailure(f"model {self.name!r} is not running"))
            return
        gen.rid = rid = next(self._rids)
        self._gens[rid] = gen

        def cancel() -> None:
            if self._gens.pop(rid, None) is not None:
                self._outbox.put(Cancel(rid))

        gen._cancel = cancel
        self._outbox.put(Submit(rid, gen.prompt_tokens, gen.params))
        if self.dead is not None and self._gens.pop(rid, None) is not None:  # died meanwhile
            gen.fail(EngineFailure(f"model {self.name!r} is not running"))

    def call(self, fn: Callable[[Any, Any], Any]) -> Future[Any]:
        """Run fn(model, tokenizer) in the engine process between steps; fn is pickled, so a
        module-level function or a functools.partial of one."""
        fut: Future[Any] = Future()
        if not self.alive:
            fut.set_exception(EngineFailure(f"model {self.name!r} is not running"))
            return fut
        cid = next(self._rids)
        self._calls[cid] = fut
        self._outbox.put(Call(cid, fn))
        return fut

    def inject_fault(self, exc: BaseException) -> None:
        """Testing only (APPLIANCE_FAULT_INJECTION=1): the engine's generation thread raises."""
        self._outbox.put(Fault(str(exc)))

    def stop(self) -> None:
        self._stopping = True
        self._outbox.put(Stop())

    def join(self, timeout: Optional[float] = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()  # did not stop in time
            proc.wait(5)

    # -- the manager thread: start the engine, then read what it sends
    def _run(self) -> None:
        try:
            conn = self._spawn()
            info = self._await_load(conn)
        except BaseException as exc:  # forwarded to whoever awaits the load
            self.dead = exc
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()  # still loading the weights, which nobody will use
            self._reap()
            if self._conn is not None:
                self._conn.close()
            self._settle_load(exc)
            return
        self.vocab_size = int(info.get("vocab_size") or 0)
        self._sender.start()
        self._settle_load(None)
        reason = self._read(conn)
        self._outbox.put(None)  # the sender ends
        code = self._reap()
        self._sender.join(5)
        conn.close()
        memory.forget_engine(self.name)
        if self._stopping and reason is None:
            err: BaseException = EngineFailure(f"model {self.name!r} was unloaded")
        else:
            err = EngineFailure(
                f"the engine process of model {self.name!r} failed: "
                f"{reason or f'it exited with code {code}'}"
            )
            self.dead = err
            log.error("engine process of %s ended: %s", self.name, err)
        victims = list(self._gens.values())
        self._gens.clear()
        if victims:
            self._loop.call_soon_threadsafe(_fail_all, victims, err)
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(err)
        self._calls.clear()
        if self.dead is not None and self._on_death is not None:
            self._loop.call_soon_threadsafe(self._on_death, self.name, err)

    def _spawn(self) -> Connection:
        path = self._prepare()
        mine, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parents[3])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance.engine.process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            theirs.close()
        conn = self._conn = Connection(mine.detach())
        conn.send({**self._init, "path": str(path)})
        log.info("model %s: engine process %d started", self.name, self.proc.pid)
        # The server's own tokenizer, loaded while the engine loads the weights.
        from mlx_lm.utils import load_config, load_tokenizer

        try:
            config = load_config(path)
            self.tokenizer = load_tokenizer(
                path,
                {"trust_remote_code": self._init["trust_remote_code"]},
                eos_token_ids=config.get("eos_token_id"),
            )
        except Exception as exc:
            raise ModelLoadError(f"model {self.name!r} could not be loaded: {exc}") from None
        try:  # grammars are compiled here, against the server's copy of the tokenizer
            from ..constraints import TokenizerBridge

            TokenizerBridge.for_tokenizer(self.tokenizer)
        except Exception as exc:  # constrained requests to this model will say why
            log.warning("model %s: constrained output is not available: %s", self.name, exc)
        return conn

    def _await_load(self, conn: Connection) -> dict[str, Any]:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                code = self.proc.wait(10) if self.proc is not None else None
                raise ModelLoadError(
                    f"the engine process of model {self.name!r} exited while loading (code {code})"
                ) from None
            if msg[0] == "loaded":
                return cast(dict[str, Any], msg[1])
            if msg[0] == "load_failed":
                raise msg[1]
            self._handle(msg)

    def _read(self, conn: Connection) -> Optional[str]:
        """Dispatch messages until the socket closes; the reason the engine gave, if it died."""
        reason: Optional[str] = None
        gens = self._gens
        loop = self._loop
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return reason
            if msg[0] == "step":
                now = time.perf_counter()
                events = []
                for rid, token, finish, lp, top, cached in msg[1]:
                    g = gens.get(rid)
                    if g is None:  # cancelled meanwhile
                        continue
                    g.cached_tokens = cached
                    if finish is not None:
                        del gens[rid]
                    events.append((g, token, finish, lp, top))
                if events:
                    loop.call_soon_threadsafe(_deliver, events, now)
            elif msg[0] == "died":
                reason = msg[1]
            else:
                self._handle(msg)

    def _handle(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "fail":
            victims = [
                g for g in map(self._gens.pop, msg[1], itertools.repeat(None)) if g is not None
            ]
            if victims:
                self._loop.call_soon_threadsafe(_fail_all, victims, msg[2])
        elif kind == "result":
            fut = self._calls.pop(msg[1], None)
            if fut is not None and fut.set_running_or_notify_cancel():
                if msg[2]:
                    fut.set_result(msg[3])
                else:
                    fut.set_exception(msg[3])
        elif kind == "stats":
            self.stats = msg[1]
            self.prompt_cache.nbytes = msg[2]
            memory.report_engine(self.name, *msg[3])
        elif kind == "log":
            _, level, logger, message, exc_text = msg
            extra = {"engine_pid": self.proc.pid if self.proc is not None else None}
            if exc_text:
                extra["exception"] = exc_text
            logging.getLogger(logger).log(level, message, extra=extra)

    def _send_all(self) -> None:
        conn = self._conn
        assert conn is not None
        while True:
            item = self._outbox.get()
            if item is None:
                return
            try:
                conn.send(item)
            except (OSError, EOFError):
                pass  # the engine is gone; the reader ends the requests
            except Exception as exc:  # not picklable: only a call's fn can be
                if isinstance(item, Call):
                    fut = self._calls.pop(item.cid, None)
                    if fut is not None and fut.set_running_or_notify_cancel():
                        fut.set_exception(exc)
                else:
                    log.exception("could not send %s to the engine process of %s", item, self.name)

    def _reap(self) -> Optional[int]:
        proc = self.proc
        if proc is None:
            return None
        try:
            return proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(5)


AnyWorker = Union[ModelWorker, ProcessWorker]  # what the registry holds for a loaded model
