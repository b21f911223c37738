"""The engine the API talks to: registry + admission + one request's life."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Optional

from ..config import LimitsConfig, ModelsConfig
from ..errors import InsufficientMemory, PromptTooLong
from .admission import Admission
from .arrivals import Arrivals
from .governor import Held, MemoryGovernor
from .limits import Limits, LimitsInForce
from .process import AnyWorker
from .registry import ModelRegistry, resolve_alias
from .types import EngineStats, Generation, SamplingParams

log = logging.getLogger("appliance.engine")

# (event, generation or None, details): "admitted", "rejected", "finished"
RequestObserver = Callable[[str, Optional[Generation], dict[str, Any]], None]


class Engine:
    """Runs requests on the loaded models within the admission limits."""

    def __init__(
        self,
        models: ModelsConfig,
        limits: LimitsConfig,
        in_force: Optional[LimitsInForce] = None,
    ) -> None:
        self.models_cfg = models
        self.limits = limits
        # Admission and shedding limits that may change at run time (safe mode).
        self.limits_in_force = in_force or LimitsInForce(Limits.of(limits))
        self.registry = ModelRegistry(models)
        self.admission = Admission(self.limits_in_force)
        # Called before a request loads a model that is not loaded; it may refuse (safe mode).
        self.load_guard: Optional[Callable[[str], None]] = None
        # Requests on their way from the HTTP front (server.py keeps the count): a generation
        # thread waits for them to prefill a wave of arrivals together.
        self.arrivals = Arrivals()
        self.registry.arriving = self.arrivals
        self._observers: list[RequestObserver] = []
        self._holding: dict[int, Generation] = {}  # generations holding a slot, by id()
        self._waiting: dict[str, int] = {}  # requests in the admission queue, by model
        # Models to recover after an unclean exit, reloads after a generation thread died,
        # and the hook that ends the process when reloads give out.
        self.recover: list[str] = []
        self.reloading: set[str] = set()
        self.on_fatal: Optional[Callable[[str], None]] = None
        self._deaths: dict[str, int] = {}
        self._reloads: set[asyncio.Task[None]] = set()
        self.registry.on_death = self._on_death
        self.registry.memory_limit = limits.mlx_memory_limit_bytes
        self.governor = MemoryGovernor(
            limits.mlx_memory_limit_bytes,
            per_token=self.kv_bytes_per_token,
            weights=self.registry.weights_bytes,
            workers=self._loaded_workers,
        )
        self.registry.make_room = lambda model, short: self.governor.make_room(
            model, short, purpose=f"load model {model}"
        )
        self._needs: dict[int, int] = {}  # KV bytes reserved by each generation holding a slot
        self.admission.room = _Room(self)

    def stats(self) -> EngineStats:
        """A snapshot of the engine's state (admission, loaded models, caches, joins)."""
        reg, adm = self.registry, self.admission
        caches: dict[str, int] = {}
        entries: dict[str, int] = {}
        joins: dict[str, tuple[int, int]] = {}
        disk: dict[str, tuple[int, int]] = {}
        loaded = reg.loaded()
        for name in loaded:
            w = reg.worker(name)
            if w is None:
                continue
            if w.prompt_cache is not None:
                caches[name] = int(w.prompt_cache.nbytes)
                if hasattr(w.prompt_cache, "__len__"):
                    entries[name] = len(w.prompt_cache)
            joins[name] = (w.stats["joins"], w.stats["joined"])
            if w.stats.get("disk_bytes") or w.stats.get("disk_tokens"):
                disk[name] = (w.stats.get("disk_tokens", 0), w.stats.get("disk_bytes", 0))
        return EngineStats(
            running=adm.running,
            waiting=adm.waiting,
            max_running=adm.max_running,
            max_queued=adm.max_queued,
            models_loaded=tuple(loaded),
            threads_alive=reg.threads_alive(),
            reloading=tuple(sorted(self.reloading)),
            prompt_cache_bytes=caches,
            batch_joins=joins,
            prompt_cache_entries=entries,
            waiting_by_model={k: v for k, v in self._waiting.items() if v},
            kv_reserved_bytes=adm.reserved,
            kv_evicted_bytes=self.governor.evicted_bytes,
            prompt_cache_disk=disk,
        )

    def observe(self, observer: RequestObserver) -> None:
        self._observers.append(observer)

    def _emit(self, event: str, gen: Optional[Generation], **details: Any) -> None:
        for obs in self._observers:
            try:
                obs(event, gen, details)
            except Exception:  # observers never break a request
                log.exception("request observer failed on %s", event)

    def resolve_name(self, name: Optional[str]) -> str:
        """The catalog name a request's `model` means: itself, an alias (models.aliases), or
        models.default when absent; ModelNotFound when none."""
        name = name or self.models_cfg.default
        if name not in self.registry.names:  # a model's own name (catalog or loaded) wins
            target = resolve_alias(self.models_cfg.aliases, name)
            if target is not None:
                return target
        self.registry.spec(name)  # ModelNotFound when unknown
        return name

    async def model(self, name: str) -> AnyWorker:
        """The model's worker, loading it on first use unless `load_guard` refuses."""
        worker = self.registry.worker(name)
        if worker is not None:
            return worker
        if self.load_guard is not None:
            self.load_guard(name)
        return await self.registry.get_or_load(name)

    def check_prompt(
        self, name: str, prompt_tokens: list[int], max_tokens: int, *, param: str = "messages"
    ) -> None:
        ctx = self.registry.spec(name).context_length
        if len(prompt_tokens) >= ctx:
            raise PromptTooLong(
                f"the prompt has {len(prompt_tokens)} tokens; model {name!r} takes at most "
                f"{ctx - 1} (context_length {ctx})",
                param=param,
            )

    def max_tokens_for(self, name: str, prompt_len: int, asked: Optional[int]) -> int:
        spec = self.registry.spec(name)
        cap = min(spec.max_tokens, spec.context_length - prompt_len)
        return max(1, min(asked, cap) if asked is not None else cap)

    async def start(
        self,
        worker: AnyWorker,
        prompt_tokens: list[int],
        params: SamplingParams,
        *,
        high_priority: bool = False,
        scope: Optional[dict[str, Any]] = None,
        prompt_param: str = "messages",
    ) -> Generation:
        """Wait for a slot and room for its KV cache (or raise QueueFull, InsufficientMemory,
        or InvalidRequest when it could never fit), then put the request in the batch. `scope`:
        the HTTP request's ASGI scope, counted as on its way (arrivals.py) until it is
        submitted; `prompt_param`: the request field a too long prompt is named by."""
        need = await self.check_memory(
            worker.name, len(prompt_tokens), params.max_tokens, prompt_param=prompt_param
        )
        waits = self.admission.would_wait(need)
        if scope is not None and waits:
            self.arrivals.admitting(scope)  # it waits for a slot, not for the front
        if waits:
            self._waiting[worker.name] = self._waiting.get(worker.name, 0) + 1
        try:
            queued = await self.admission.acquire(high_priority, need)
        except Exception as exc:
            self._emit("rejected", None, model=worker.name, error=exc)
            raise
        finally:
            if waits:
                self._waiting[worker.name] -= 1
        gen = Generation(worker.name, prompt_tokens, params)
        gen.t_admitted = gen.t_created + queued
        self._holding[id(gen)] = gen
        self._needs[id(gen)] = need
        self.registry.touch(worker.name)
        self._emit("admitted", gen, queued_s=queued)
        try:
            worker.submit(gen)
        finally:
            if scope is not None:
                # Right after the inbox, not before: counted until it is there, so a generation
                # thread that counts before it looks at its inbox never misses it (worker.py).
                self.arrivals.admitting(scope)
        return gen

    def would_wait(self, name: str, prompt_len: int, max_tokens: int) -> bool:
        """True when such a request now would queue (for a slot or for memory), or be refused."""
        return self.admission.would_wait(self.governor.need(name, prompt_len, max_tokens))

    def finish(self, gen: Generation, status: str = "ok") -> None:
        """Leave the batch if still in it and give the slot back. Idempotent."""
        if id(gen) not in self._holding:
            return
        del self._holding[id(gen)]
        gen.cancel()
        self.admission.release(self._needs.pop(id(gen), 0))
        self._emit("finished", gen, status=status)

    def fail_all(self, message: str) -> None:
        """End every request in flight with an engine error (their streams get an error chunk)."""
        from ..errors import EngineFailure

        for gen in list(self._holding.values()):
            gen.fail(EngineFailure(message))

    def deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.limits.request_timeout_s

    async def start_up(self, load_models: bool = True) -> None:
        """Set the MLX memory limit, then (unless `load_models` is false: safe mode) load the
        auto_load models and `recover` (loaded before an unclean exit) within the memory budget;
        a failure is logged and the next model tried."""
        limit = self.limits.mlx_memory_limit_bytes
        if limit is not None:
            try:
                import mlx.core as mx

                mx.set_memory_limit(limit)
                log.info("MLX memory limit set to %d bytes", limit)
            except Exception as exc:  # no MLX backend here
                log.warning("could not set the MLX memory limit: %s", exc)
        if not load_models:
            log.warning("safe mode: no model is loaded at start (auto_load and recovery held)")
            return
        await self.load_auto(self.recover)

    async def load_auto(self, also: Optional[list[str]] = None) -> None:
        """Load the auto_load models, then `also`, one after another; failures are logged."""
        auto = list(self.models_cfg.auto_load)
        for name in [*auto, *[n for n in also or () if n not in auto]]:
            try:
                await self.registry.load(name)
            except Exception as exc:
                what = "auto_load" if name in auto else "recovery"
                log.error("%s of %s failed: %s", what, name, exc)

    # -- memory governor (governor.py)
    def kv_bytes_per_token(self, name: str) -> int:
        value = self.registry.info(name).extra.get("kv_bytes_per_token")
        return value if isinstance(value, int) else 0

    def _loaded_workers(self) -> list[tuple[str, Any]]:
        return [(n, w) for n in self.registry.loaded() if (w := self.registry.worker(n))]

    def free_memory(self) -> int:
        """Bytes a new request's KV cache may take now: system memory available (on CUDA, the
        device's memory less MLX's), or the MLX limit less MLX's active memory, less what
        requests holding slots will still allocate."""
        held = []
        for key, gen in self._holding.items():
            left = gen.params.max_tokens - len(gen.tokens)
            if gen.t_first is None:  # not prefilled yet: the prompt's KV is still to come
                left += len(gen.prompt_tokens)
            held.append(Held(self._needs.get(key, 0), self.kv_bytes_per_token(gen.model) * left))
        # Slots granted whose generation is not made yet: their whole reservation is to come.
        granted = self.admission.reserved - sum(h.need for h in held)
        return self.governor.free(held) - max(0, granted)

    async def check_memory(
        self, name: str, prompt_len: int, max_tokens: int, *, prompt_param: str = "messages"
    ) -> int:
        """The KV bytes the request reserves (0: its model's shape is unknown). Raises
        InvalidRequest when it could never fit; evicts prompt caches when it does not fit now;
        raises InsufficientMemory (503) when it still does not and nothing running would free
        memory by ending."""
        need = self.governor.need(name, prompt_len, max_tokens)
        if not need:
            return 0
        self.governor.check_ever_fits(name, prompt_len, max_tokens, prompt_param=prompt_param)
        free = self.free_memory()
        if need <= free:
            return need
        await self.governor.make_room(name, need - free)
        free = self.free_memory()
        if need > free and not self.admission.running:
            raise InsufficientMemory(
                f"not enough memory for this request: its KV cache needs about {need} bytes "
                f"({prompt_len} prompt + {max_tokens} max tokens) and {max(0, free)} are free "
                "with no request running (memory is held outside this server's requests); "
                "lower max_tokens or retry later",
                retry_after=self.admission.retry_after(),
            )
        return need

    # -- generation thread failures
    def _on_death(self, name: str, exc: BaseException) -> None:
        """A generation thread died (its requests already failed): reload it, or give up."""
        deaths = self._deaths[name] = self._deaths.get(name, 0) + 1
        if deaths > self.limits.engine_restarts:
            self._fatal(
                f"the generation thread of model {name!r} died {deaths} times "
                f"(limits.engine_restarts={self.limits.engine_restarts})"
            )
            return
        self.reloading.add(name)
        task = asyncio.get_running_loop().create_task(
            self._reload(name, deaths), name=f"reload-{name}"
        )
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _reload(self, name: str, deaths: int) -> None:
        from tenacity import AsyncRetrying, stop_after_attempt, wait_exponential

        backoff = self.limits.engine_restart_backoff_s * 2 ** (deaths - 1)
        log.warning(
            "model %s: generation thread died (%d of %d restarts); reloading in %g s",
            name,
            deaths,
            self.limits.engine_restarts,
            backoff,
        )
        try:
            await asyncio.sleep(backoff)
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(3),
                wait=wait_exponential(multiplier=backoff, max=60),
                reraise=True,
            ):
                with attempt:
                    await self.registry.load(name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fatal(
                f"model {name!r} could not be reloaded after its generation thread died: {exc}"
            )
            return
        finally:
            self.reloading.discard(name)
        log.info("model %s reloaded after its generation thread died", name)

    def _fatal(self, reason: str) -> None:
        log.critical("giving up: %s; exiting so the supervisor restarts the process", reason)
        if self.on_fatal is not None:
            self.on_fatal(reason)

    async def close(self) -> None:
        for task in list(self._reloads):
            task.cancel()
        await asyncio.gather(*self._reloads, return_exceptions=True)
        await self.registry.close()


class _Room:
    """Admission's view of the memory governor (admission.Room)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def fits(self, need: int) -> bool:
        return need <= self.engine.free_memory()

    async def make_room(self, need: int) -> None:
        engine = self.engine
        shortfall = need - engine.free_memory()
        if shortfall > 0 and engine.governor.evictable():
            await engine.governor.make_room("", shortfall)
