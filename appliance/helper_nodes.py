"""Upstream helper nodes: /v1/embeddings and /v1/rerank proxied to other appliances (or any
server with the same API), with tenacity retries and a circuit breaker.

A request that still fails after `retries` retries (connection errors, timeouts, 502/503/504)
counts one failure; `failure_threshold` failures in a row open the circuit: requests are then
refused at once (503 `helper_unavailable`, Retry-After) until `reset_after_s` has passed, when
one trial request (or a successful health probe) may close it again. No Falcon here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import httpx
import orjson
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from .config import HelperNode, HelpersConfig
from .errors import HelperUnavailable

log = logging.getLogger("appliance.helpers")

ROLES = ("embedding", "rerank")
RETRY_STATUSES = (502, 503, 504)


class _RetryableStatus(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


class CircuitBreaker:
    """closed -> (threshold failures) -> open -> (reset_after_s) -> half_open -> closed | open."""

    def __init__(
        self, threshold: int, reset_after_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = threshold
        self.reset_after_s = reset_after_s
        self.clock = clock
        self.state = "closed"
        self.failures = 0
        self.opened_at = 0.0
        self.trial = False  # a half-open trial is in flight

    def retry_after(self) -> float:
        return max(1.0, self.reset_after_s - (self.clock() - self.opened_at))

    def allow(self) -> bool:
        """May a request go out now? Moves open -> half_open once the pause has passed."""
        if self.state == "closed":
            return True
        if self.state == "open" and self.clock() - self.opened_at >= self.reset_after_s:
            self.state = "half_open"
            self.trial = False
        if self.state == "half_open" and not self.trial:
            self.trial = True
            return True
        return False

    def success(self) -> bool:
        """Record a success; True when it closed the circuit."""
        was = self.state
        self.state, self.failures, self.trial = "closed", 0, False
        return was != "closed"

    def failure(self) -> bool:
        """Record a failure; True when it opened the circuit."""
        self.trial = False
        self.failures += 1
        if self.state == "half_open" or (
            self.state == "closed" and self.failures >= self.threshold
        ):
            self.state = "open"
            self.opened_at = self.clock()
            return True
        return False


@dataclass(frozen=True)
class HelperResponse:
    status: int
    body: bytes
    content_type: str


class HelperClient:
    """One helper node: proxied POSTs with retries, a health probe and a circuit breaker."""

    def __init__(
        self,
        role: str,
        node: HelperNode,
        count: Optional[Callable[[str, str], None]] = None,
        transport: Optional[httpx.AsyncBaseTransport] = None,
    ) -> None:
        self.role = role
        self.node = node
        self.url = node.url.rstrip("/")
        self.breaker = CircuitBreaker(node.failure_threshold, node.reset_after_s)
        self.up: Optional[bool] = None  # unknown until the first request or probe
        self.last_error: Optional[str] = None
        self.last_ok_at: Optional[float] = None
        self._count = count or (lambda role, status: None)
        self._transport = transport
        self._client: Optional[httpx.AsyncClient] = None

    def client(self) -> httpx.AsyncClient:
        # Made on first use, so it belongs to the running event loop.
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.node.api_key}"} if self.node.api_key else {}
            self._client = httpx.AsyncClient(
                base_url=self.url,
                timeout=self.node.timeout_s,
                headers=headers,
                transport=self._transport,
            )
        return self._client

    def _ok(self) -> None:
        self.up, self.last_error, self.last_ok_at = True, None, time.time()
        if self.breaker.success():
            log.info("helper %s (%s): circuit closed", self.role, self.url)

    def _failed(self, why: str) -> None:
        self.up, self.last_error = False, why
        if self.breaker.failure():
            log.warning(
                "helper %s (%s): circuit open for %g s after %d failure(s): %s",
                self.role,
                self.url,
                self.node.reset_after_s,
                self.breaker.failures,
                why,
            )

    async def post(self, path: str, body: dict[str, Any]) -> HelperResponse:
        """POST JSON to the helper; its answer (2xx or 4xx) as is, or HelperUnavailable."""
        if not self.breaker.allow():
            self._count(self.role, "circuit_open")
            raise HelperUnavailable(
                f"the {self.role} helper at {self.url} is unavailable (circuit open): "
                f"{self.last_error or 'too many failures'}",
                retry_after=math.ceil(self.breaker.retry_after()),
            )
        if self.node.model:
            body = dict(body, model=self.node.model)
        data = orjson.dumps(body)
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.node.retries + 1),
                wait=wait_exponential(multiplier=0.1, max=2.0),
                retry=retry_if_exception_type((httpx.TransportError, _RetryableStatus)),
                reraise=True,
            ):
                with attempt:
                    r = await self.client().post(
                        path, content=data, headers={"Content-Type": "application/json"}
                    )
                    if r.status_code in RETRY_STATUSES or r.status_code >= 500:
                        raise _RetryableStatus(r.status_code, r.content)
        except (httpx.TransportError, _RetryableStatus) as exc:
            why = _describe(exc)
            self._failed(why)
            self._count(self.role, "failed")
            raise HelperUnavailable(
                f"the {self.role} helper at {self.url} failed after "
                f"{self.node.retries + 1} attempt(s): {why}",
                retry_after=math.ceil(self.breaker.retry_after())
                if self.breaker.state == "open"
                else 1,
            ) from None
        except BaseException:
            self.breaker.trial = False  # cancelled mid-trial: let another request try
            raise
        self._ok()
        self._count(self.role, str(r.status_code))
        return HelperResponse(
            r.status_code, r.content, r.headers.get("content-type", "application/json")
        )

    async def probe(self) -> bool:
        """GET /healthz once; updates `up`, and closes a circuit whose pause has passed."""
        try:
            r = await self.client().get("/healthz", timeout=min(self.node.timeout_s, 5.0))
            ok = r.status_code == 200
            why = f"/healthz answered {r.status_code}"
        except httpx.HTTPError as exc:
            ok, why = False, _describe(exc)
        if ok:
            if self.breaker.state == "closed" or self.breaker.allow():
                self._ok()
            else:
                self.up = True  # answers again; the circuit closes after its pause
        else:
            was_up = self.up
            self.up, self.last_error = False, why
            if was_up is not False:
                log.warning("helper %s (%s) is down: %s", self.role, self.url, why)
        return ok

    def status(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "up": self.up,
            "circuit": self.breaker.state,
            "failures": self.breaker.failures,
            "retry_after_s": round(self.breaker.retry_after(), 1)
            if self.breaker.state == "open"
            else None,
            "last_error": self.last_error,
            "last_ok_at": self.last_ok_at,
        }

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, _RetryableStatus):
        return f"HTTP {exc.status}"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class HelperNodes:
    """The configured helper nodes by role (embedding, rerank)."""

    def __init__(
        self,
        cfg: HelpersConfig,
        count: Optional[Callable[[str, str], None]] = None,
        transport: Optional[httpx.AsyncBaseTransport] = None,
    ) -> None:
        self.nodes: dict[str, HelperClient] = {}
        for role in ROLES:
            node = getattr(cfg, role)
            if node is not None and node.url:
                self.nodes[role] = HelperClient(role, node, count, transport)

    def get(self, role: str) -> Optional[HelperClient]:
        return self.nodes.get(role)

    def live(self) -> dict[str, dict[str, float]]:
        """helper_up / helper_open for the metrics collector (unknown `up` left out)."""
        up = {r: 1.0 if h.up else 0.0 for r, h in self.nodes.items() if h.up is not None}
        return {
            "helper_up": up,
            "helper_open": {
                r: 0.0 if h.breaker.state == "closed" else 1.0 for r, h in self.nodes.items()
            },
        }

    def health(self) -> list[tuple[str, str]]:
        """Degraded reasons for /admin/health: a helper down or its circuit open."""
        out = []
        for role, h in self.nodes.items():
            if h.breaker.state != "closed":
                out.append(
                    (
                        "degraded",
                        f"{role} helper {h.url}: circuit {h.breaker.state} ({h.last_error})",
                    )
                )
            elif h.up is False:
                out.append(("degraded", f"{role} helper {h.url} is down: {h.last_error}"))
        return out

    async def probe_all(self) -> None:
        for h in self.nodes.values():
            await h.probe()

    async def close(self) -> None:
        for h in self.nodes.values():
            await h.close()
