"""What the middleware share: the refusal callback, path kinds, key fingerprints."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import falcon.asgi

Reject = Callable[[str], None]
Req = falcon.asgi.Request
Resp = falcon.asgi.Response

PROBES = ("/healthz", "/readyz")
# POST routes that generation rate limits count.
GENERATION_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/rerank",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/responses",
)


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    return host in ("localhost", "::1") or host.startswith("127.")


def is_inference(req: Req) -> bool:
    return req.path.startswith("/v1/")


def is_admin(req: Req) -> bool:
    return req.path == "/admin" or req.path.startswith("/admin/")


def refuse(req: Req, reject: Reject, reason: str) -> None:
    """Count a refusal once: the metrics' response hook skips requests marked here."""
    req.context.rejected = reason
    reject(reason)


def fingerprint(key: str) -> str:
    """A short, non-reversible name for a key, safe to log."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]
