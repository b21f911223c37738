"""The model registry: the catalog from config, loading and unloading, memory estimates."""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Optional

from ..config import ModelsConfig, ModelSpec
from ..errors import EngineFailure, InsufficientMemory, ModelLoadError, ModelNotFound
from . import distributed
from .chat import formats_of
from .cpu import WeightPlan
from .governor import weights_bytes
from .loading import as_folder, load_model, set_chat_template, weight_plan
from .memory import free_bytes, mlx_active, prompt_cache_budget
from .paths import estimate_bytes, kv_bytes_per_token, kv_shape, resolve_path
from .process import AnyWorker, ProcessWorker
from .types import ModelInfo
from .worker import ModelWorker, batching

log = logging.getLogger("appliance.engine")

Listener = Callable[[str, str, dict[str, Any]], None]  # (event, model, details)


def resolve_alias(aliases: dict[str, str], name: str) -> Optional[str]:
    """The catalog name `name` is an alias of: an exact alias first, then the first glob
    pattern (`*`, `?`, `[...]`) that matches, in the order written; None when none does."""
    if name in aliases:
        return aliases[name]
    for pattern, target in aliases.items():
        if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(name, pattern):
            return target
    return None


class ModelRegistry:
    """The catalog and the loaded models, each on its own generation thread."""

    def __init__(self, cfg: ModelsConfig) -> None:
        self.cfg = cfg
        self._workers: dict[str, AnyWorker] = {}
        # The profile's catalog, then the models an admin added at run time (by path).
        self._catalog: dict[str, ModelSpec] = dict(cfg.catalog)
        self._sources: dict[str, str] = {name: "catalog" for name in cfg.catalog}
        self._info: dict[str, ModelInfo] = {
            name: ModelInfo(name=name, path=spec.path, state="unloaded")
            for name, spec in cfg.catalog.items()
        }
        self._locks: dict[str, asyncio.Lock] = {}
        self._listeners: list[Listener] = []
        self.on_death: Optional[Callable[[str, BaseException], None]] = None
        self.memory_limit: Optional[int] = None  # limits.mlx_memory_limit_bytes, set by the engine
        # Requests the HTTP front holds on their way to an engine (arrivals.py), set by the engine
        self.arriving: Callable[[], int] = lambda: 0
        # Evicts the loaded models' prompt caches for a load (model, bytes short) -> bytes
        # evicted: the memory governor's, set by the engine
        self.make_room: Optional[Callable[[str, int], Coroutine[Any, Any, int]]] = None

    # -- observers (metrics, state file)
    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _emit(self, event: str, name: str, **details: Any) -> None:
        for listener in self._listeners:
            try:
                listener(event, name, details)
            except Exception:  # an observer must not break loading
                log.exception("model listener failed on %s %s", event, name)

    # -- queries
    def spec(self, name: str) -> ModelSpec:
        try:
            return self._catalog[name]
        except KeyError:
            raise ModelNotFound(
                f"model {name!r} is not in the catalog; see GET /v1/models", param="model"
            ) from None

    @property
    def names(self) -> list[str]:
        return list(self._catalog)

    def loaded(self) -> list[str]:
        return [n for n, w in self._workers.items() if w.alive]

    def worker(self, name: str) -> Optional[AnyWorker]:
        w = self._workers.get(name)
        return w if w is not None and w.alive else None

    def info(self, name: str) -> ModelInfo:
        self.spec(name)
        return self._info[name]

    def infos(self) -> list[ModelInfo]:
        return [self._info[n] for n in self._catalog]

    def source(self, name: str) -> str:
        """ "catalog" (the profile's) or "admin" (added at run time)."""
        self.spec(name)
        return self._sources[name]

    def added(self) -> dict[str, ModelSpec]:
        """The models an admin added at run time, by name."""
        return {n: s for n, s in self._catalog.items() if self._sources[n] == "admin"}

    def add(self, name: str, spec: ModelSpec) -> None:
        """Make a model loadable under `name` at run time (an admin load by path). Replaces an
        earlier runtime entry of that name when it is not loaded; a catalog name is refused."""
        from ..errors import InvalidRequest

        if self._sources.get(name) == "catalog":
            raise InvalidRequest(
                f"{name!r} is a catalog model of the profile; choose another alias", param="alias"
            )
        if name in self._catalog and self.worker(name) is not None:
            if self._catalog[name] != spec:
                raise InvalidRequest(
                    f"model {name!r} is loaded with other settings; unload it first",
                    param="alias",
                )
            return
        self._catalog[name] = spec
        self._sources[name] = "admin"
        self._info[name] = ModelInfo(name=name, path=spec.path, state="unloaded")

    def remove(self, name: str) -> None:
        """Forget a runtime model that is not loaded (a failed load leaves nothing behind)."""
        if self._sources.get(name) == "admin" and self.worker(name) is None:
            del self._catalog[name], self._sources[name], self._info[name]
            self._emit("removed", name)

    def touch(self, name: str) -> None:
        info = self._info[name]
        info.last_used = time.time()
        info.requests_served += 1

    def threads_alive(self) -> int:
        return sum(1 for w in self._workers.values() if w.alive)

    # -- load / unload
    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def get_or_load(self, name: str) -> AnyWorker:
        """The running worker of a catalog model, loading it on first use."""
        w = self.worker(name)
        if w is not None:
            return w
        await self.load(name)
        w = self.worker(name)
        if w is None:
            raise EngineFailure(f"model {name!r} stopped right after loading")
        return w

    async def load(self, name: str) -> ModelInfo:
        spec = self.spec(name)
        async with self._lock(name):
            if self.worker(name) is not None:
                return self._info[name]
            info = self._info[name]
            info.state, info.error = "loading", None
            t0 = time.perf_counter()
            loop = asyncio.get_running_loop()
            grp = distributed.group() if distributed.world()[1] > 1 else None
            if grp is not None and name != self.cfg.default:
                info.state = "failed"
                raise ModelLoadError(
                    f"a distributed group serves only models.default ({self.cfg.default!r})",
                    param="model",
                )

            plans: list[Optional[WeightPlan]] = [None]

            def prepare() -> Path:
                # On the model's own thread: resolve the folder, check the memory it needs.
                path = resolve_path(
                    spec, self.cfg.builtin_dir, allow_downloads=self.cfg.allow_downloads
                )
                plan, weights = weight_plan(path, spec.cpu_weights)
                plans[0] = plan
                info.extra["weights"] = plan.summary()
                need = estimate_bytes(path, spec, weights)
                info.memory_estimate_bytes = need
                shape = kv_shape(path)
                # What the governor counts per token: quantized where the model sets kv_bits.
                kv_bits = getattr(spec, "kv_bits", None)
                info.extra["kv_bytes_per_token"] = shape.bytes_per_token(kv_bits) if shape else 0
                info.extra["weights_bytes"] = max(
                    0, need - kv_bytes_per_token(path) * spec.context_length
                )
                free = self._free_for_load()
                if need > free and self.make_room is not None and not _on(loop):
                    # The other models' prompt caches go before a load is refused, as they go
                    # before a request is (the governor's eviction, on the event loop)
                    evict = asyncio.run_coroutine_threadsafe(
                        self.make_room(name, need - free), loop
                    )
                    if evict.result(timeout=60) > 0:
                        free = self._free_for_load()
                if need > free:
                    raise InsufficientMemory(
                        f"model {name!r} needs about {need / 2**30:.1f} GiB "
                        f"(weights and one full KV cache) but {free / 2**30:.1f} GiB is free",
                        retry_after=30,
                    )
                log.info("loading model %s from %s", name, path)
                return path

            def loader() -> tuple[Any, Any]:
                path = prepare()
                if grp is not None:
                    return distributed.load_sharded(str(as_folder(path, self.cfg.builtin_dir)))
                return load_model(
                    name,
                    path,
                    builtin_dir=self.cfg.builtin_dir,
                    trust_remote_code=spec.trust_remote_code,
                    plan=plans[0],
                )

            worker: AnyWorker
            if spec.engine_process and grp is None:
                worker = ProcessWorker(
                    name,
                    spec.path,
                    prepare=lambda: as_folder(prepare(), self.cfg.builtin_dir),
                    loop=loop,
                    batching=batching(spec),
                    prompt_cache_bytes=prompt_cache_budget(self.cfg.prompt_cache_bytes),
                    prompt_cache_min_tokens=self.cfg.prompt_cache_min_tokens,
                    prompt_cache_dir=self.cfg.prompt_cache_dir,
                    prompt_cache_disk_bytes=self.cfg.prompt_cache_disk_bytes,
                    prompt_cache_preload_s=self.cfg.prompt_cache_preload_s,
                    unfused_attention_elements=self.cfg.cuda_unfused_attention_elements,
                    decode_kernel=self.cfg.cuda_decode_kernel,
                    trust_remote_code=spec.trust_remote_code,
                    cpu_weights=spec.cpu_weights,
                    memory_limit=self.memory_limit,
                    on_death=self._died,
                )
            else:
                worker = ModelWorker(
                    name,
                    spec.path,
                    loader=loader,
                    loop=loop,
                    **batching(spec),
                    prompt_cache_bytes=prompt_cache_budget(self.cfg.prompt_cache_bytes),
                    prompt_cache_min_tokens=self.cfg.prompt_cache_min_tokens,
                    prompt_cache_dir=self.cfg.prompt_cache_dir,
                    prompt_cache_disk_bytes=self.cfg.prompt_cache_disk_bytes,
                    prompt_cache_preload_s=self.cfg.prompt_cache_preload_s,
                    unfused_attention_elements=self.cfg.cuda_unfused_attention_elements,
                    decode_kernel=self.cfg.cuda_decode_kernel,
                    on_death=self._died,
                    link=distributed.Link(grp) if grp is not None else None,
                    arriving=self.arriving,
                )
            try:
                await worker.start()
                set_chat_template(worker.tokenizer, spec.chat_template, name)
                await self._measure_weights(worker, info)
                await asyncio.to_thread(_detect_formats, worker, spec.tool_parser, name)
            except BaseException as exc:
                if worker.alive:  # loaded, then refused: nothing half-loaded stays behind
                    worker.stop()
                    await asyncio.to_thread(worker.join, 10.0)
                info.state = "failed"
                info.error = str(exc)
                self._emit("load_failed", name, error=str(exc))
                raise
            seconds = time.perf_counter() - t0
            self._workers[name] = worker
            info.state = "loaded"
            info.loaded_at = time.time()
            info.load_seconds = round(seconds, 3)
            info.last_used = info.last_used or info.loaded_at
            log.info("model %s loaded in %.2f s", name, seconds)
            self._emit("loaded", name, seconds=seconds)
            return info

    def _free_for_load(self) -> int:
        """Bytes a model may load into: the system's (the device's on CUDA), within the MLX
        memory limit less what MLX holds."""
        free = free_bytes()
        if self.memory_limit is not None:
            free = min(free, self.memory_limit - mlx_active())
        return free

    async def _measure_weights(self, worker: AnyWorker, info: ModelInfo) -> None:
        """The loaded parameters' bytes, for the memory governor (the file-based estimate stays
        when the model can't be asked)."""
        try:
            fut = worker.call(weights_bytes)
            info.extra["weights_bytes"] = int(await asyncio.wait_for(asyncio.wrap_future(fut), 30))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("model %s: could not measure its weights: %s", info.name, exc)

    def weights_bytes(self) -> int:
        """Bytes of the loaded models' weights (as measured after the load)."""
        total = 0
        for name in self.loaded():
            value = self._info[name].extra.get("weights_bytes")
            total += value if isinstance(value, int) else 0
        return total

    async def unload(self, name: str, timeout_s: float = 30.0) -> ModelInfo:
        """Stop a model: wait for its requests up to `timeout_s`, then fail the rest."""
        self.spec(name)
        async with self._lock(name):
            worker = self._workers.get(name)
            info = self._info[name]
            if worker is None:
                info.state = "unloaded"
                return info
            info.state = "unloading"
            deadline = time.monotonic() + timeout_s
            while worker.active_count and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            worker.stop()
            await asyncio.to_thread(worker.join, 10.0)
            self._workers.pop(name, None)
            info.state = "unloaded"
            info.loaded_at = None
            log.info("model %s unloaded", name)
            self._emit("unloaded", name)
            return info

    def _died(self, name: str, exc: BaseException) -> None:
        info = self._info.get(name)
        if info is not None:
            info.state = "failed"
            info.error = f"generation thread died: {exc}"
        self._workers.pop(name, None)
        self._emit("died", name, error=str(exc))
        if self.on_death is not None:
            self.on_death(name, exc)

    async def close(self) -> None:
        for name in list(self._workers):
            worker = self._workers.pop(name)
            worker.stop()
            await asyncio.to_thread(worker.join, 10.0)
            self._info[name].state = "unloaded"


def _detect_formats(worker: AnyWorker, tool_parser: Optional[str], name: str) -> None:
    """Read the model's tool-call and thinking formats from its template and vocabulary, and
    compile its chat template, now rather than in its first request (mlx-lm's tool parsers
    imported, the vocabulary walked, the Jinja template compiled: 10-40 ms)."""
    try:
        formats_of(worker, tool_parser)
    except Exception as exc:  # the requests will say what is wrong, as before
        log.warning("model %s: its output formats are not known: %s", name, exc)
    tok = worker.tokenizer
    if not getattr(tok, "chat_template", None):
        return
    hello = [{"role": "user", "content": "Hi"}]
    try:
        tok.encode(tok.apply_chat_template(hello, tokenize=False, add_generation_prompt=True))
    except Exception as exc:  # a template that wants more than one user message: only a warm-up
        log.debug("model %s: chat template not warmed up: %s", name, exc)


def _on(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether this thread runs `loop` (then it must not wait for a coroutine on it)."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
