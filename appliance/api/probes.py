"""Liveness and readiness probes."""

from __future__ import annotations

import falcon
import falcon.asgi
import orjson

from ..engine.service import Engine
from ..errors import Draining, NotReady
from ..lifecycle import Lifecycle


class Live:
    """GET /healthz: 200 while the process serves."""

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = b'{"status":"ok"}'


class Ready:
    """GET /readyz: 200 when a model is loaded and work is accepted, else 503."""

    def __init__(self, engine: Engine, lifecycle: Lifecycle) -> None:
        self.engine = engine
        self.lifecycle = lifecycle

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if self.lifecycle.draining:
            raise Draining("the server is draining", retry_after=5)
        if self.engine.reloading:
            names = ", ".join(sorted(self.engine.reloading))
            raise NotReady(f"reloading after a generation thread died: {names}", retry_after=2)
        loaded = self.engine.registry.loaded()
        if not loaded:
            if self.lifecycle.safe_mode:
                raise NotReady(
                    f"safe mode ({self.lifecycle.safe_mode_reason}): no model is loaded; load one "
                    "(POST /admin/models/load) or end safe mode (POST /admin/safe-mode/exit)",
                    retry_after=max(1.0, self.lifecycle.safe_mode_ends_in_s() or 0.0),
                )
            raise NotReady("no model is loaded yet", retry_after=2)
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps({"status": "ready", "models": loaded})
