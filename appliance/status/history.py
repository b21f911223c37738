"""Traffic as the status page charts it: per-model counters from the engine's request events,
and a ring buffer of samples taken every few seconds for the last 15 minutes. In process,
bounded, no database."""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Optional, TypeVar

from ..engine.types import EngineStats, Generation

log = logging.getLogger("appliance.status")

T = TypeVar("T")

SAMPLE_INTERVAL_S = 5.0
WINDOW_S = 15 * 60.0
RATE_WINDOW_S = 60.0  # a model's tokens/s: over the last minute
RECENT_KEEP = 4096  # finished requests kept for rates and TTFT medians


class RingBuffer(Generic[T]):
    """The last `capacity` items, oldest first; appending past capacity drops the oldest."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._items: deque[T] = deque(maxlen=capacity)

    def append(self, item: T) -> None:
        self._items.append(item)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._items))

    def last(self) -> Optional[T]:
        return self._items[-1] if self._items else None


@dataclass(frozen=True)
class Finished:
    """One finished request, as the charts and rates need it."""

    t: float  # wall clock
    model: str
    tokens: int
    ttft_s: Optional[float]


@dataclass
class ModelCounts:
    """Running totals of one model since the process started."""

    requests: int = 0
    tokens: int = 0
    prompt_tokens: int = 0
    cache_hits: int = 0
    cache_misses: int = 0


class Traffic:
    """Per-model totals and the recent finished requests; an engine request observer."""

    def __init__(self, keep: int = RECENT_KEEP, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.models: dict[str, ModelCounts] = {}
        self.recent: RingBuffer[Finished] = RingBuffer(keep)
        self.requests = 0
        self.tokens = 0

    def on_request(self, event: str, gen: Optional[Generation], details: dict[str, Any]) -> None:
        if event != "finished" or gen is None:
            return
        ttft = gen.t_first - gen.t_admitted if gen.t_first is not None else None
        self.add(gen.model, len(gen.tokens), len(gen.prompt_tokens), gen.cached_tokens > 0, ttft)

    def add(
        self, model: str, tokens: int, prompt_tokens: int, cache_hit: bool, ttft_s: Optional[float]
    ) -> None:
        c = self.models.setdefault(model, ModelCounts())
        c.requests += 1
        c.tokens += tokens
        c.prompt_tokens += prompt_tokens
        if cache_hit:
            c.cache_hits += 1
        else:
            c.cache_misses += 1
        self.requests += 1
        self.tokens += tokens
        self.recent.append(Finished(self.clock(), model, tokens, ttft_s))

    def since(self, t: float, model: Optional[str] = None) -> list[Finished]:
        return [f for f in self.recent if f.t > t and (model is None or f.model == model)]

    def tokens_per_s(self, model: str, window_s: float = RATE_WINDOW_S) -> float:
        now = self.clock()
        done = self.since(now - window_s, model)
        return sum(f.tokens for f in done) / window_s

    def ttft_p50(self, model: Optional[str] = None, window_s: float = WINDOW_S) -> Optional[float]:
        return median([f.ttft_s for f in self.since(self.clock() - window_s, model)])


def median(values: list[Optional[float]]) -> Optional[float]:
    known = [v for v in values if v is not None]
    return float(statistics.median(known)) if known else None


@dataclass(frozen=True)
class Sample:
    """One point of the charts: rates over the interval before `t`, gauges at `t`."""

    t: float
    tokens_per_s: float
    requests_per_s: float
    running: int
    waiting: int
    ttft_p50_s: Optional[float]


class History:
    """Samples of `traffic` and the engine every `interval_s`, the last `window_s` of them."""

    def __init__(
        self,
        traffic: Traffic,
        stats: Callable[[], EngineStats],
        interval_s: float = SAMPLE_INTERVAL_S,
        window_s: float = WINDOW_S,
    ) -> None:
        self.traffic = traffic
        self.stats = stats
        self.interval_s = interval_s
        self.window_s = window_s
        self.samples: RingBuffer[Sample] = RingBuffer(max(1, round(window_s / interval_s)))
        self._last = (traffic.clock(), traffic.requests, traffic.tokens)

    def sample(self) -> Sample:
        """Take one sample now and keep it."""
        now = self.traffic.clock()
        t0, requests0, tokens0 = self._last
        dt = max(now - t0, 1e-6)
        tr = self.traffic
        e = self.stats()
        s = Sample(
            t=now,
            tokens_per_s=(tr.tokens - tokens0) / dt,
            requests_per_s=(tr.requests - requests0) / dt,
            running=e.running,
            waiting=e.waiting,
            ttft_p50_s=median([f.ttft_s for f in tr.since(t0)]),
        )
        self._last = (now, tr.requests, tr.tokens)
        self.samples.append(s)
        return s

    async def run(self) -> None:
        """Until cancelled: a sample every `interval_s` (a background task of the Lifecycle)."""
        while True:
            try:
                self.sample()
            except Exception:  # one bad read must not end the charts
                log.exception("status sample failed")
            await asyncio.sleep(self.interval_s)
