"""The one place where exception types become HTTP statuses and error objects: OpenAI's on
every route but Anthropic's Messages API (/v1/messages...), which answers Anthropic's shape.

On the Anthropic routes two statuses differ, as Anthropic's own API answers them: a full server
(429 server_busy elsewhere) and every 503 (shedding, draining, not ready, ...) are 529
`overloaded_error`, which Anthropic clients know to retry; a per-key rate limit stays 429
`rate_limit_error`. Both keep Retry-After.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import falcon
import falcon.asgi
import orjson

from .. import errors as e

log = logging.getLogger("appliance.api")

# Most specific first; the first class in an exception's MRO found here decides.
STATUS: dict[type[e.ApplianceError], int] = {
    e.InvalidRequest: 400,
    e.ModelLoadError: 400,
    e.Unauthorized: 401,
    e.Forbidden: 403,
    e.NotFound: 404,
    e.BodyTooLarge: 413,
    e.QueueFull: 429,
    e.ClientGone: 499,
    e.RateLimited: 429,
    e.Unavailable: 503,
    e.RequestTimeout: 504,
    e.EngineFailure: 500,
    e.ApplianceError: 500,
}


# Anthropic's error types by the status the appliance answers elsewhere.
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    411: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    499: "api_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
OVERLOADED = 529


def is_anthropic(path: str) -> bool:
    """Whether `path` belongs to Anthropic's Messages API (its error shape and statuses)."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def status_of(exc: e.ApplianceError, anthropic: bool = False) -> int:
    status = 500
    for cls in type(exc).__mro__:
        if cls in STATUS:
            status = STATUS[cls]  # type: ignore[index]
            break
    if anthropic and (status == 503 or isinstance(exc, e.QueueFull)):
        return OVERLOADED
    return status


def anthropic_body(status: int, message: str, request_id: Optional[str] = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "error",
        "error": {"type": ANTHROPIC_TYPES.get(status, "api_error"), "message": message},
    }
    if request_id:
        body["request_id"] = request_id
    return body


def error_body(
    message: str, type_: str, param: Optional[str] = None, code: Optional[str] = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def body_of(exc: e.ApplianceError) -> dict[str, Any]:
    return error_body(exc.message, exc.type, exc.param, exc.code)


def anthropic_body_of(exc: e.ApplianceError) -> dict[str, Any]:
    """The Anthropic error object of `exc` (a field error names its field in the message)."""
    message = exc.message
    if exc.param and exc.param not in message:
        message = f"{exc.param}: {message}"
    return anthropic_body(status_of(exc, anthropic=True), message)


def _write(resp: falcon.asgi.Response, status: int, body: dict[str, Any]) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps(body)
    resp.sse = None  # type: ignore[assignment]


async def handle_appliance_error(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, ex: e.ApplianceError, params: Any
) -> None:
    if is_anthropic(req.path):
        status = status_of(ex, anthropic=True)
        body = anthropic_body_of(ex)
        rid = getattr(req.context, "request_id", None)
        if rid:
            body["request_id"] = rid
    else:
        status = status_of(ex)
        body = body_of(ex)
    _write(resp, status, body)
    if ex.retry_after is not None:
        resp.set_header("Retry-After", str(max(1, math.ceil(ex.retry_after))))
    req.context.error_code = ex.code


_HTTP_TYPES = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    411: ("invalid_request_error", "length_required"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
}


async def handle_http_error(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, ex: falcon.HTTPError, params: Any
) -> None:
    status = ex.status_code
    type_, code = _HTTP_TYPES.get(status, ("server_error", "error"))
    if status == 404:
        message = f"no route {req.method} {req.path}"
    elif status == 405:
        message = f"method {req.method} is not allowed on {req.path}"
    else:
        message = ex.description or ex.title or "error"
    if is_anthropic(req.path):
        rid = getattr(req.context, "request_id", None)
        _write(resp, status, anthropic_body(status, message, rid))
    else:
        _write(resp, status, error_body(message, type_, None, code))
    headers = ex.headers or {}
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers)
    for name, value in pairs:
        resp.set_header(str(name), str(value))
    req.context.error_code = code


async def handle_unexpected(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, ex: Exception, params: Any
) -> None:
    log.exception("unhandled error on %s %s", req.method, req.path)
    message = "internal error; see the server log"
    if is_anthropic(req.path):
        body = anthropic_body(500, message, getattr(req.context, "request_id", None))
    else:
        body = error_body(message, "server_error", None, "internal_error")
    _write(resp, 500, body)
    req.context.error_code = "internal_error"


def install(app: falcon.asgi.App) -> None:
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    app.add_error_handler(e.ApplianceError, handle_appliance_error)
