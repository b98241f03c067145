"""Request bodies refused while they arrive, not after: an ASGI middleware in front of every route.

A handler that calls `request.body()` buffers the whole body before it can see its size, so one
600 MB chunked POST once took the emulator from 44 MB to 1.2 GB before its 413. Here:

- a `Content-Length` over the route's limit is answered 413 at once, before a byte of the body
  is read;
- a body without one (chunked) is counted as it streams: the chunk that passes the limit raises
  `BodyTooLarge` (an `ApiError(413)`) inside the handler's `receive`, so the handler answers
  with the emulator's usual error body, and nothing past the limit is kept;
- every such 413 says `Connection: close`, and so does any answer sent before its request's body
  was read (a 401 for a missing key, say): the server then stops reading the connection instead
  of draining the rest of an upload nobody wants.

The limits are the API's: `KONTEXT_MAX_BODY_BYTES` for a Kontext submit (its input image travels
as a data URI), `MAX_BODY_BYTES` for everything else.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flux_flows.emulator.config import KONTEXT_MAX_BODY_BYTES, MAX_BODY_BYTES
from flux_flows.emulator.errors import ApiError, error_response, new_request_id

__all__ = ["BodyLimit", "BodyTooLarge", "body_limit_for"]

_KONTEXT_SUBMIT_RE = re.compile(r"^/inference/v1/workflows/accounts/fireworks/models/[^/]+$")
_CLOSE = (b"connection", b"close")


class BodyTooLarge(ApiError):
    """A request body past its route's limit: the 413 every route answers, connection closed."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413, f"request body is larger than {limit} bytes", headers={"Connection": "close"}
        )


def body_limit_for(path: str) -> int:
    """The most bytes a request body to `path` may have."""
    return KONTEXT_MAX_BODY_BYTES if _KONTEXT_SUBMIT_RE.match(path) else MAX_BODY_BYTES


def _declared_length(scope: Scope) -> int | None:
    """The Content-Length the request announced (the server already refused malformed ones)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


def _has_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return value.strip() not in (b"", b"0")
    return False


class BodyLimit:
    """Refuses over-limit bodies from their announced length, or as they stream (see module)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = body_limit_for(scope["path"])
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await error_response(BodyTooLarge(limit), new_request_id())(scope, receive, send)
            return

        received = 0
        body_done = not _has_body(scope)
        started = False

        async def counted_receive() -> Message:
            nonlocal received, body_done
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
                if not message.get("more_body", False):
                    body_done = True
            return message

        async def closing_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", ()))
                if not body_done and _CLOSE not in headers:
                    # Answered before the body was read: stop reading it, do not drain it.
                    message = {**message, "headers": [*headers, _CLOSE]}
            await send(message)

        try:
            await self.app(scope, counted_receive, closing_send)
        except BodyTooLarge as error:
            if started:
                raise
            await error_response(error, new_request_id())(scope, receive, closing_send)
