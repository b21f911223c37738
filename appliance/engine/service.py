"""The engine the API talks to: registry + admission + one request's life."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Optional

from ..config import LimitsConfig, ModelsConfig
from ..errors import PromptTooLong
from .admission import Admission
from .registry import ModelRegistry
from .types import Generation, SamplingParams
from .worker import ModelWorker

log = logging.getLogger("appliance.engine")

# (event, generation or None, details): "admitted", "rejected", "finished"
RequestObserver = Callable[[str, Optional[Generation], dict[str, Any]], None]


class Engine:
    """Runs requests on the loaded models within the admission limits."""

    def __init__(self, models: ModelsConfig, limits: LimitsConfig) -> None:
        self.models_cfg = models
        self.limits = limits
        self.registry = ModelRegistry(models)
        self.admission = Admission(limits)
        self._observers: list[RequestObserver] = []
        self._holding: set[int] = set()  # id() of generations holding a slot

    def observe(self, observer: RequestObserver) -> None:
        self._observers.append(observer)

    def _emit(self, event: str, gen: Optional[Generation], **details: Any) -> None:
        for obs in self._observers:
            try:
                obs(event, gen, details)
            except Exception:  # observers never break a request
                log.exception("request observer failed on %s", event)

    def resolve_name(self, name: Optional[str]) -> str:
        name = name or self.models_cfg.default
        self.registry.spec(name)  # ModelNotFound when unknown
        return name

    async def model(self, name: str) -> ModelWorker:
        return await self.registry.get_or_load(name)

    def check_prompt(self, name: str, prompt_tokens: list[int], max_tokens: int) -> None:
        ctx = self.registry.spec(name).context_length
        if len(prompt_tokens) >= ctx:
            raise PromptTooLong(
                f"the prompt has {len(prompt_tokens)} tokens; model {name!r} takes at most "
                f"{ctx - 1} (context_length {ctx})",
                param="messages",
            )

    def max_tokens_for(self, name: str, prompt_len: int, asked: Optional[int]) -> int:
        spec = self.registry.spec(name)
        cap = min(spec.max_tokens, spec.context_length - prompt_len)
        return max(1, min(asked, cap) if asked is not None else cap)

    async def start(
        self,
        worker: ModelWorker,
        prompt_tokens: list[int],
        params: SamplingParams,
        *,
        high_priority: bool = False,
    ) -> Generation:
        """Wait for a slot (or raise QueueFull), then put the request in the batch."""
        try:
            queued = await self.admission.acquire(high_priority)
        except Exception as exc:
            self._emit("rejected", None, model=worker.name, error=exc)
            raise
        gen = Generation(worker.name, prompt_tokens, params)
        gen.t_admitted = gen.t_created + queued
        self._holding.add(id(gen))
        self.registry.touch(worker.name)
        self._emit("admitted", gen, queued_s=queued)
        worker.submit(gen)
        return gen

    def finish(self, gen: Generation, status: str = "ok") -> None:
        """Leave the batch if still in it and give the slot back. Idempotent."""
        if id(gen) not in self._holding:
            return
        self._holding.discard(id(gen))
        gen.cancel()
        self.admission.release()
        self._emit("finished", gen, status=status)

    def deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.limits.request_timeout_s

    async def start_up(self) -> None:
        """Load the auto_load models; a failure is logged and the server starts unready."""
        for name in self.models_cfg.auto_load:
            try:
                await self.registry.load(name)
            except Exception as exc:
                log.error("auto_load of %s failed: %s", name, exc)

    async def close(self) -> None:
        await self.registry.close()
