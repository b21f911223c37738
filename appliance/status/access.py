"""Who may see the status page and its data: one pure decision, used by the auth middleware
and again by the resources (so a `middleware:` list without `auth` stays closed, never open).

- An admin key is set: the page's shell (HTML, script, style: no data) is served to anyone the
  host guard lets through; /status.json needs the admin key (401 without it), from every address,
  loopback too. With the key, the page offers the admin actions.
- No admin key is set: the page and its data are open, read-only, to clients on this machine
  (a loopback peer, a loopback Host name, no proxy in between); others get 403 saying how to set
  a key. Admin actions are off.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from typing import Any, Optional

PAGE = "/status"
DATA = "/status.json"
# The page's own files: fixed names, shipped in the package (appliance/api/status_assets/).
ASSETS = {
    "/status/app.js": "app.js",
    "/status/app.css": "app.css",
    "/status/icon.svg": "icon.svg",
}
# What the admin rate limit counts besides POSTs to /admin: loading the page, and its data.
RATE_LIMITED = (PAGE, DATA)
# A request that came through a proxy says so in one of these; its peer address is the proxy's.
FORWARDED_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")
# The page polls at most this often; slower when the admin rate limit would not allow it.
BASE_REFRESH_S = 5.0


@dataclass(frozen=True)
class Access:
    """The decision for one request to the status page or its data."""

    allowed: bool
    status: int  # 200, or 401 / 403 when refused
    mode: str  # "key": an admin key is set; "open": none is, loopback clients read only
    admin: bool  # the admin key was presented: the page may offer load, unload, safe-mode exit
    message: str  # why it was refused, or why the admin actions are off ("" when they are on)


def kind_of(path: str) -> Optional[str]:
    """ "page" (the HTML and its files), "data" (/status.json), or None for other paths."""
    if path == DATA:
        return "data"
    if path == PAGE or path in ASSETS:
        return "page"
    return None


def decide(
    kind: str, *, admin_configured: bool, is_admin: bool, local: bool, admin_env: str
) -> Access:
    """The status page's access rules (module docstring) as one pure function."""
    if admin_configured:
        if kind == "page" or is_admin:
            return Access(True, 200, "key", is_admin, "" if is_admin else "enter the admin key")
        return Access(
            False,
            401,
            "key",
            False,
            "the status data needs the admin key: send Authorization: Bearer <key>",
        )
    off = (
        f"admin actions are off: no admin key is set; set {admin_env} "
        "(or security.admin_keys) and restart"
    )
    if local:
        return Access(True, 200, "open", False, off)
    return Access(
        False,
        403,
        "open",
        False,
        "the status page is open only to clients on this machine while no admin key is set; "
        f"set {admin_env} (or security.admin_keys) and restart to open it to others with the key",
    )


def is_loopback_address(addr: Optional[str]) -> bool:
    """Whether a peer address is this machine's loopback (IPv4, IPv6, or IPv4 mapped in v6)."""
    if not addr:
        return False
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def is_loopback_host(host: Optional[str]) -> bool:
    """Whether a Host header names this machine's loopback (a DNS-rebinding page names its own
    host, so a loopback peer alone is not enough)."""
    if not host:
        return False
    host = host.strip().lower()
    if host.startswith("["):
        name = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        name = host.rsplit(":", 1)[0]
    else:
        name = host
    if name in ("localhost", "::1") or name.endswith(".localhost"):
        return True
    return is_loopback_address(name)


def is_local_client(
    remote_addr: Optional[str], host: Optional[str], forwarded: bool, behind_proxy: bool
) -> bool:
    """A client on this machine: loopback peer and Host, and no proxy in between (a proxy on
    this machine would make every client look local)."""
    if forwarded or behind_proxy:
        return False
    return is_loopback_address(remote_addr) and is_loopback_host(host)


def access_for(req: Any, kind: str, security: Any) -> Access:
    """`decide` for a Falcon request; `req.context.is_admin` is set by the auth middleware."""
    forwarded = any(req.get_header(h) for h in FORWARDED_HEADERS)
    local = is_local_client(
        req.remote_addr, req.get_header("Host"), forwarded, security.behind_tls_proxy
    )
    return decide(
        kind,
        admin_configured=bool(security.admin_keys),
        is_admin=bool(getattr(req.context, "is_admin", False)),
        local=local,
        admin_env=security.admin_keys_env,
    )


def refresh_interval(admin_limit: Optional[str], base: float = BASE_REFRESH_S) -> float:
    """Seconds between the page's refreshes: `base`, or slower so that polling takes at most
    half of each window of the admin rate limit (the rest is left to the admin actions)."""
    if not admin_limit:
        return base
    from limits import parse_many

    slowest = base
    for item in parse_many(admin_limit):
        slowest = max(slowest, 2 * item.get_expiry() / item.amount)
    return float(math.ceil(slowest))
