"""uvicorn with the appliance's own signal handling: drain, then exit 0.

uvicorn alone closes its listener and re-raises the signal (exit -15). Here the first SIGTERM or
SIGINT starts a drain: /readyz and new inference answer 503 at once, in-flight requests get up
to server.drain_timeout_s to finish, the rest are ended with an error, then uvicorn stops.
A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Generator
from typing import Any, Optional

import uvicorn

from . import exits
from .builder import Service

log = logging.getLogger("appliance.server")

# After the drain only the last bytes of finished streams are left to send.
GRACE_AFTER_DRAIN_S = 2


class ApplianceServer(uvicorn.Server):
    """A uvicorn.Server whose signals drain the appliance instead of cutting it off."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._drain_task: Optional[asyncio.Task[None]] = None
        self.exit_code = 0
        service.engine.on_fatal = self.fatal

    def fatal(self, reason: str) -> None:
        """The engine gave up (a model's reloads ran out): drain, then exit exits.ENGINE_GAVE_UP."""
        self.exit_code = exits.ENGINE_GAVE_UP
        if self._loop is not None:
            self._start_drain()

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        original[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._on_peer_failure)
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def _on_peer_failure(self, sig: int, frame: Any) -> None:
        # The launcher saw another rank of the group die: this rank can't step any more.
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._start_peer_failure)

    def _start_peer_failure(self) -> None:
        asyncio.ensure_future(self.peer_failed())

    async def peer_failed(self) -> None:
        """Not ready at once, fail what is in flight, then exit non-zero for a group restart."""
        log.error("a rank of the distributed group died: failing requests and exiting")
        a = self.service
        if a.group is not None:
            a.group.failed_rank_seen = True
        a.lifecycle.draining = True
        a.engine.fail_all("a rank of the distributed group died; the group is restarting")
        await asyncio.sleep(1.0)  # let error chunks and 503s reach the clients
        logging.shutdown()
        os._exit(exits.PEER_FAILED)

    def _on_signal(self, sig: int, frame: Any) -> None:
        if self._drain_task is not None or self._loop is None:
            log.warning("second signal %s: stopping now", signal.Signals(sig).name)
            self.force_exit = True
            self.should_exit = True
            return
        log.info("signal %s: draining", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self.drain())

    async def drain(self) -> None:
        a = self.service
        a.lifecycle.draining = True
        timeout = a.cfg.server.drain_timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        adm = a.engine.admission
        while (adm.running or adm.waiting) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if adm.running or adm.waiting:
            log.warning(
                "drain timeout: ending %d running and %d waiting requests", adm.running, adm.waiting
            )
            a.engine.fail_all(
                f"the server is shutting down and server.drain_timeout_s ({timeout:g} s) has passed"
            )
            await asyncio.sleep(0.2)  # let the error chunks go out before the threads stop
            await a.engine.registry.close()
        else:
            log.info("drained: no request in flight")
        self.should_exit = True


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def serve(service: Service) -> None:
    """Serve until a signal has drained the appliance."""
    cfg = service.cfg.server
    kwargs: dict[str, Any] = {}
    if cfg.tls.certfile and cfg.tls.keyfile:
        kwargs.update(ssl_certfile=cfg.tls.certfile, ssl_keyfile=cfg.tls.keyfile)
    arrivals = service.engine.arrivals
    config = uvicorn.Config(
        arrivals.wrap(service.app),  # counts requests on their way to an engine (arrivals.py)
        host=cfg.host,
        port=cfg.port,
        workers=1,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=GRACE_AFTER_DRAIN_S,
        server_header=False,
        # uvloop and httptools when installed (they are dependencies on Linux and macOS):
        # they halve the event loop's cost per streamed token against asyncio + h11.
        loop="uvloop" if _has("uvloop") else "asyncio",
        http="httptools" if _has("httptools") else "h11",
        ws="none",  # no WebSocket routes (and a WebSocket would count as arriving: arrivals.py)
        **kwargs,
    )
    server = ApplianceServer(config, service)
    arrivals.in_flight = lambda: len(server.server_state.tasks)
    server.run()
    if not server.started and not server.exit_code:
        server.exit_code = exits.ENGINE_GAVE_UP  # the lifespan or the listener failed to start
    if server.exit_code:
        log.error("exiting with status %d", server.exit_code)
        sys.exit(server.exit_code)
    if service.state is not None:
        service.state.mark_clean()
