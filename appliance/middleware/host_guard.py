"""DNS-rebinding defence for a server bound to loopback."""

from __future__ import annotations

from ..config import ServerConfig
from ..errors import ForbiddenHost
from .common import Reject, Req, Resp, is_loopback, refuse


class HostGuard:
    """DNS-rebinding defence: bound to loopback, only loopback Host names (or allowed_hosts)."""

    LOOPBACK = ("localhost", "127.0.0.1", "::1", "[::1]")

    def __init__(self, cfg: ServerConfig, reject: Reject) -> None:
        self.active = is_loopback(cfg.host)
        self.allowed = {h.lower() for h in cfg.allowed_hosts}
        self.reject = reject

    def _host_ok(self, host: str) -> bool:
        host = host.lower()
        name = (
            host.rsplit(":", 1)[0]
            if host.count(":") == 1 or host.startswith("[") and "]:" in host
            else host
        )
        if (
            name.startswith("127.")
            or name in self.LOOPBACK
            or host in self.allowed
            or name in self.allowed
        ):
            return True
        return name.endswith(".localhost")

    async def process_request(self, req: Req, resp: Resp) -> None:
        if not self.active:
            return
        host = req.get_header("Host") or ""
        if not self._host_ok(host):
            refuse(req, self.reject, "forbidden_host")
            raise ForbiddenHost(
                f"Host {host!r} is not allowed on a loopback-bound server; add it to "
                "server.allowed_hosts",
            )
