"""The status page: GET /status (HTML, rendered here), its script, style and icon, and
GET /status.json (the snapshot the script polls). Access rules: `appliance.status.access`.

Everything the page loads ships in the package (api/status_assets/): no build step, no CDN.
The Content-Security-Policy allows only this server's own script and style, no inline code.
"""

from __future__ import annotations

import html
from importlib import resources
from string import Template
from typing import Optional

import falcon
import falcon.asgi
import orjson

from ..config import SecurityConfig
from ..errors import AdminClosed, Unauthorized
from ..status import Access, StatusBoard, access_for
from ..status.access import ASSETS, DATA, PAGE

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
KEY_NOTE = (
    "This appliance has an admin key: enter it to see its status. The key stays in this browser "
    "tab (sessionStorage) and goes to the server only as an Authorization header."
)


def asset(name: str) -> bytes:
    return (resources.files(__package__) / "status_assets" / name).read_bytes()


def _headers(resp: falcon.asgi.Response, cache: str = "no-store") -> None:
    resp.set_header("X-Content-Type-Options", "nosniff")
    resp.set_header("X-Frame-Options", "DENY")
    resp.set_header("Referrer-Policy", "no-referrer")
    resp.set_header("Cache-Control", cache)


def _check(req: falcon.asgi.Request, kind: str, security: SecurityConfig) -> Access:
    """The auth middleware decided already; decide again so that a stack without it is closed."""
    access = access_for(req, kind, security)
    if not access.allowed:
        if access.status == 401:
            raise Unauthorized(access.message)
        raise AdminClosed(access.message)
    return access


def render_page(template: Template, access: Access, refresh_s: float) -> bytes:
    """The page's HTML for this access mode: the key form (an admin key is set), or the board
    with the reason it is read-only."""
    keyed = access.mode == "key"
    note = access.message[:1].upper() + access.message[1:] if not keyed else ""
    return template.substitute(
        mode=access.mode,
        refresh=f"{refresh_s:g}",
        key_hidden="" if keyed else " hidden",
        board_hidden=" hidden",  # the script shows it once the first snapshot came
        note_hidden=" hidden" if keyed else "",
        note=html.escape(note),
        key_note=html.escape(KEY_NOTE),
    ).encode()


class StatusPage:
    """GET /status: the page (no data in it: the script fetches /status.json)."""

    def __init__(self, security: SecurityConfig, refresh_s: float) -> None:
        self.security = security
        self.refresh_s = refresh_s
        self.template = Template(asset("status.html").decode())

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        access = _check(req, "page", self.security)
        _headers(resp)
        resp.set_header("Content-Security-Policy", CSP)
        resp.content_type = "text/html; charset=utf-8"
        resp.data = render_page(self.template, access, self.refresh_s)


class StatusAsset:
    """GET /status/app.js, app.css, icon.svg: the page's own files, read once."""

    def __init__(self, name: str, security: SecurityConfig) -> None:
        self.security = security
        self.body = asset(name)
        self.type = TYPES[name[name.rindex(".") :]]

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        _check(req, "page", self.security)
        _headers(resp, "no-cache")
        resp.content_type = self.type
        resp.data = self.body


class StatusData:
    """GET /status.json: one snapshot of everything the page shows."""

    def __init__(self, board: StatusBoard, security: SecurityConfig, refresh_s: float) -> None:
        self.board = board
        self.security = security
        self.refresh_s = refresh_s

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        access = _check(req, "data", self.security)
        _headers(resp)
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps(self.board.snapshot(access, self.refresh_s))


def add_routes(
    app: falcon.asgi.App,
    board: StatusBoard,
    security: SecurityConfig,
    refresh_s: float,
    assets: Optional[dict[str, str]] = None,
) -> None:
    """Register /status, its files and /status.json."""
    app.add_route(PAGE, StatusPage(security, refresh_s))
    app.add_route(DATA, StatusData(board, security, refresh_s))
    for path, name in (assets or ASSETS).items():
        app.add_route(path, StatusAsset(name, security))
