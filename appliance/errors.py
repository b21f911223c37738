"""Domain exceptions. No HTTP here: api/errors.py maps each type to a status once."""

from __future__ import annotations

from typing import Optional


class ApplianceError(Exception):
    """Base of every error the appliance answers with an OpenAI error object."""

    type = "server_error"
    code: Optional[str] = None

    def __init__(
        self,
        message: str,
        *,
        param: Optional[str] = None,
        code: Optional[str] = None,
        retry_after: Optional[float] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after


class InvalidRequest(ApplianceError):
    type = "invalid_request_error"
    code = "invalid_request"


class PromptTooLong(InvalidRequest):
    code = "context_length_exceeded"


class Unauthorized(ApplianceError):
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ApplianceError):
    type = "permission_error"
    code = "forbidden"


class ForbiddenHost(Forbidden):
    code = "forbidden_host"


class AdminClosed(Forbidden):
    code = "admin_disabled"


class NotFound(ApplianceError):
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class BodyTooLarge(ApplianceError):
    type = "invalid_request_error"
    code = "request_too_large"


class QueueFull(ApplianceError):
    """All running slots and queue places are taken, or none freed in time."""

    type = "rate_limit_error"
    code = "server_busy"


class RateLimited(ApplianceError):
    type = "rate_limit_error"
    code = "rate_limited"


class Unavailable(ApplianceError):
    """Base of the 503s: shedding, draining, not ready, out of memory, helper down."""

    type = "service_unavailable"
    code = "unavailable"


class Shedding(Unavailable):
    code = "overloaded"


class Draining(Unavailable):
    code = "draining"


class NotReady(Unavailable):
    code = "not_ready"


class InsufficientMemory(Unavailable):
    code = "insufficient_memory"


class HelperUnavailable(Unavailable):
    code = "helper_unavailable"


class SafeModeOn(Unavailable):
    """Safe mode is on and the request needs a model that is not loaded: safe mode loads none by
    itself (the answer carries X-Safe-Mode: on)."""

    code = "safe_mode"


class ModelLoadError(ApplianceError):
    """A model could not be loaded (missing folder, not in the hub cache, bad files)."""

    type = "invalid_request_error"
    code = "model_load_failed"


class EngineFailure(ApplianceError):
    type = "server_error"
    code = "engine_failure"


class ClientGone(ApplianceError):
    """The client closed its connection before it was answered (logged as 499, nginx's
    "client closed request"; nobody reads the body)."""

    code = "client_closed"


class RequestTimeout(ApplianceError):
    type = "server_error"
    code = "request_timeout"
