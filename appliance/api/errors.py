"""The one place where exception types become HTTP statuses and OpenAI error objects."""

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


def status_of(exc: e.ApplianceError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]  # type: ignore[index]
    return 500


def error_body(
    message: str, type_: str, param: Optional[str] = None, code: Optional[str] = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def body_of(exc: e.ApplianceError) -> dict[str, Any]:
    return error_body(exc.message, exc.type, exc.param, exc.code)


def _write(resp: falcon.asgi.Response, status: int, body: dict[str, Any]) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.data = orjson.dumps(body)
    resp.sse = None  # type: ignore[assignment]


async def handle_appliance_error(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, ex: e.ApplianceError, params: Any
) -> None:
    status = status_of(ex)
    _write(resp, status, body_of(ex))
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
    _write(
        resp,
        500,
        error_body("internal error; see the server log", "server_error", None, "internal_error"),
    )
    req.context.error_code = "internal_error"


def install(app: falcon.asgi.App) -> None:
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    app.add_error_handler(e.ApplianceError, handle_appliance_error)
