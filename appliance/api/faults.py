"""TESTING ONLY: fault injection, so tests can break the appliance for real.

The route exists only when the environment has APPLIANCE_FAULT_INJECTION=1 (never set by the
appliance, its config or its service recipes). POST /testing/faults with
  {"task": NAME, "times": N}   the next N runs of maintenance task NAME raise
  {"kill_model": NAME}         the generation thread of model NAME raises between steps
"""

from __future__ import annotations

import os
from typing import Any

import falcon
import falcon.asgi
import orjson

from ..engine.service import Engine
from ..errors import InvalidRequest, NotFound
from ..tasks import TaskRunner

ENV = "APPLIANCE_FAULT_INJECTION"
PATH = "/testing/faults"


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


class InjectedFault(RuntimeError):
    """The exception a killed generation thread dies of."""


class Faults:
    """POST /testing/faults (only with APPLIANCE_FAULT_INJECTION=1)."""

    def __init__(self, engine: Engine, runner: TaskRunner) -> None:
        self.engine = engine
        self.runner = runner

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body: Any = orjson.loads(await req.stream.read() or b"{}")
        if not isinstance(body, dict):
            raise InvalidRequest("the body must be a JSON object")
        if "task" in body:
            name = body["task"]
            try:
                self.runner.inject_fault(str(name), int(body.get("times", 1)))
            except KeyError:
                raise NotFound(f"no enabled maintenance task {name!r}") from None
        elif "kill_model" in body:
            worker = self.engine.registry.worker(str(body["kill_model"]))
            if worker is None:
                raise NotFound(f"model {body['kill_model']!r} is not loaded")
            worker.inject_fault(InjectedFault("injected fault (APPLIANCE_FAULT_INJECTION)"))
        else:
            raise InvalidRequest('send {"task": NAME} or {"kill_model": NAME}')
        resp.content_type = falcon.MEDIA_JSON
        resp.data = b'{"injected":true}'
