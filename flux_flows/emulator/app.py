"""The ASGI application: Starlette routes for generation, Kontext submit, poll and result download
and the `/_emulator/*` control endpoints (guarded by `control`), a meter counting API traffic, and the handlers that put
parsing, markers, state and pictures together in the order the real API applies them.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import json
import logging
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flux_flows.emulator.config import (
    GENERATION_PATH,
    GENERATION_RE,
    KONTEXT_RESULT_PATH,
    KONTEXT_SUBMIT_PATH,
    RESULTS_PATH,
    EmulatorConfig,
    EmulatorStats,
    Mode,
)
from flux_flows.emulator.control import check_control_request, new_control_token
from flux_flows.emulator.errors import (
    ApiError,
    error_response,
    new_request_id,
    retry_after_headers,
)
from flux_flows.emulator.limits import BodyLimit
from flux_flows.emulator.markers import Markers, parse_markers
from flux_flows.emulator.parsing import (
    ParsedRequest,
    check_auth,
    jpeg_quality,
    json_object,
    negotiate,
    parse_generation,
    parse_kontext,
)
from flux_flows.emulator.pictures import HTML_PAGE, garbage_bytes, image_bytes, kontext_image_bytes
from flux_flows.emulator.state import EmulatorState, KontextTask, monotonic_now
from flux_flows.models import KONTEXT_MODELS, MAX_SEED, MODELS

_CONTENT_TYPES: dict[str, str] = {"jpeg": "image/jpeg", "png": "image/png"}
Endpoint = Callable[[Request], Awaitable[Response]]

_dropping: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "flux_emulator_dropping", default=False
)


class _QuietDrops(logging.Filter):
    """Hides uvicorn's error line for connections we cut on purpose (`[[fault:drop]]`) only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_dropping.get() and "without completing response" in str(record.msg))


def install_log_filter() -> None:
    target = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietDrops) for f in target.filters):
        target.addFilter(_QuietDrops())


class _DroppedResponse(Response):
    """Promises the whole body, sends half, and returns: uvicorn then closes the connection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        await send(
            {
                "type": "http.response.body",
                "body": self.body[: len(self.body) // 2],
                "more_body": True,
            }
        )
        _dropping.set(True)


class _Meter:
    """Counts generation-route traffic around the whole handler, latency and body included.

    A request is counted as finished just before its last body chunk goes out, so by the time a
    client holds a complete answer, the stats already include it (tests read them right away).
    """

    def __init__(self, app: ASGIApp, stats: EmulatorStats) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not GENERATION_RE.match(scope["path"]):
            await self.app(scope, receive, send)
            return
        status, finished = 500, False

        def finish() -> None:
            nonlocal finished
            if not finished:
                finished = True
                self.stats.record_finish(status)

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                finish()
            await send(message)

        self.stats.record_start()
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            finish()


async def _client_stayed(request: Request, seconds: float) -> bool:
    """Wait `seconds`, or less if the client hangs up (then a timed-out client frees its slot)."""
    if seconds <= 0:
        return True
    try:
        async with asyncio.timeout(seconds):
            while (await request.receive())["type"] != "http.disconnect":
                pass
    except TimeoutError:
        return True
    return False


def _generation_key(gen: ParsedRequest, seed: int, mode: Mode) -> tuple[Any, ...]:
    return (
        gen.model,
        gen.prompt,
        seed,
        gen.aspect_ratio,
        gen.num_inference_steps,
        gen.guidance_scale,
        gen.safety_check,
        mode,
    )


def _is_filtered(gen: ParsedRequest, words: tuple[str, ...]) -> bool:
    lowered = gen.prompt.lower()
    return gen.safety_check and any(word.lower() in lowered for word in words if word)


@dataclass(frozen=True)
class _Answer:
    """How to answer one admitted request: format, headers and the fault to inject, if any."""

    request_id: str
    mode: Mode
    quality: int
    seed: int
    limit_headers: dict[str, str]
    fault: str | None


def _image_response(data: bytes, answer: _Answer, finish: str) -> Response:
    headers = {"x-request-id": answer.request_id, **answer.limit_headers}
    if answer.mode == "json":
        data_uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        document = {
            "id": answer.request_id,
            "base64": [data_uri],
            "finishReason": finish,
            "seed": answer.seed,
        }
        body, media_type = json.dumps(document).encode(), "application/json"
    else:
        headers = {"Seed": str(answer.seed), "Finish-Reason": finish, **headers}
        body, media_type = data, _CONTENT_TYPES[answer.mode]
    response_cls = _DroppedResponse if answer.fault == "drop" else Response
    return response_cls(body, media_type=media_type, headers=headers)


async def _validated(request: Request, config: EmulatorConfig) -> ParsedRequest:
    """Checks in the API's order: key, then model, then body."""
    check_auth(request.headers.get("authorization"), config.api_key)
    model = request.path_params["model"]
    if model not in MODELS:
        raise ApiError(404, f"Model not found, inaccessible, and/or not deployed: {model}")
    return parse_generation(await request.body(), model)


