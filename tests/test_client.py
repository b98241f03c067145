"""FluxClient / AsyncFluxClient against the emulator over real HTTP, plus their small parsers."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
from PIL import Image

from flux_flows.client import AsyncFluxClient, FluxClient, RetryPolicy
from flux_flows.client._kontext import image_size, sniff_image
from flux_flows.client._protocol import Sleep, generation_flow
from flux_flows.client._wire import api_error_message, parse_response, parse_retry_after
from flux_flows.errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    InvalidRequestError,
    MissingCredentialsError,
    RateLimitError,
    ResponseError,
    ServerError,
)
from flux_flows.models import FinishReason, ImageRequest
from flux_flows.results import GeneratedImage
from helpers.common import TEST_API_KEY

FAST = RetryPolicy(max_retries=3, initial_delay_s=0.01, max_delay_s=0.05)


@pytest.fixture
def client(emulator) -> FluxClient:  # type: ignore[no-untyped-def]
    with FluxClient(TEST_API_KEY, base_url=emulator.base_url, retry=FAST) as c:
        yield c


def test_binary_jpeg_answer_is_parsed(client: FluxClient, emulator) -> None:  # type: ignore[no-untyped-def]
    image = client.generate(ImageRequest(prompt="a red fox", seed=42, aspect_ratio="16:9"))
    assert image.content_type == "image/jpeg"
    assert (image.width, image.height) == (1344, 768)
    assert Image.open(io.BytesIO(image.data)).size == (1344, 768)
    assert image.seed == 42
    assert image.finish_reason is FinishReason.SUCCESS
    assert image.attempts == 1
    assert image.request_id
    assert emulator.stats.generations == 1


def test_png_answer(client: FluxClient) -> None:
    image = client.generate(ImageRequest(prompt="a red fox", seed=42, output_format="png"))
    assert image.content_type == "image/png"
    assert Image.open(io.BytesIO(image.data)).format == "PNG"


def test_json_answer_decodes_base64(emulator) -> None:  # type: ignore[no-untyped-def]
    request = ImageRequest(prompt="a red fox", seed=42, aspect_ratio="9:16")
    with FluxClient(TEST_API_KEY, base_url=emulator.base_url, response_format="json") as client:
        image = client.generate(request)
    assert image.content_type == "image/png"
    assert (image.width, image.height) == (768, 1344)
    assert image.seed == 42
    assert image.finish_reason is FinishReason.SUCCESS


def test_same_request_same_pixels(client: FluxClient) -> None:
    request = ImageRequest(prompt="a red fox", seed=42)
    assert client.generate(request).data == client.generate(request).data


def test_content_filtered_is_reported(client: FluxClient) -> None:
    image = client.generate(ImageRequest(prompt="something nsfw", safety_check=True))
    assert image.finish_reason is FinishReason.CONTENT_FILTERED


def test_retries_5xx_then_succeeds_counting_attempts(client: FluxClient, emulator) -> None:  # type: ignore[no-untyped-def]
    retries: list[str] = []
    client.on_retry = lambda attempt, delay, kind: retries.append(kind)
    image = client.generate(ImageRequest(prompt="flaky [[flaky:2]]", seed=3))
    assert image.attempts == 3
    assert retries == ["ServerError", "ServerError"]
    assert emulator.stats.requests == 3


def test_gives_up_after_max_retries(client: FluxClient, emulator) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ServerError) as info:
        client.generate(ImageRequest(prompt="down [[status:502]]"))
    assert info.value.attempts == FAST.max_retries + 1
    assert emulator.stats.requests == FAST.max_retries + 1
    assert "502" in str(info.value)


@pytest.mark.parametrize(
    ("marker", "error"),
    [
        ("[[status:400]]", InvalidRequestError),
        ("[[status:401]]", AuthenticationError),
        ("[[status:403]]", AuthenticationError),
        ("[[status:404]]", InvalidRequestError),
        ("[[status:402]]", AuthenticationError),
    ],
)
def test_client_errors_are_never_retried(
    client: FluxClient, emulator, marker: str, error: type
) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error):
        client.generate(ImageRequest(prompt=f"bad {marker}"))
    assert emulator.stats.requests == 1


def test_wrong_key_is_an_authentication_error_without_the_key(emulator) -> None:  # type: ignore[no-untyped-def]
    wrong = "fw-wrong-key-abcdefghijklmnop"
    with FluxClient(wrong, base_url=emulator.base_url, retry=FAST) as client:
        with pytest.raises(AuthenticationError) as info:
            client.generate(ImageRequest(prompt="x"))
        assert wrong not in str(info.value) and wrong not in repr(info.value)
        assert wrong not in repr(client)
    assert emulator.stats.requests == 1


def test_retry_after_is_honoured(emulator) -> None:  # type: ignore[no-untyped-def]
    emulator.configure(rate_429=1.0, retry_after_s=1)
    delays: list[float] = []
    policy = RetryPolicy(max_retries=1, initial_delay_s=0.01, max_delay_s=0.01)
    with FluxClient(TEST_API_KEY, base_url=emulator.base_url, retry=policy) as client:
        client.on_retry = lambda attempt, delay, kind: delays.append(delay)
        started = time.perf_counter()
        with pytest.raises(RateLimitError) as info:
            client.generate(ImageRequest(prompt="x"))
        elapsed = time.perf_counter() - started
    assert delays == [1.0]
    assert elapsed >= 1.0
    assert info.value.retry_after_s == 1.0
    assert emulator.stats.requests == 2


def test_429_without_retry_after_backs_off_exponentially(emulator) -> None:  # type: ignore[no-untyped-def]
    emulator.configure(rate_429=1.0, retry_after_s=None)
    delays: list[float] = []
    policy = RetryPolicy(max_retries=3, initial_delay_s=0.02, max_delay_s=1.0)
    with FluxClient(TEST_API_KEY, base_url=emulator.base_url, retry=policy) as client:
        client.on_retry = lambda attempt, delay, kind: delays.append(delay)
        with pytest.raises(RateLimitError):
            client.generate(ImageRequest(prompt="x"))
    assert len(delays) == 3
    for index, delay in enumerate(delays):
        ceiling = 0.02 * 2**index
        assert ceiling / 2 <= delay <= ceiling


def test_timeout_is_retried_then_reported(emulator) -> None:  # type: ignore[no-untyped-def]
    client = FluxClient(TEST_API_KEY, base_url=emulator.base_url, retry=FAST, timeout_s=0.2)
    with client, pytest.raises(APITimeoutError):
        client.generate(ImageRequest(prompt="slow [[fault:slow=2]]"))
    assert emulator.stats.requests == FAST.max_retries + 1


def test_connection_refused_is_a_connection_error() -> None:
    client = FluxClient(TEST_API_KEY, base_url="http://127.0.0.1:9/inference/v1", retry=FAST)
    with client, pytest.raises(APIConnectionError) as info:
        client.generate(ImageRequest(prompt="x"))
    assert info.value.attempts == FAST.max_retries + 1


@pytest.mark.parametrize(
    ("fault", "error", "words"),
    [
        ("truncate", ResponseError, "truncated"),
        ("garbage", ResponseError, "not a JPEG or PNG"),
        ("html", ResponseError, "text/html"),
        ("json-no-images", ResponseError, "no image"),
        ("drop", APIConnectionError, "Network error"),
    ],
)
def test_malformed_answers_raise_useful_errors(
    client: FluxClient, fault: str, error: type, words: str
) -> None:
    with pytest.raises(error) as info:
        client.generate(ImageRequest(prompt=f"broken [[fault:{fault}]]"))
    assert words in str(info.value)


def test_missing_key_fails_before_any_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FIREWORKS_API_KEY", raising=False)
    with pytest.raises(MissingCredentialsError, match="FIREWORKS_API_KEY"):
        FluxClient()


def test_env_vars_configure_the_client(fireworks_env) -> None:  # type: ignore[no-untyped-def]
    with FluxClient() as client:
        assert client.base_url == fireworks_env.base_url
        assert client.generate(ImageRequest(prompt="x")).finish_reason is FinishReason.SUCCESS


def test_async_client_same_answers_and_concurrency(emulator) -> None:  # type: ignore[no-untyped-def]
    emulator.configure(latency_s=0.2)

    async def run() -> list:
        async with AsyncFluxClient(TEST_API_KEY, base_url=emulator.base_url, retry=FAST) as client:
            requests = [ImageRequest(prompt=f"fox {i}") for i in range(6)]
            return await asyncio.gather(*(client.generate(r) for r in requests))

    images = asyncio.run(run())
    assert [i.request.prompt for i in images] == [f"fox {i}" for i in range(6)]
    assert emulator.stats.max_in_flight > 1
    with FluxClient(TEST_API_KEY, base_url=emulator.base_url) as sync:
        assert sync.generate(images[0].request).data == images[0].data


def test_async_client_retries_like_sync(emulator) -> None:  # type: ignore[no-untyped-def]
    async def run() -> int:
        async with AsyncFluxClient(TEST_API_KEY, base_url=emulator.base_url, retry=FAST) as client:
            return (await client.generate(ImageRequest(prompt="flaky [[flaky:1]]"))).attempts

    assert asyncio.run(run()) == 2
    with pytest.raises(InvalidRequestError):
        asyncio.run(_async_generate(emulator.base_url, "bad [[status:400]]"))


async def _async_generate(base_url: str, prompt: str) -> object:
    async with AsyncFluxClient(TEST_API_KEY, base_url=base_url, retry=FAST) as client:
        return await client.generate(ImageRequest(prompt=prompt))


def test_key_never_logged(emulator, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.DEBUG)
    with FluxClient(TEST_API_KEY, base_url=emulator.base_url, retry=FAST) as client:
        client.generate(ImageRequest(prompt="flaky [[flaky:1]]"))
        with pytest.raises(ServerError):
            client.generate(ImageRequest(prompt="x [[status:500]]"))
    assert "retrying" in caplog.text
    assert TEST_API_KEY not in caplog.text


# --- small pieces, no server --------------------------------------------------------------


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after(httpx.Headers({"retry-after": "3"})) == 3.0
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "250"})) == 0.25
    assert parse_retry_after(httpx.Headers({})) is None
    assert parse_retry_after(httpx.Headers({"retry-after": "soon"})) is None
    future = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 <= parse_retry_after(httpx.Headers({"retry-after": future})) <= 30  # type: ignore[operator]


def test_retry_after_is_capped() -> None:
    assert RetryPolicy(max_retry_after_s=10).delay(0, 3600) == 10


@pytest.mark.parametrize(
    "body",
    [
        {"error": {"message": "bad aspect", "code": "x"}},
        {"message": "bad aspect", "code": "x"},
        {"error": "invalid", "message": "bad aspect"},
        {"error_message": "bad aspect"},
    ],
)
def test_error_message_from_every_known_shape(body: dict) -> None:
    assert api_error_message(httpx.Response(400, json=body)) == "bad aspect"


def test_error_message_falls_back_to_text() -> None:
    assert api_error_message(httpx.Response(502, text="<html>Bad gateway</html>")) == (
        "<html>Bad gateway</html>"
    )


# --- transport= and the protocol flow, no server ------------------------------------------

BASE = "https://api.test/inference/v1"
ROUTE = f"{BASE}/workflows/accounts/fireworks/models/flux-1-schnell-fp8/text_to_image"


def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 30, 30)).save(out, "JPEG")
    return out.getvalue()


JPEG = _jpeg()


def _image_answer(seed: str = "7") -> httpx.Response:
    headers = {"content-type": "image/jpeg", "seed": seed, "x-request-id": "req-1"}
    return httpx.Response(200, headers=headers, content=JPEG)


def test_mock_transport_is_the_network_for_both_clients() -> None:
    seen: list[httpx.Request] = []

    def api(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _image_answer()

    request = ImageRequest(prompt="a red fox", seed=7)
    with FluxClient(TEST_API_KEY, base_url=BASE, transport=httpx.MockTransport(api)) as client:
        image = client.generate(request)

    async def run() -> GeneratedImage:
        transport = httpx.MockTransport(api)
        async with AsyncFluxClient(TEST_API_KEY, base_url=BASE, transport=transport) as client:
            return await client.generate(request)

    async_image = asyncio.run(run())
    for result in (image, async_image):
        assert (result.data, result.content_type, result.seed) == (JPEG, "image/jpeg", 7)
        assert (result.width, result.height) == (16, 8)
        assert (result.attempts, result.request_id) == (1, "req-1")
    assert [str(r.url) for r in seen] == [ROUTE, ROUTE]
    for sent in seen:
        assert sent.method == "POST"
        assert sent.headers["authorization"] == f"Bearer {TEST_API_KEY}"
        assert sent.headers["accept"] == "image/jpeg"
        assert json.loads(sent.content) == request.api_body()
        # Built by the pooled client, so its timeouts travel with every request.
        assert sent.extensions["timeout"] == httpx.Timeout(60.0, connect=5.0).as_dict()


def _offline(**settings: Any) -> FluxClient:
    """A client whose flows the test drives by hand: its own transport must never be used."""
    never = httpx.MockTransport(lambda r: pytest.fail(f"the flow itself sent {r.url}"))
    return FluxClient(TEST_API_KEY, base_url=BASE, transport=never, **settings)


def test_flow_waits_out_a_429s_retry_after_then_succeeds() -> None:
    with _offline(retry=RetryPolicy(max_retries=2)) as client:
        flow = generation_flow(client, ImageRequest(prompt="fox", seed=7))
        first = next(flow)
        assert isinstance(first, httpx.Request) and str(first.url) == ROUTE
        assert first.headers["authorization"] == f"Bearer {TEST_API_KEY}"
        throttled = httpx.Response(429, headers={"retry-after": "3"}, json={"message": "slow"})
        assert flow.send(throttled) == Sleep(3.0)  # the server's wait, not the backoff's
        again = flow.send(None)
        assert isinstance(again, httpx.Request) and again is not first
        assert again.content == first.content
        with pytest.raises(StopIteration) as done:
            flow.send(_image_answer())
    image = done.value.value
    assert isinstance(image, GeneratedImage)
    assert (image.attempts, image.throttled, image.seed, image.data) == (2, 1, 7, JPEG)


def test_flow_retries_a_failure_to_send_thrown_into_it() -> None:
    policy = RetryPolicy(max_retries=1, initial_delay_s=0.5, max_delay_s=0.5)
    with _offline(retry=policy) as client:
        flow = generation_flow(client, ImageRequest(prompt="fox"))
        next(flow)
        pause = flow.throw(httpx.ConnectError("refused"))
        assert isinstance(pause, Sleep) and 0.25 <= pause.seconds <= 0.5
        assert isinstance(flow.send(None), httpx.Request)
        with pytest.raises(APIConnectionError, match="after 2 attempts") as info:
            flow.throw(httpx.ConnectError("refused"))
    assert (info.value.attempts, info.value.throttled) == (2, 0)


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 412, 413])
def test_flow_never_retries_a_client_error(status: int) -> None:
    with _offline(retry=RetryPolicy(max_retries=4)) as client:
        flow = generation_flow(client, ImageRequest(prompt="fox"))
        next(flow)
        answer = httpx.Response(status, json={"error": {"message": "bad aspect"}})
        with pytest.raises((InvalidRequestError, AuthenticationError)) as info:
            flow.send(answer)  # raised at once: no Sleep, no second request
    assert info.value.status_code == status and info.value.attempts == 1
    assert "bad aspect" in str(info.value)


# --------------------------------------------------------------------------------------------
# image_size: dimensions from the header, checked, without Pillow
# --------------------------------------------------------------------------------------------


def _encoded(size: tuple[int, int], fmt: str, mode: str = "RGB", **options: Any) -> bytes:
    picture = Image.new(mode, size)
    for x in range(0, size[0], 7):  # some detail, so the encoders write real entropy data
        picture.putpixel((x, x % size[1]), 255 if mode in ("L", "P") else (255, x % 256, 0))
    out = io.BytesIO()
    picture.save(out, fmt, **options)
    return out.getvalue()


def _overwrite(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new) :]


SIZES = [(1, 1), (17, 9), (9, 17), (1024, 1024), (1344, 768), (640, 1536), (2048, 1)]
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("JPEG", "RGB", {"quality": 90}),
    ("JPEG", "RGB", {"quality": 75, "progressive": True}),
    ("JPEG", "L", {}),
    ("JPEG", "CMYK", {}),
    ("JPEG", "RGB", {"exif": b"Exif\x00\x00" + b"\x00" * 5000, "icc_profile": b"\x01" * 3000}),
    ("PNG", "RGB", {}),
    ("PNG", "RGBA", {"compress_level": 1}),
    ("PNG", "P", {}),
    ("PNG", "L", {"optimize": True}),
]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(("fmt", "mode", "options"), VARIANTS)
def test_image_size_matches_pillow(
    size: tuple[int, int], fmt: str, mode: str, options: dict[str, Any]
) -> None:
    data = _encoded(size, fmt, mode, **options)
    with Image.open(io.BytesIO(data)) as picture:
        assert image_size(data) == picture.size == size
    assert sniff_image(data) == f"image/{fmt.lower()}"


def test_image_size_skips_fill_bytes_between_jpeg_segments() -> None:
    data = _encoded((33, 21), "JPEG")
    padded = data[:2] + b"\xff\xff\xff" + data[2:]  # T.81 allows 0xFF fill before a marker
    assert image_size(padded) == (33, 21)


@pytest.mark.parametrize(
    ("mangle", "words"),
    [
        (lambda d: d[:40], "truncated"),  # cut inside the header segments
        (lambda d: _overwrite(d, 4 + int.from_bytes(d[4:6], "big"), b"\x00"), "no marker"),
        (lambda d: d[:2] + b"\xff\xda\x00\x08" + d[2:], "no frame header"),  # a scan first
        (lambda d: b"\x89PNG\r\n\x1a\n" + d[8:], "IHDR"),
    ],
)
def test_image_size_rejects_broken_jpeg_headers(mangle: Any, words: str) -> None:
    with pytest.raises(ResponseError, match=words):
        image_size(mangle(_encoded((64, 48), "JPEG")))


def test_image_size_rejects_broken_png_headers() -> None:
    data = bytearray(_encoded((64, 48), "PNG"))
    data[20] ^= 0x01  # a bit of the IHDR width: the chunk's CRC no longer matches
    with pytest.raises(ResponseError, match="CRC"):
        image_size(bytes(data))
    with pytest.raises(ResponseError, match="IHDR"):
        image_size(bytes(data[:20]))
    with pytest.raises(ResponseError, match="not a JPEG or PNG"):
        image_size(b"GIF89a" + bytes(data))


def test_truncated_answer_is_refused_before_it_is_stored() -> None:
    """A cut answer fails the trailer check even when its header (and size) is intact."""
    data = _encoded((256, 256), "JPEG", quality=95)
    request = ImageRequest(prompt="x")
    response = httpx.Response(200, headers={"content-type": "image/jpeg"}, content=data[:-500])
    with pytest.raises(ResponseError, match="truncated"):
        parse_response(request, response, 0.1, 1)
    whole = httpx.Response(200, headers={"content-type": "image/jpeg"}, content=data)
    assert parse_response(request, whole, 0.1, 1).width == 256
