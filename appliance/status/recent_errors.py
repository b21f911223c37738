"""Recent errors for the status page: non-2xx answers counted by status and route, bounded."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

KEEP = 50  # (status, route) pairs kept; the least recently seen goes first


@dataclass
class ErrorCount:
    """How often one (status, route) pair was answered, and when last."""

    status: int
    path: str
    count: int
    first_at: float
    last_at: float
    code: Optional[str]


class RecentErrors:
    """Falcon middleware (outermost, beside the request counter): counts every non-2xx answer by
    status and route. The route is the matched URI template, or "other" for a path no route
    serves, so a scan of random paths adds one line, not one per path."""

    def __init__(
        self, app: Any = None, keep: int = KEEP, clock: Callable[[], float] = time.time
    ) -> None:
        self.app = app
        self.keep = keep
        self.clock = clock
        self._counts: OrderedDict[tuple[int, str], ErrorCount] = OrderedDict()

    def record(self, status: int, path: str, code: Optional[str] = None) -> None:
        if 200 <= status < 300:
            return
        now = self.clock()
        k = (status, path)
        entry = self._counts.get(k)
        if entry is None:
            entry = self._counts[k] = ErrorCount(status, path, 0, now, now, code)
        entry.count += 1
        entry.last_at = now
        entry.code = code or entry.code
        self._counts.move_to_end(k)
        while len(self._counts) > self.keep:
            self._counts.popitem(last=False)

    def items(self) -> list[ErrorCount]:
        """Most recently seen first."""
        return list(reversed(self._counts.values()))

    def route(self, req: Any) -> str:
        if req.uri_template:
            return str(req.uri_template)
        # A request refused by middleware is not routed yet: ask the router.
        router = getattr(self.app, "_router", None)
        found = router.find(req.path) if router is not None else None
        return str(found[3]) if found else "other"

    async def process_response(self, req: Any, resp: Any, resource: Any, ok: bool) -> None:
        status = int(resp.status_code)
        if not 200 <= status < 300:
            self.record(status, self.route(req), getattr(req.context, "error_code", None))
