"""Errors in the Fireworks API's shape. Any check, anywhere in a handler, raises one `ApiError`;
it is turned into the status, JSON error body and headers (`x-request-id`, `Retry-After`) the real
service sends in one place, so clients are tested against the answers they meet in production.
"""

from __future__ import annotations

import uuid
from http import HTTPStatus

from starlette.responses import JSONResponse

from flux_flows.emulator.config import EmulatorConfig

_ERROR_KINDS: dict[int, tuple[str, str]] = {
    400: ("INVALID_ARGUMENT", "invalid_request_error"),
    401: ("UNAUTHENTICATED", "authentication_error"),
    402: ("PAYMENT_REQUIRED", "payment_required_error"),
    403: ("PERMISSION_DENIED", "permission_error"),
    404: ("NOT_FOUND", "not_found_error"),
    405: ("METHOD_NOT_ALLOWED", "invalid_request_error"),
    408: ("DEADLINE_EXCEEDED", "timeout_error"),
    412: ("FAILED_PRECONDITION", "account_suspended_error"),
    413: ("PAYLOAD_TOO_LARGE", "invalid_request_error"),
    429: ("RESOURCE_EXHAUSTED", "rate_limit_error"),
    500: ("INTERNAL", "server_error"),
    502: ("BAD_GATEWAY", "server_error"),
    503: ("UNAVAILABLE", "server_error"),
    504: ("DEADLINE_EXCEEDED", "server_error"),
}
INVALID_KEY_MESSAGE = "The API key you provided is invalid."


class ApiError(Exception):
    """An answer other than an image; raised anywhere in the handler, rendered in one place."""

    def __init__(
        self,
        status: int,
        message: str | None = None,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message or _status_phrase(status)
        self.param = param
        self.headers = headers or {}


def _status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def new_request_id() -> str:
    return uuid.uuid4().hex


def error_response(error: ApiError, request_id: str) -> JSONResponse:
    code, kind = _ERROR_KINDS.get(error.status, ("UNKNOWN", "api_error"))
    body = {
        "error": {"message": error.message, "code": code, "type": kind, "param": error.param},
        "request_id": request_id,
    }
    headers = {"x-request-id": request_id, **error.headers}
    return JSONResponse(body, status_code=error.status, headers=headers)


def _format_retry_after(seconds: float) -> str:
    """Whole seconds as HTTP specifies; fractions kept so fast tests can use sub-second waits."""
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


def retry_after_headers(config: EmulatorConfig) -> dict[str, str]:
    if config.retry_after_s is None:
        return {}
    return {"Retry-After": _format_retry_after(config.retry_after_s)}
