"""The exception family. Each message says what to do next; none ever contains the API key.

Callers catch `FluxError` for "the generation did not happen" and a subclass when the remedy
differs: fix the key, fix the request, slow down, try later, or report a broken answer.
"""

from __future__ import annotations


class FluxError(Exception):
    """Base of every error this library raises about a generation."""

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        request_id: str | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.request_id = request_id
        # HTTP requests this failure took: the batch counts API calls, failed ones included.
        self.attempts = attempts
        # How many of them were answered 429: the batch slows down when the API pushes back.
        self.throttled = 0

    def __str__(self) -> str:
        parts = [self.message]
        if self.status_code is not None:
            parts.append(f"(HTTP {self.status_code})")
        if self.request_id:
            parts.append(f"[request id {self.request_id}]")
        return " ".join(parts)


class MissingCredentialsError(FluxError):
    """No API key anywhere: raised before any request is sent."""


class AuthenticationError(FluxError):
    """The key was refused (401), lacks access (403), or the account cannot pay (402/412)."""


class InvalidRequestError(FluxError):
    """The API rejected the request itself (400/404/405/413): retrying the same request is useless."""


class RateLimitError(FluxError):
    """Over the account's quota (429) after every retry."""

    retryable = True

    def __init__(
        self, message: str, *, retry_after_s: float | None = None, **kwargs: object
    ) -> None:
        # FluxError's keywords are typed one by one; these are exactly the ones a caller passed it.
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.retry_after_s = retry_after_s


class ServerError(FluxError):
    """The API or a gateway failed (408/5xx/520) after every retry."""

    retryable = True


class APIConnectionError(FluxError):
    """The network failed or the answer did not arrive in time, after every retry."""

    retryable = True


class APITimeoutError(APIConnectionError):
    """No answer within the timeout."""


class ResponseError(FluxError):
    """The API answered 2xx but the answer is not a usable image (truncated, not an image, no data)."""


class StorageError(FluxError):
    """Storing or reading an object failed (missing bucket, denied, unreachable endpoint)."""


class PromptSourceError(ValueError):
    """A prompt file or object cannot be read or parsed; the message names the line."""


class BatchFailedError(FluxError):
    """A batch run with `fail_on_error=True` had failed images; `.report` has every record."""

    def __init__(self, message: str, *, report: object) -> None:
        super().__init__(message)
        self.report = report


class PrefectStartupError(RuntimeError):
    """Prefect's temporary API server did not start in time, before the flow could run.

    Not a FluxError: nothing was sent to Fireworks. The message says the three ways out, because
    Prefect's own text ("Timed out while attempting to connect to ephemeral Prefect API server")
    does not say what to do.
    """
