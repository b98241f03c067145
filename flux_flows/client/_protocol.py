"""The protocol loop, written once: retries, and Kontext's submit -> poll -> download.

Like httpx's `Auth.auth_flow`, a generation is a generator that does no I/O of its own. It
yields what to do next and is sent what came of it:

    httpx.Request  -> the httpx.Response (a failure to send is thrown in at the yield)
    Follow(req)    -> the same, following redirects (result URLs may point elsewhere)
    Sleep(s)       -> None, once s seconds have passed
    Offload(fn)    -> fn()'s result (or its exception thrown in): blocking work such as
                      reading an input image, which the async driver runs in a worker thread

and returns the GeneratedImage (or raises a FluxError). `_sync.drive` and `_async.drive` are
the only code that knows how to send or sleep, so the two clients cannot disagree on what is
retried, how long to wait, or what the tallies the batch reads say.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx

from flux_flows.client._config import BaseClient
from flux_flows.client._kontext import (
    KontextModerated,
    KontextReady,
    KontextTask,
    kontext_input_data_uri,
)
from flux_flows.client._wire import (
    RequestBuilder,
    after_attempts,
    build_download,
    download_error,
    error_for_status,
    kontext_poll_request,
    kontext_submit_request,
    parse_download,
    parse_poll,
    parse_response,
    parse_submit,
    shown_base_url,
    text_to_image_request,
)
from flux_flows.errors import APIConnectionError, APITimeoutError, FluxError, RateLimitError
from flux_flows.models import ImageRequest
from flux_flows.results import GeneratedImage

logger = logging.getLogger("flux_flows.client")

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Sleep:
    """Wait before the next step: `time.sleep` or `asyncio.sleep`, whichever the driver has."""

    seconds: float


@dataclass(frozen=True)
class Follow:
    """Send `request` following redirects: only result downloads do, API calls never do."""

    request: httpx.Request


@dataclass(frozen=True)
class Offload:
    """Blocking work the flow needs done; an event loop must not run it on its own thread."""

    call: Callable[[], Any]


Step = httpx.Request | Follow | Sleep | Offload
# What the driver sends back depends on the step (see the module docstring); the small
# `_send`/`_offload` generators below give each answer its type again.
Exchange = Generator[Step, Any, T]
StatusMapper = Callable[[httpx.Response, int], FluxError]
# What came of a step, as a driver saw it: (reply, None), or (None, the exception to throw in).
Outcome = tuple[Any, Exception | None]


@dataclass(frozen=True)
class Done(Generic[T]):
    """A flow that has returned: what its driver hands back to the caller."""

    result: T


def resume(flow: Exchange[T], reply: Any = None, error: Exception | None = None) -> Step | Done[T]:
    """Hand a flow what came of its last step (nothing, to start it); its next step or Done.

    Shared by both drivers so that only the sending and sleeping is written twice.
    """
    try:
        return flow.throw(error) if error is not None else flow.send(reply)
    except StopIteration as stop:
        return Done(stop.value)


def _send(request: httpx.Request | Follow) -> Exchange[httpx.Response]:
    response: httpx.Response = yield request
    return response


def _offload(call: Callable[[], R]) -> Exchange[R]:
    result: R = yield Offload(call)
    return result


def transport_error(
    exc: httpx.TransportError, attempts: int, base_url: str | None = None
) -> APIConnectionError:
    """What a failure to send means to the caller; retried like a 5xx. `base_url`: the one the
    client actually uses (its block's, FIREWORKS_BASE_URL's or the default), named as is."""
    after = after_attempts(attempts)
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(
            f"No answer from Fireworks in time{after} ({type(exc).__name__}). Raise the timeout "
            "or lower the concurrency."
        )
    where = f" at {shown_base_url(base_url)}" if base_url else ""
    return APIConnectionError(
        f"Network error talking to Fireworks{where}{after}: {type(exc).__name__}: {exc}. "
        "Check connectivity and the base URL (a FireworksCredentials block's base_url, else "
        "FIREWORKS_BASE_URL)."
    )


@dataclass
class Tally:
    """HTTP requests one generation took (all retries, polls and downloads), and 429s among them.

    The batch reads both from the image or the error: they are its API-call and pushback counts.
    """

    attempts: int = 0
    throttled: int = 0
    sent_at: float = 0.0  # perf_counter() of the latest request: FLUX.1 latency is per attempt


def generation_flow(
    client: BaseClient[Any, Any], request: ImageRequest, aws_credentials: Any = None
) -> Exchange[GeneratedImage]:
    """One image, FLUX.1 or Kontext, as a flow for a driver.

    Requests are built by the client's pool, so its headers and timeouts apply; whoever drives
    the flow sends them.
    """
    return _GenerationState(client, client._http.build_request, request, aws_credentials).exchange()


class _GenerationState:
    """The state of one generation while its flow runs: what it asked for and what it cost."""

    def __init__(
        self,
        config: BaseClient[Any, Any],
        build: RequestBuilder,
        request: ImageRequest,
        aws_credentials: Any,
    ) -> None:
        self.config = config
        self.build = build
        self.request = request
        self.aws_credentials = aws_credentials
        self.tally = Tally()

    def exchange(self) -> Exchange[GeneratedImage]:
        try:
            if self.request.is_kontext:
                return (yield from self._kontext())
            return (yield from self._text_to_image())
        except FluxError as exc:
            # Failed requests are paid in rate limit if not in money: the batch counts them.
            exc.attempts, exc.throttled = self.tally.attempts, self.tally.throttled
            raise

    def _text_to_image(self) -> Exchange[GeneratedImage]:
        request, tally = self.request, self.tally
        image = yield from self._exchange(
            lambda: text_to_image_request(self.build, request, self.config.response_format),
            lambda response: parse_response(
                request, response, time.perf_counter() - tally.sent_at, tally.attempts
            ),
        )
        return image.model_copy(update={"throttled": tally.throttled}) if tally.throttled else image

    def _kontext(self) -> Exchange[GeneratedImage]:
        """Submit, poll until the task settles, download the sample (it expires: at once)."""
        request, tally, build = self.request, self.tally, self.build
        started = time.perf_counter()
        data_uri = None
        if request.input_image is not None:
            read = functools.partial(kontext_input_data_uri, request, self.aws_credentials)
            data_uri = yield from _offload(read)
        body = request.api_body(input_data_uri=data_uri)  # the image's base64 dies with the flow
        request_id = yield from self._exchange(
            lambda: kontext_submit_request(build, request.model, body), parse_submit
        )
        task = KontextTask(request, request_id, self.config.kontext, self.config.base_url)
        outcome: KontextReady | KontextModerated | None = None
        while outcome is None:
            yield Sleep(task.next_delay())
            answer = yield from self._exchange(
                lambda: kontext_poll_request(build, request.model, request_id), parse_poll
            )
            outcome = task.advance(answer)
        if isinstance(outcome, KontextModerated):
            latency_s = time.perf_counter() - started
            return task.moderated(
                outcome, latency_s, attempts=tally.attempts, throttled=tally.throttled
            )
        url, base_url = outcome.url, self.config.base_url
        data = yield from self._exchange(
            lambda: Follow(build_download(build, url, base_url)),
            parse_download,
            lambda response, attempt: download_error(response, url, attempt),
        )
        latency_s = time.perf_counter() - started
        return task.image(
            data, outcome.seed, latency_s, attempts=tally.attempts, throttled=tally.throttled
        )

    def _exchange(
        self,
        build: Callable[[], httpx.Request | Follow],
        parse: Callable[[httpx.Response], T],
        on_status: StatusMapper | None = None,
    ) -> Exchange[T]:
        """One HTTP exchange, retried per the RetryPolicy: the one retry loop of the client.

        A request is rebuilt for every attempt, as `client.post` would; 2xx answers go to
        `parse`, others to `on_status`, and whatever FluxError comes of it is redacted before
        anyone can print it.
        """
        tally, retry_index = self.tally, 0
        base_url = self.config.base_url
        if on_status is None:
            on_status = functools.partial(error_for_status, base_url=base_url)
        while True:
            attempt = retry_index + 1
            tally.attempts += 1
            tally.sent_at = time.perf_counter()
            try:
                response = yield from _send(build())
            except httpx.TransportError as exc:
                outcome: T | FluxError = transport_error(exc, attempt, base_url)
            else:
                outcome = self._settle(response, attempt, parse, on_status)
            if not isinstance(outcome, FluxError):
                return outcome
            tally.throttled += isinstance(outcome, RateLimitError)
            delay = self._retry_delay(retry_index, outcome)
            if delay is None:
                raise outcome
            self._note_retry(attempt, delay, outcome)
            yield Sleep(delay)
            retry_index += 1

    def _settle(
        self,
        response: httpx.Response,
        attempt: int,
        parse: Callable[[httpx.Response], T],
        on_status: StatusMapper,
    ) -> T | FluxError:
        """One answer: the parsed value, or the FluxError it amounts to (redacted)."""
        try:
            if response.is_success:
                return parse(response)
            return self.config._redact(on_status(response, attempt))
        except FluxError as exc:
            return self.config._redact(exc)

    def _retry_delay(self, retry_index: int, error: FluxError) -> float | None:
        """Seconds to wait before retrying, or None when this failure must not be retried."""
        retry = self.config.retry
        if not error.retryable or retry_index >= retry.max_retries:
            return None
        after = error.retry_after_s if isinstance(error, RateLimitError) else None
        return retry.delay(retry_index, after)

    def _note_retry(self, attempt: int, delay: float, error: FluxError) -> None:
        logger.info(
            "retrying in %.2fs (attempt %d of %d): %s",
            delay,
            attempt + 1,
            self.config.retry.max_retries + 1,
            error,
        )
        if self.config.on_retry is not None:
            self.config.on_retry(attempt, delay, type(error).__name__)
