"""Small data passed between the API, the scheduler and the generation threads."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Optional

from ..errors import ApplianceError, RequestTimeout
from .constraints import Constraint

TICK_S = 1.0  # a waiting reader wakes at least this often (keep-alives, deadlines)


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the sampler; validated by the API before it gets here."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[tuple[tuple[int, float], ...]] = None
    logprobs: bool = False
    top_logprobs: int = 0
    stop: tuple[str, ...] = ()
    # A grammar the output must follow (a forced tool call, a JSON schema): constraints.py.
    constraint: Optional[Constraint] = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class TopLogprob:
    token: int
    logprob: float


class Generation:
    """One request's tokens as the generation thread produces them, read on the event loop.

    The generation thread never touches this object directly: it hands a whole decode step to
    the loop at once (`call_soon_threadsafe`), which appends here and wakes the reader.
    """

    __slots__ = (
        "rid",
        "model",
        "prompt_tokens",
        "params",
        "cached_tokens",
        "tokens",
        "logprobs",
        "top_logprobs",
        "finish_reason",
        "error",
        "t_created",
        "t_admitted",
        "t_first",
        "t_last",
        "itl",
        "_event",
        "_ticker",
        "ticks",
        "_cancel",
        "_read",
        "done",
    )

    def __init__(self, model: str, prompt_tokens: list[int], params: SamplingParams) -> None:
        self.rid = 0  # set by the worker it is submitted to
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.params = params
        self.cached_tokens = 0
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[TopLogprob]] = []
        self.finish_reason: Optional[str] = None
        self.error: Optional[BaseException] = None
        self.t_created = time.perf_counter()
        self.t_admitted = self.t_created
        self.t_first: Optional[float] = None
        self.t_last: Optional[float] = None
        self.itl: list[float] = []
        self._event: Optional[asyncio.Future[bool]] = None  # the reader's waiter, if waiting
        self._ticker: Optional[asyncio.TimerHandle] = None
        self.ticks = 0
        self._cancel: Optional[object] = None  # set by the worker: a callable that cancels
        self._read = 0
        self.done = False

    # -- called on the event loop by the worker's per-step hand-off
    def push(
        self,
        token: Optional[int],
        finish_reason: Optional[str],
        logprob: Optional[float],
        top: Optional[list[TopLogprob]],
        now: float,
    ) -> None:
        if self.done:
            return
        if token is not None:
            self.tokens.append(token)
            if logprob is not None:
                self.logprobs.append(logprob)
            if top is not None:
                self.top_logprobs.append(top)
            if self.t_first is None:
                self.t_first = now
            elif self.t_last is not None:
                self.itl.append(now - self.t_last)
            self.t_last = now
        if finish_reason is not None:
            self.finish_reason = finish_reason
            self.done = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if self.done:
            return
        self.error = error
        self.done = True
        self._wake()

    def _wake(self) -> None:
        w = self._event
        if w is not None and not w.done():
            w.set_result(True)
        if self.done and self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    def _tick(self) -> None:
        # One timer per request, re-armed each TICK_S, wakes the reader for keep-alives and
        # deadlines: no timer is made or cancelled per token.
        self.ticks += 1
        self._ticker = (
            None if self.done else asyncio.get_running_loop().call_later(TICK_S, self._tick)
        )
        w = self._event
        if w is not None and not w.done():
            w.set_result(False)

    # -- called by the reader
    async def _wait(self) -> bool:
        """Wait for news (True) or the next tick (False)."""
        loop = asyncio.get_running_loop()
        if self._ticker is None and not self.done:
            self._ticker = loop.call_later(TICK_S, self._tick)
        fut: asyncio.Future[bool] = loop.create_future()
        self._event = fut
        try:
            return await fut
        finally:
            self._event = None

    async def next_tokens(self, deadline: float) -> tuple[list[int], int]:
        """Wait for tokens not read yet; returns them and the index of the first one.

        Returns an empty list once finished. Raises the engine's error if there was one,
        RequestTimeout past `deadline` (a loop.time() value).
        """
        loop = asyncio.get_running_loop()
        # Checked even when tokens are waiting: a steady stream must time out as well.
        while True:
            if not self.done and loop.time() >= deadline:
                raise RequestTimeout("the request ran past limits.request_timeout_s")
            if self._read < len(self.tokens) or self.done:
                break
            await self._wait()
        start = self._read
        new = self.tokens[start:]
        self._read = len(self.tokens)
        if not new and self.error is not None:
            raise (
                self.error
                if isinstance(self.error, ApplianceError)
                else RuntimeError(str(self.error))
            )
        return new, start

    async def wait_event(self) -> bool:
        """Wait for anything new: True if something came, False when only a tick (about
        TICK_S) passed, so the caller can send a keep-alive."""
        if self._read < len(self.tokens) or self.done:
            return True
        await self._wait()
        return self._read < len(self.tokens) or self.done

    def cancel(self) -> None:
        """Leave the batch (client gone, stop string seen, timeout). Idempotent."""
        cancel = self._cancel
        self._cancel = None
        if not self.done:
            self.done = True
            if self.finish_reason is None and self.error is None:
                self.finish_reason = "cancelled"
            self._wake()
        if cancel is not None:
            cancel()  # type: ignore[operator]


@dataclass
class ModelInfo:
    """What the admin API shows of one catalog model."""

    name: str
    path: str
    state: str  # unloaded | loading | loaded | failed | unloading
    memory_estimate_bytes: Optional[int] = None
    loaded_at: Optional[float] = None
    last_used: Optional[float] = None
    requests_served: int = 0
    error: Optional[str] = None
    load_seconds: Optional[float] = None  # how long the last successful load took
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineStats:
    """What the engine is doing at one moment, for health, metrics and the admin API."""

    running: int
    waiting: int
    max_running: int
    max_queued: int
    models_loaded: tuple[str, ...]
    threads_alive: int
    reloading: tuple[str, ...]
    # Per loaded model: prompt cache bytes, and (joins, requests joined) of its batch.
    prompt_cache_bytes: dict[str, int] = field(default_factory=dict)
    batch_joins: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Per model: prompt cache entries (where the cache can count them, not in an engine
    # process), and requests waiting in the admission queue for a slot.
    prompt_cache_entries: dict[str, int] = field(default_factory=dict)
    waiting_by_model: dict[str, int] = field(default_factory=dict)
    # The memory governor: KV bytes reserved by the requests holding slots, and prompt-cache
    # bytes evicted to admit requests (over the process's life).
    kv_reserved_bytes: int = 0
    kv_evicted_bytes: int = 0
    # Per model with a disk tier: (prompt tokens served from it so far, bytes of its files).
    prompt_cache_disk: dict[str, tuple[int, int]] = field(default_factory=dict)