def _raise_forced_status(markers: Markers, config: EmulatorConfig) -> None:
    if markers.status is not None:
        extra = retry_after_headers(config) if markers.status == 429 else {}
        raise ApiError(markers.status, headers=extra)


async def _answer(state: EmulatorState, gen: ParsedRequest, answer: _Answer) -> Response:
    """Produce (and bill) the image, then apply the requested delivery fault."""
    if answer.fault == "html":
        return HTMLResponse(HTML_PAGE, headers={"x-request-id": answer.request_id})
    if answer.fault == "json-no-images":
        body = {
            "id": answer.request_id,
            "base64": [],
            "finishReason": "SUCCESS",
            "seed": answer.seed,
        }
        return JSONResponse(body, headers={"x-request-id": answer.request_id})
    filtered = _is_filtered(gen, state.config.filter_words)
    data = await anyio.to_thread.run_sync(
        image_bytes, gen, answer.seed, answer.mode, answer.quality, filtered, state.config.image_kb
    )
    state.stats.record_generation(_generation_key(gen, answer.seed, answer.mode))
    if answer.fault == "truncate":
        data = data[: len(data) // 2]
    elif answer.fault == "garbage":
        data = garbage_bytes()
    return _image_response(data, answer, "CONTENT_FILTERED" if filtered else "SUCCESS")


async def _generate(request: Request, state: EmulatorState, request_id: str) -> Response:
    config = state.config
    gen = await _validated(request, config)
    markers = parse_markers(gen.prompt)
    _raise_forced_status(markers, config)
    limit_headers = state.admit(gen, markers)
    answer = _Answer(
        request_id=request_id,
        mode=negotiate(request.headers.get("accept")),
        quality=jpeg_quality(request.headers.get("jpeg-quality")),
        seed=gen.seed or secrets.randbelow(MAX_SEED) + 1,
        limit_headers=limit_headers,
        fault=markers.mode,
    )
    delay = config.latency_s + random.uniform(0, config.jitter_s) + markers.slow_s
    if not await _client_stayed(request, delay):
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    return await _answer(state, gen, answer)


def _check_kontext_model(request: Request, config: EmulatorConfig) -> str:
    """Key first, then model, as on the generation route."""
    check_auth(request.headers.get("authorization"), config.api_key)
    model = request.path_params["model"]
    if model not in KONTEXT_MODELS:
        raise ApiError(404, f"Model not found, inaccessible, and/or not deployed: {model}")
    return model


async def _kontext_submit(request: Request, state: EmulatorState, request_id: str) -> Response:
    config = state.config
    model = _check_kontext_model(request, config)
    # Decoding a multi-megabyte data URI is CPU work: keep it off the event loop.
    job, input_bytes = await anyio.to_thread.run_sync(parse_kontext, await request.body(), model)
    markers = parse_markers(job.prompt)
    _raise_forced_status(markers, config)
    limit_headers = state.admit(job, markers)
    origin = config.kontext_results_url or str(request.base_url)
    task = KontextTask(
        id=request_id,
        job=job,
        seed=job.seed or secrets.randbelow(MAX_SEED) + 1,
        markers=markers,
        created=monotonic_now(),
        results_origin=origin.rstrip("/"),
        input_bytes=input_bytes,
    )
    state.add_task(task)
    headers = {"x-request-id": request_id, **limit_headers}
    return JSONResponse({"request_id": task.id}, headers=headers)


async def _kontext_poll(request: Request, state: EmulatorState, _request_id: str) -> Response:
    model = _check_kontext_model(request, state.config)
    body = json_object(await request.body())
    task_id = body.get("id")
    if not isinstance(task_id, str) or not task_id:
        raise ApiError(400, "id is required: the request_id the submit answered", param="id")
    return JSONResponse(state.poll(model, task_id))


async def _kontext_result(request: Request, state: EmulatorState, _request_id: str) -> Response:
    """A result download: no key needed (a signed URL in real life); who sent one is counted."""
    task = state.ready_task(request.path_params["name"])
    if task is None:
        raise ApiError(404, "No such result (unknown, not ready, or expired)")
    state.stats.record_download(with_auth="authorization" in request.headers)
    if task.image is None:
        task.image = await anyio.to_thread.run_sync(kontext_image_bytes, task)
        task.input_bytes = None
    return Response(task.image, media_type=_CONTENT_TYPES[task.job.output_format])


def _config_changes(raw: bytes) -> dict[str, Any]:
    try:
        changes = json.loads(raw or b"{}")
    except ValueError:
        raise ApiError(400, "body must be a JSON object of settings") from None
    if not isinstance(changes, dict):
        raise ApiError(400, "body must be a JSON object of settings")
    if isinstance(changes.get("filter_words"), list):
        changes["filter_words"] = tuple(changes["filter_words"])
    return changes


ApiHandler = Callable[[Request, EmulatorState, str], Awaitable[Response]]


def _api(handler: ApiHandler, state: EmulatorState) -> Endpoint:
    """An API route: an `ApiError` becomes the real API's error body, under the request's id."""

    async def endpoint(request: Request) -> Response:
        request_id = new_request_id()
        try:
            return await handler(request, state, request_id)
        except ApiError as error:
            return error_response(error, request_id)

    return endpoint


def _guarded(handler: Endpoint, token: str, *, change: bool) -> Endpoint:
    """A control route, answered only to a request that passes `control` (with `token`)."""

    async def endpoint(request: Request) -> Response:
        try:
            check_control_request(request, token, change=change)
        except ApiError as error:
            return error_response(error, new_request_id())
        return await handler(request)

    return endpoint


def _control_routes(state: EmulatorState, token: str) -> list[Route]:
    """`/_emulator/*`: the stats and config read by tests and benchmarks, and the changes."""
    config, stats = state.config, state.stats

    async def read_stats(request: Request) -> Response:
        return JSONResponse(stats.as_dict())

    async def read_config(request: Request) -> Response:
        return JSONResponse(config.public_dict())

    async def change_config(request: Request) -> Response:
        try:
            state.configure(_config_changes(await request.body()))
        except ApiError as error:
            return error_response(error, new_request_id())
        except (TypeError, ValueError) as error:
            return error_response(ApiError(400, str(error)), new_request_id())
        return JSONResponse(config.public_dict())

    async def reset(request: Request) -> Response:
        state.reset()
        return JSONResponse(stats.as_dict())

    return [
        Route("/_emulator/stats", _guarded(read_stats, token, change=False), methods=["GET"]),
        Route("/_emulator/config", _guarded(read_config, token, change=False), methods=["GET"]),
        Route("/_emulator/config", _guarded(change_config, token, change=True), methods=["POST"]),
        Route("/_emulator/reset", _guarded(reset, token, change=True), methods=["POST"]),
    ]


async def _http_error(request: Request, exc: Exception) -> Response:
    """No route, or a method not allowed: answered in the API's error shape, as the real one."""
    assert isinstance(exc, HTTPException)
    message = (
        f"No route for {request.method} {request.url.path}"
        if exc.status_code == 404
        else f"Method {request.method} is not allowed on {request.url.path}"
    )
    error = ApiError(exc.status_code, message, headers=dict(exc.headers or {}))
    return error_response(error, new_request_id())


def create_app(
    config: EmulatorConfig, stats: EmulatorStats, *, control_token: str | None = None
) -> Starlette:
    """The ASGI app alone, for embedding in another server or an in-process ASGI transport.

    `control_token` is what changes through `/_emulator/config` and `/_emulator/reset` must
    carry (see `control`); without one a random token is made. It is `app.state.control_token`.
    """
    state = EmulatorState(config, stats)
    token = control_token if control_token else new_control_token()
    app = Starlette(
        routes=[
            Route(GENERATION_PATH, _api(_generate, state), methods=["POST"]),
            Route(KONTEXT_SUBMIT_PATH, _api(_kontext_submit, state), methods=["POST"]),
            Route(KONTEXT_RESULT_PATH, _api(_kontext_poll, state), methods=["POST"]),
            Route(RESULTS_PATH, _api(_kontext_result, state), methods=["GET"]),
            *_control_routes(state, token),
        ],
        # The meter outside, so a refused body is counted like any other answer.
        middleware=[Middleware(_Meter, stats=stats), Middleware(BodyLimit)],
        exception_handlers={404: _http_error, 405: _http_error},
    )
    app.router.redirect_slashes = False  # the real API answers 404, not a redirect
    app.state.emulator = state
    app.state.control_token = token
    return app
