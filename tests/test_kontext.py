"""FLUX Kontext (issue 8): the asynchronous contract, image edits, and edits in batches.

Layers, bottom up: the request model (validation, content-based cache keys, FLUX.1 keys pinned),
the emulator's async routes spoken to over real HTTP, both clients against the emulator on every
status path, the batch flow (edit mode, caching by image content), and `flux-flows run --edit` as
a user runs it. Waiting is done by the client's own polling or `EmulatorStats`, never by sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from PIL import Image, ImageStat
from pydantic import ValidationError

from flux_flows.client import AsyncFluxClient, FluxClient, KontextPolicy, RetryPolicy
from flux_flows.client._async import drive as async_drive
from flux_flows.client._protocol import Exchange, Offload, generation_flow
from flux_flows.client._sync import drive as sync_drive
from flux_flows.client._wire import same_origin
from flux_flows.emulator import Emulator, EmulatorConfig
from flux_flows.errors import (
    APIConnectionError,
    APITimeoutError,
    InvalidRequestError,
    ResponseError,
    ServerError,
)
from flux_flows.models import (
    ASPECT_RATIO_SIZES,
    DEV,
    KONTEXT_MAX,
    KONTEXT_MODELS,
    KONTEXT_PRO,
    SCHNELL,
    FinishReason,
    ImageRequest,
    describe_validation_error,
)
from flux_flows.results import GeneratedImage, ImageRecord
from helpers.common import cli, free_port, summary_row

KEY = "fw-kontext-test-key-0123456789abcdef"
SUBMIT = "/workflows/accounts/fireworks/models/{model}"
RESULT = "/workflows/accounts/fireworks/models/{model}/get_result"
FAST_RETRY = RetryPolicy(max_retries=2, initial_delay_s=0.01, max_delay_s=0.02)
# Fast polls; generous limits, which only a failing path ever waits for (a loaded CI machine
# must not turn a slow answer into a "lost task").
FAST_POLL = KontextPolicy(
    poll_initial_s=0.01, poll_max_s=0.02, timeout_s=30.0, not_found_grace_s=30.0
)
DEFAULTS: dict[str, Any] = {"api_key": KEY, "kontext_pending_s": 0.0, "kontext_results_url": None}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def picture(
    colour: tuple[int, int, int], size: tuple[int, int] = (96, 64), fmt: str = "PNG"
) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, fmt)
    return out.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


RED = picture((220, 20, 20))
BLUE = picture((20, 40, 220))


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def middle_mean(image: Image.Image) -> list[float]:
    """Mean RGB of the picture's middle (the prompt and label boxes sit at the edges)."""
    w, h = image.size
    return ImageStat.Stat(image.convert("RGB").crop((w // 4, h // 3, 3 * w // 4, 2 * h // 3))).mean


def problems(**fields: Any) -> str:
    with pytest.raises(ValidationError) as info:
        ImageRequest(**fields)
    return describe_validation_error(info.value)


def kontext(prompt: str, **fields: Any) -> ImageRequest:
    return ImageRequest(prompt=prompt, model=KONTEXT_PRO, **fields)


# ---------------------------------------------------------------------------------------------
# The request model
# ---------------------------------------------------------------------------------------------


def test_flux1_cache_keys_are_exactly_what_they_were_before_kontext() -> None:
    """Computed before Kontext was added: images already stored under these keys stay found."""
    assert ImageRequest(prompt="a red fox", seed=42).cache_key == "085a81ae05037820337813ca996c1304"
    dev = ImageRequest(
        prompt="héllo wörld",
        model=DEV,
        seed=123,
        aspect_ratio="3:2",
        guidance_scale=4.5,
        num_inference_steps=30,
        safety_check=True,
        output_format="png",
    )
    assert dev.cache_key == "e9be3bf5482e548647bf6db22c5e4781"


def test_flux1_requests_serialize_as_before() -> None:
    """Prefect parameters and prompt rows of FLUX.1 requests carry no Kontext fields."""
    assert set(ImageRequest(prompt="x", seed=1).model_dump()) == {
        "prompt",
        "model",
        "aspect_ratio",
        "guidance_scale",
        "num_inference_steps",
        "seed",
        "safety_check",
        "output_format",
    }
    assert "safety_tolerance" in kontext("x").model_dump()


def test_kontext_models_and_their_defaults() -> None:
    for model in KONTEXT_MODELS:
        request = ImageRequest(prompt="a fox", model=model)
        assert request.is_kontext and request.safety_tolerance == 2
        assert request.prompt_upsampling is False and request.input_image is None
    assert not ImageRequest(prompt="a fox").is_kontext
    message = problems(prompt="x", model="flux-kontext-ultra")
    assert message.startswith("model:") and KONTEXT_PRO in message and SCHNELL in message


@pytest.mark.parametrize(
    ("field", "value"),
    [("safety_tolerance", 4), ("prompt_upsampling", True), ("input_image", "s3://b/photo.jpg")],
)
def test_kontext_only_fields_are_refused_for_flux1(field: str, value: Any) -> None:
    message = problems(prompt="x", model=SCHNELL, **{field: value})
    assert message.startswith(f"{field}:") and "kontext" in message.lower()


def test_kontext_fields_at_their_defaults_are_fine_for_flux1() -> None:
    request = ImageRequest(prompt="x", model=DEV, safety_tolerance=2, prompt_upsampling=False)
    assert request.cache_key == ImageRequest(prompt="x", model=DEV).cache_key


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_inference_steps", 8), ("guidance_scale", 5.0), ("safety_check", True)],
)
def test_flux1_only_fields_are_refused_for_kontext(field: str, value: Any) -> None:
    message = problems(prompt="x", model=KONTEXT_MAX, **{field: value})
    assert message.startswith(f"{field}:") and KONTEXT_MAX in message


def test_flux1_fields_left_unset_or_at_defaults_are_fine_for_kontext() -> None:
    a = kontext("x", seed=3)
    b = kontext("x", seed=3, num_inference_steps=None, guidance_scale=3.5, safety_check=False)
    assert a == b and a.cache_key == b.cache_key
    assert "num_inference_steps" not in a.api_body() and "guidance_scale" not in a.api_body()


@pytest.mark.parametrize("value", [-1, 7, "lots"])
def test_safety_tolerance_range(value: Any) -> None:
    assert problems(prompt="x", model=KONTEXT_PRO, safety_tolerance=value).startswith(
        "safety_tolerance:"
    )


def test_kontext_api_body() -> None:
    request = kontext(
        "make it winter", seed=5, aspect_ratio="21:9", safety_tolerance=6, prompt_upsampling=True
    )
    assert request.api_body() == {
        "prompt": "make it winter",
        "seed": 5,
        "aspect_ratio": "21:9",
        "output_format": "jpeg",
        "prompt_upsampling": True,
        "safety_tolerance": 6,
    }
    edit = kontext("make it winter", input_image=data_uri(RED))
    with pytest.raises(ValueError, match="input_data_uri"):
        edit.api_body()  # the bytes are read by the client at send time, never kept
    assert edit.api_body(input_data_uri="data:image/png;base64,AA")["input_image"].startswith(
        "data:image/png"
    )


def test_input_image_hash_is_of_the_content_not_the_name(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(RED)
    (tmp_path / "renamed copy.png").write_bytes(RED)
    (tmp_path / "other.png").write_bytes(BLUE)
    a = kontext("winter", seed=1, input_image=str(tmp_path / "a.png"))
    copy = kontext("winter", seed=1, input_image=str(tmp_path / "renamed copy.png"))
    other = kontext("winter", seed=1, input_image=str(tmp_path / "other.png"))
    inline = kontext("winter", seed=1, input_image=data_uri(RED))
    assert a.input_image_sha256 == hashlib.sha256(RED).hexdigest()
    assert a.cache_key == copy.cache_key == inline.cache_key
    assert other.cache_key != a.cache_key
    assert kontext("winter", seed=1).cache_key != a.cache_key  # text-to-image is not an edit


def test_local_input_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.png").write_bytes(RED)
    monkeypatch.chdir(tmp_path)
    assert kontext("x", input_image="a.png").input_image == str(tmp_path / "a.png")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prompt_upsampling", True),
        ("safety_tolerance", 5),
        ("seed", 99),
        ("aspect_ratio", "9:16"),
        ("output_format", "png"),
        ("model", KONTEXT_MAX),
        ("prompt", "make it summer"),
    ],
)
def test_every_kontext_field_changes_the_cache_key(field: str, value: Any) -> None:
    base = kontext("make it winter", seed=1, input_image=data_uri(RED))
    assert ImageRequest(**{**base.model_dump(), field: value}).cache_key != base.cache_key


def test_bad_input_images_are_named(tmp_path: Path) -> None:
    assert problems(
        prompt="x", model=KONTEXT_PRO, input_image=str(tmp_path / "missing.png")
    ).startswith("input_image:")
    (tmp_path / "notes.png").write_text("not an image")
    assert "not a JPEG, PNG or WebP" in problems(
        prompt="x", model=KONTEXT_PRO, input_image=str(tmp_path / "notes.png")
    )
    huge = "data:image/png;base64," + base64.b64encode(b"not an image" * 100_000).decode()
    message = problems(prompt="x", model=KONTEXT_PRO, input_image=huge)
    assert message.startswith("input_image:") and len(message) < 400  # never the whole URI
    assert problems(prompt="x", model=KONTEXT_PRO, input_image="s3://bucket-only/").startswith(
        "input_image:"
    )
    assert problems(prompt="x", model=KONTEXT_PRO, input_image_sha256="abc").startswith(
        "input_image_sha256:"
    )


def test_remote_inputs_need_their_hash_before_a_cache_key() -> None:
    request = kontext("x", input_image="s3://photos/cat.jpg")
    assert request.needs_input_hash
    with pytest.raises(ValueError, match="not been read yet"):
        _ = request.cache_key
    digest = hashlib.sha256(RED).hexdigest()
    resolved = kontext("x", input_image="s3://photos/cat.jpg", input_image_sha256=digest)
    assert not resolved.needs_input_hash
    assert resolved.cache_key == kontext("x", input_image=data_uri(RED)).cache_key


def test_edit_records_round_trip_to_the_same_request() -> None:
    request = kontext("winter", seed=4, input_image=data_uri(RED), safety_tolerance=1)
    record = ImageRecord.for_request(request, index=0, variant=0, finish_reason="SUCCESS")
    assert record.input_image == request.input_image
    assert record.input_image_sha256 == request.input_image_sha256
    assert record.to_request() == request
    assert record.cache_key == request.cache_key
    old_line = {
        k: v
        for k, v in json.loads(
            ImageRecord.for_request(
                ImageRequest(prompt="x"), index=0, variant=0, finish_reason="SUCCESS"
            ).model_dump_json()
        ).items()
        if k not in ("input_image", "input_image_sha256", "safety_tolerance", "prompt_upsampling")
    }
    assert ImageRecord.model_validate(old_line).to_request() == ImageRequest(prompt="x")


# ---------------------------------------------------------------------------------------------
# The emulator's async contract, over HTTP
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    with Emulator(EmulatorConfig(**DEFAULTS)) as server:
        yield server


@pytest.fixture
def fresh(emu: Emulator) -> Emulator:
    emu.configure(**DEFAULTS)
    emu.reset()
    return emu


@pytest.fixture
def http(fresh: Emulator) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=fresh.base_url, headers=headers, timeout=10) as client:
        yield client


def submit(http: httpx.Client, body: dict[str, Any], model: str = KONTEXT_PRO) -> str:
    response = http.post(SUBMIT.format(model=model), json=body)
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"request_id"}
    return response.json()["request_id"]


def poll(http: httpx.Client, task_id: str, model: str = KONTEXT_PRO) -> dict[str, Any]:
    response = http.post(RESULT.format(model=model), json={"id": task_id})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"id", "status", "result", "progress", "details"}
    assert body["id"] == task_id
    return body


def test_submit_pending_then_ready_then_download(http: httpx.Client, fresh: Emulator) -> None:
    fresh.configure(kontext_pending_s=3600.0)
    task_id = submit(http, {"prompt": "a lighthouse", "seed": 7, "aspect_ratio": "16:9"})
    pending = poll(http, task_id)
    assert pending["status"] == "Pending" and pending["result"] is None
    assert 0 <= pending["progress"] < 1
    assert fresh.stats.generations == 0
    fresh.configure(kontext_pending_s=0.0)
    ready = poll(http, task_id)
    assert ready["status"] == "Ready" and ready["result"]["seed"] == 7
    sample = ready["result"]["sample"]
    assert sample.startswith(fresh.url + "/_emulator/results/") and sample.endswith(".jpg")
    image = httpx.get(sample)  # a plain GET, no key: like a signed URL
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert decoded(image.content).size == ASPECT_RATIO_SIZES["16:9"]
    assert poll(http, task_id)["status"] == "Ready"
    assert fresh.stats.generations == 1  # however often it is polled
    assert fresh.stats.requests == 4  # submit and polls are API calls; the download is not
    assert (fresh.stats.downloads, fresh.stats.downloads_with_auth) == (1, 0)


def test_same_inputs_same_pixels_and_seed_zero_is_random(http: httpx.Client) -> None:
    def result(body: dict[str, Any]) -> tuple[bytes, int]:
        ready = poll(http, submit(http, body))
        return httpx.get(ready["result"]["sample"]).content, ready["result"]["seed"]

    first, seed = result({"prompt": "a fox", "seed": 11, "output_format": "png"})
    assert decoded(first).format == "PNG" and seed == 11
    assert result({"prompt": "a fox", "seed": 11, "output_format": "png"})[0] == first
    assert result({"prompt": "a fox", "seed": 12, "output_format": "png"})[0] != first
    _, random_seed = result({"prompt": "a fox", "seed": 0})
    assert random_seed >= 1


def test_an_edit_is_visibly_made_from_its_input(http: httpx.Client) -> None:
    def edit(source: bytes, seed: int = 3) -> Image.Image:
        body = {"prompt": "make it winter", "seed": seed, "input_image": data_uri(source)}
        return decoded(httpx.get(poll(http, submit(http, body))["result"]["sample"]).content)

    red, blue = edit(RED), edit(BLUE)
    r, g, b = middle_mean(red)
    assert r > 120 and r > 2 * g and r > 2 * b
    r, g, b = middle_mean(blue)
    assert b > 120 and b > 2 * r
    assert red.size == ASPECT_RATIO_SIZES["1:1"]
    assert edit(RED).tobytes() == red.tobytes()  # deterministic
    assert edit(RED, seed=4).tobytes() != red.tobytes()


def test_input_urls_are_hashed_not_fetched(http: httpx.Client, fresh: Emulator) -> None:
    def sample(url: str) -> bytes:
        body = {"prompt": "winter", "seed": 1, "input_image": url}
        return httpx.get(poll(http, submit(http, body))["result"]["sample"]).content

    # Nothing listens at these addresses: a fetch would fail the task.
    first = sample("http://127.0.0.1:9/cat.png")
    assert sample("http://127.0.0.1:9/cat.png") == first
    assert sample("http://127.0.0.1:9/dog.png") != first


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": "  "}, "prompt"),
        ({"prompt": "x", "safety_tolerance": 7}, "safety_tolerance"),
        ({"prompt": "x", "safety_tolerance": True}, "safety_tolerance"),
        ({"prompt": "x", "output_format": "webp"}, "output_format"),
        ({"prompt": "x", "prompt_upsampling": "yes"}, "prompt_upsampling"),
        ({"prompt": "x", "aspect_ratio": "7:3"}, "aspect_ratio"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "input_image": "/tmp/cat.png"}, "input_image"),
        ({"prompt": "x", "input_image": "data:image/png;base64,bm90IGFuIGltYWdl"}, "input_image"),
    ],
)
def test_submit_validation(http: httpx.Client, body: dict[str, Any], param: str) -> None:
    response = http.post(SUBMIT.format(model=KONTEXT_PRO), json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_submit_ignores_unknown_fields_and_checks_key_and_model(
    http: httpx.Client, fresh: Emulator
) -> None:
    api = fresh.base_url
    body = {"prompt": "x", "webhook_url": "https://example.invalid/hook", "samples": 1}
    assert http.post(SUBMIT.format(model=KONTEXT_MAX), json=body).status_code == 200
    assert http.post(SUBMIT.format(model=SCHNELL), json=body).status_code == 404
    assert http.post(SUBMIT.format(model="flux-kontext-ultra"), json=body).status_code == 404
    unauthenticated = httpx.post(f"{api}{SUBMIT.format(model=KONTEXT_PRO)}", json=body)
    assert unauthenticated.status_code == 401
    # FLUX.1's synchronous route does not serve Kontext models.
    sync_route = "/workflows/accounts/fireworks/models/flux-kontext-pro/text_to_image"
    assert http.post(sync_route, json=body).status_code == 404


def test_unknown_tasks_and_bad_polls(http: httpx.Client, fresh: Emulator) -> None:
    assert poll(http, "no-such-task")["status"] == "Task not found"
    task_id = submit(http, {"prompt": "x"})
    assert poll(http, task_id, model=KONTEXT_MAX)["status"] == "Task not found"  # other model
    response = http.post(RESULT.format(model=KONTEXT_PRO), json={})
    assert response.status_code == 400 and response.json()["error"]["param"] == "id"
    assert httpx.get(f"{fresh.url}/_emulator/results/nope.jpg").status_code == 404


def test_markers_drive_every_status(http: httpx.Client, fresh: Emulator) -> None:
    lost = submit(http, {"prompt": "x [[kontext:not-found-first=2]]"})
    assert [poll(http, lost)["status"] for _ in range(3)] == [
        "Task not found",
        "Task not found",
        "Ready",
    ]
    refused = poll(http, submit(http, {"prompt": "x [[kontext:request-moderated]]"}))
    assert refused["status"] == "Request Moderated" and refused["result"] is None
    assert refused["details"]
    failed = poll(http, submit(http, {"prompt": "x [[kontext:error]]"}))
    assert failed["status"] == "Error" and failed["details"]["message"]
    moderated = poll(http, submit(http, {"prompt": "something nsfw"}))
    assert moderated["status"] == "Content Moderated" and moderated["result"] is None
    # Ready and Content Moderated were generated (and billed); a refused input or an error not.
    assert fresh.stats.generations == 2


def test_pending_marker_tasks_stay_pending_until_their_time(
    http: httpx.Client, fresh: Emulator
) -> None:
    fresh.configure(kontext_pending_s=3600.0)
    task_id = submit(http, {"prompt": "x [[kontext:error]]"})
    assert poll(http, task_id)["status"] == "Pending"
    refused = submit(http, {"prompt": "x [[kontext:request-moderated]]"})
    assert poll(http, refused)["status"] == "Request Moderated"  # the input is refused at once


def test_submit_takes_status_and_flaky_markers(http: httpx.Client) -> None:
    assert (
        http.post(SUBMIT.format(model=KONTEXT_PRO), json={"prompt": "x [[status:429]]"}).status_code
        == 429
    )
    body = {"prompt": "x [[flaky:1]]", "seed": 5}
    assert http.post(SUBMIT.format(model=KONTEXT_PRO), json=body).status_code == 503
    assert http.post(SUBMIT.format(model=KONTEXT_PRO), json=body).status_code == 200


def test_emulator_kontext_config_is_validated() -> None:
    with pytest.raises(ValueError, match="kontext_pending_s"):
        EmulatorConfig(kontext_pending_s=-1)
    with pytest.raises(ValueError, match="kontext_results_url"):
        EmulatorConfig(kontext_results_url="ftp://example")


# ---------------------------------------------------------------------------------------------
# The clients, sync and async, on every status path
# ---------------------------------------------------------------------------------------------


def generate(
    emu: Emulator, request: ImageRequest, mode: str, policy: KontextPolicy = FAST_POLL
) -> GeneratedImage:
    """One generation with the sync or the async client, configured identically."""
    settings: dict[str, Any] = {"base_url": emu.base_url, "retry": FAST_RETRY, "kontext": policy}
    if mode == "sync":
        with FluxClient(KEY, **settings) as client:
            return client.generate(request)

    async def run() -> GeneratedImage:
        async with AsyncFluxClient(KEY, **settings) as client:
            return await client.generate(request)

    return asyncio.run(run())


MODES = pytest.mark.parametrize("mode", ["sync", "async"])


@MODES
def test_ready(fresh: Emulator, mode: str) -> None:
    image = generate(fresh, kontext("a lighthouse", seed=9, aspect_ratio="9:16"), mode)
    assert image.finish_reason is FinishReason.SUCCESS
    assert (image.width, image.height) == ASPECT_RATIO_SIZES["9:16"]
    assert image.content_type == "image/jpeg" and image.seed == 9
    assert decoded(image.data).size == ASPECT_RATIO_SIZES["9:16"]
    assert image.request_id and image.attempts == 3  # submit, one poll, one download
    assert fresh.stats.generations == 1


@MODES
def test_pending_then_ready(fresh: Emulator, mode: str) -> None:
    fresh.configure(kontext_pending_s=0.15)
    image = generate(fresh, kontext("slow fox", seed=2, output_format="png"), mode)
    assert image.finish_reason is FinishReason.SUCCESS and image.content_type == "image/png"
    assert image.attempts > 3  # it saw Pending at least once
    assert image.latency_s >= 0.15


@MODES
def test_early_task_not_found_is_transient(fresh: Emulator, mode: str) -> None:
    image = generate(fresh, kontext("x [[kontext:not-found-first=3]]"), mode)
    assert image.finish_reason is FinishReason.SUCCESS
    assert image.attempts == 1 + 4 + 1


@MODES
def test_task_not_found_after_the_grace_period_is_an_error(fresh: Emulator, mode: str) -> None:
    policy = KontextPolicy(poll_initial_s=0.01, poll_max_s=0.02, timeout_s=5, not_found_grace_s=0.1)
    with pytest.raises(ResponseError, match="lost Kontext task") as info:
        generate(fresh, kontext("x [[kontext:not-found-first=100000]]"), mode, policy)
    assert info.value.request_id
    assert info.value.attempts >= 1 + policy.not_found_min_polls  # never lost on a single answer


@MODES
@pytest.mark.parametrize("prompt", ["x [[kontext:request-moderated]]", "something nsfw"])
def test_moderated_is_content_filtered_without_bytes(
    fresh: Emulator, mode: str, prompt: str
) -> None:
    image = generate(fresh, kontext(prompt, seed=8), mode)
    assert image.finish_reason is FinishReason.CONTENT_FILTERED
    assert (image.data, image.width, image.height, image.seed) == (b"", 0, 0, 8)
    assert image.request_id and fresh.stats.downloads == 0


@MODES
def test_error_status_is_reported_not_retried(fresh: Emulator, mode: str) -> None:
    with pytest.raises(ServerError, match=r"emulator \(\[\[kontext:error\]\]\)") as info:
        generate(fresh, kontext("x [[kontext:error]]"), mode)
    assert info.value.retryable is False and info.value.request_id
    assert info.value.attempts == 2  # one submit, one poll: the task is not submitted again
    assert fresh.stats.requests == 2


@MODES
def test_poll_timeout(fresh: Emulator, mode: str) -> None:
    fresh.configure(kontext_pending_s=3600.0)
    policy = KontextPolicy(poll_initial_s=0.01, poll_max_s=0.05, timeout_s=0.3)
    with pytest.raises(APITimeoutError, match=r"not finished after 0\.3 s") as info:
        generate(fresh, kontext("never ready"), mode, policy)
    assert info.value.retryable is False and "Pending" in str(info.value)
    assert fresh.stats.generations == 0 and info.value.attempts == fresh.stats.requests


@MODES
def test_submit_errors_follow_the_retry_policy(fresh: Emulator, mode: str) -> None:
    image = generate(fresh, kontext("x [[flaky:2]]", seed=4), mode)
    assert image.finish_reason is FinishReason.SUCCESS and image.attempts == 2 + 3
    fresh.reset()
    with pytest.raises(InvalidRequestError):
        generate(fresh, kontext("x [[status:400]]"), mode)
    assert fresh.stats.requests == 1


@MODES
def test_authorization_goes_only_to_the_api_origin(fresh: Emulator, mode: str) -> None:
    generate(fresh, kontext("on the api host"), mode)
    assert (fresh.stats.downloads, fresh.stats.downloads_with_auth) == (1, 1)
    # The same server under another name is another origin: the key must not go there.
    fresh.configure(kontext_results_url=f"http://localhost:{fresh.port}")
    image = generate(fresh, kontext("on a storage host"), mode)
    assert image.finish_reason is FinishReason.SUCCESS
    assert (fresh.stats.downloads, fresh.stats.downloads_with_auth) == (2, 1)


def test_same_origin_rule() -> None:
    api = "https://api.fireworks.ai/inference/v1"
    assert same_origin("https://api.fireworks.ai/results/x.jpg?sig=1", api)
    assert same_origin("https://API.fireworks.ai:443/x.jpg", api)
    assert not same_origin("https://storage.googleapis.com/x.jpg", api)
    assert not same_origin("http://api.fireworks.ai/x.jpg", api)
    assert not same_origin("https://api.fireworks.ai:8443/x.jpg", api)
    assert not same_origin("https://api.fireworks.ai.evil.example/x.jpg", api)


@MODES
def test_download_failures_are_retried_then_reported(fresh: Emulator, mode: str) -> None:
    fresh.configure(kontext_results_url=f"http://127.0.0.1:{free_port()}")  # nobody listens
    with pytest.raises(APIConnectionError) as info:
        generate(fresh, kontext("unreachable result"), mode)
    downloads = FAST_RETRY.max_retries + 1
    assert info.value.attempts == 2 + downloads  # submit, poll, every download try
    assert fresh.stats.generations == 1  # it was paid for: the error says the download failed


@MODES
def test_edit_from_a_file_and_from_a_data_uri(fresh: Emulator, mode: str, tmp_path: Path) -> None:
    (tmp_path / "red.jpg").write_bytes(picture((220, 20, 20), fmt="JPEG"))
    from_file = generate(
        fresh, kontext("winter", seed=1, input_image=str(tmp_path / "red.jpg")), mode
    )
    r, g, b = middle_mean(decoded(from_file.data))
    assert r > 2 * g and r > 2 * b
    from_uri = generate(fresh, kontext("winter", seed=1, input_image=data_uri(BLUE)), mode)
    r, g, b = middle_mean(decoded(from_uri.data))
    assert b > 2 * r


def test_an_input_changed_after_hashing_is_not_sent(fresh: Emulator, tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    photo.write_bytes(RED)
    request = kontext("winter", input_image=str(photo))
    photo.write_bytes(BLUE)
    with pytest.raises(InvalidRequestError, match="changed since"):
        generate(fresh, request, "sync")
    photo.unlink()
    with pytest.raises(InvalidRequestError, match="does not exist"):
        generate(fresh, request, "async")
    assert fresh.stats.requests == 0


def test_flux1_is_still_synchronous(fresh: Emulator) -> None:
    image = generate(fresh, ImageRequest(prompt="a fox", seed=1), "sync")
    assert image.finish_reason is FinishReason.SUCCESS and image.attempts == 1


# ---------------------------------------------------------------------------------------------
# One flow, two drivers: submit -> poll -> download over a MockTransport, sleeps only recorded
# ---------------------------------------------------------------------------------------------

API = "https://api.test/inference/v1"
API_SUBMIT = "/inference/v1" + SUBMIT.format(model=KONTEXT_PRO)
API_RESULT = "/inference/v1" + RESULT.format(model=KONTEXT_PRO)
SAMPLE = "https://storage.test/r/t-1.jpg?sig=s3cret"
RESULT_JPEG = picture((10, 200, 10), size=(64, 48), fmt="JPEG")


class FakeKontext:
    """The Kontext wire for one task: `pending` Pending answers, then Ready; the sample redirects."""

    def __init__(self, pending: int = 1, submit_failures: int = 0) -> None:
        self.pending = pending
        self.submit_failures = submit_failures
        self.seen: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        if request.url.host == "storage.test":
            if request.url.path == "/r/t-1.jpg":
                return httpx.Response(302, headers={"location": "/blobs/t-1.jpg?sig=s3cret"})
            headers = {"content-type": "image/jpeg"}
            return httpx.Response(200, headers=headers, content=RESULT_JPEG)
        if request.url.path == API_RESULT:
            assert json.loads(request.content) == {"id": "t-1"}
            answer: dict[str, Any] = {"id": "t-1", "status": "Pending", "result": None}
            if self.pending:
                self.pending -= 1
            else:
                answer.update(status="Ready", result={"sample": SAMPLE, "seed": 9})
            return httpx.Response(200, json={**answer, "progress": None, "details": None})
        assert request.url.path == API_SUBMIT
        if self.submit_failures:
            self.submit_failures -= 1
            return httpx.Response(503, json={"message": "busy"})
        return httpx.Response(200, json={"request_id": "t-1"})


def drive_flow(
    mode: str, request: ImageRequest, server: FakeKontext, sleeps: list[float], **settings: Any
) -> GeneratedImage:
    """`request`'s generation flow run by the sync or the async driver; nothing really sleeps."""
    transport = httpx.MockTransport(server)
    if mode == "sync":
        with (
            FluxClient(KEY, base_url=API, transport=transport, **settings) as client,
            httpx.Client(transport=transport) as http,
        ):
            return sync_drive(generation_flow(client, request), http, sleep=sleeps.append)

    async def record(seconds: float) -> None:
        sleeps.append(seconds)

    async def run() -> GeneratedImage:
        async with (
            AsyncFluxClient(KEY, base_url=API, transport=transport, **settings) as client,
            httpx.AsyncClient(transport=transport) as http,
        ):
            return await async_drive(generation_flow(client, request), http, sleep=record)

    return asyncio.run(run())


@MODES
def test_one_flow_submits_polls_and_downloads_for_either_driver(mode: str) -> None:
    server, sleeps = FakeKontext(pending=1, submit_failures=1), []
    retry = RetryPolicy(max_retries=2, initial_delay_s=0.2, max_delay_s=0.2)
    image = drive_flow(mode, kontext("a lighthouse", seed=9), server, sleeps, retry=retry)
    assert image.finish_reason is FinishReason.SUCCESS and image.data == RESULT_JPEG
    assert (image.seed, image.request_id, image.width, image.height) == (9, "t-1", 64, 48)
    # Two submits (one 503), two polls, one download: its redirect is followed, not retried.
    assert (image.attempts, image.throttled) == (5, 0)
    assert [(r.method, r.url.host, r.url.path) for r in server.seen] == [
        ("POST", "api.test", API_SUBMIT),
        ("POST", "api.test", API_SUBMIT),
        ("POST", "api.test", API_RESULT),
        ("POST", "api.test", API_RESULT),
        ("GET", "storage.test", "/r/t-1.jpg"),
        ("GET", "storage.test", "/blobs/t-1.jpg"),
    ]
    assert 0.1 <= sleeps[0] <= 0.2  # the submit's backoff, with jitter
    assert sleeps[1:] == [0.5, 0.75]  # KontextPolicy's waits before each poll
    for sent in server.seen:
        on_api = sent.url.host == "api.test"
        assert (sent.headers.get("authorization") == f"Bearer {KEY}") is on_api


@MODES
def test_moderated_task_ends_the_flow_without_a_download(mode: str) -> None:
    class Moderated(FakeKontext):
        def __call__(self, request: httpx.Request) -> httpx.Response:
            if request.url.path == API_RESULT:
                self.seen.append(request)
                details = {"moderation_reasons": ["test"]}
                body = {"id": "t-1", "status": "Content Moderated", "details": details}
                return httpx.Response(200, json={**body, "result": None, "progress": None})
            return super().__call__(request)

    server = Moderated()
    image = drive_flow(mode, kontext("x", seed=4), server, [])
    assert image.finish_reason is FinishReason.CONTENT_FILTERED and image.data == b""
    assert image.attempts == 2 and len(server.seen) == 2


@MODES
def test_an_unreadable_input_fails_inside_the_flow_before_any_request(
    mode: str, tmp_path: Path
) -> None:
    photo = tmp_path / "photo.png"
    photo.write_bytes(RED)
    request = kontext("winter", input_image=str(photo))
    photo.unlink()
    server = FakeKontext()
    with pytest.raises(InvalidRequestError, match="cannot send the input image") as info:
        drive_flow(mode, request, server, [])
    assert (info.value.attempts, info.value.throttled, server.seen) == (0, 0, [])


@MODES
def test_the_input_image_is_read_by_the_driver(mode: str, tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    photo.write_bytes(RED)
    server = FakeKontext(pending=0)
    drive_flow(mode, kontext("winter", seed=2, input_image=str(photo)), server, [])
    assert json.loads(server.seen[0].content)["input_image"] == data_uri(RED)


def test_blocking_work_runs_off_the_event_loop() -> None:
    def flow() -> Exchange[int]:
        worker: int = yield Offload(threading.get_ident)
        return worker

    async def run() -> tuple[int, int]:
        async with httpx.AsyncClient() as http:
            return await async_drive(flow(), http), threading.get_ident()

    worker, loop = asyncio.run(run())
    assert worker != loop
    with httpx.Client() as http:
        assert sync_drive(flow(), http) == threading.get_ident()


@MODES
def test_public_clients_take_a_transport_for_kontext_too(mode: str) -> None:
    server = FakeKontext(pending=2)
    settings: dict[str, Any] = {"base_url": API, "retry": FAST_RETRY, "kontext": FAST_POLL}
    transport = httpx.MockTransport(server)
    if mode == "sync":
        with FluxClient(KEY, transport=transport, **settings) as client:
            image = client.generate(kontext("x", seed=1))
    else:

        async def run() -> GeneratedImage:
            async with AsyncFluxClient(KEY, transport=transport, **settings) as client:
                return await client.generate(kontext("x", seed=1))

        image = asyncio.run(run())
    assert image.data == RESULT_JPEG and image.attempts == 1 + 3 + 1


# ---------------------------------------------------------------------------------------------
# Batches: Kontext models, edit mode, caching by image content
# ---------------------------------------------------------------------------------------------


def run_batch(prompts: list[Any], destination: Path | str, **kwargs: Any) -> Any:
    from flux_flows.flows import generate_images

    state = generate_images(prompts, str(destination), return_state=True, **kwargs)
    return state.result()


def manifest(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture
def kontext_env(flow_env: Any) -> Any:
    """The flow fixtures' emulator (via env vars), with Kontext tasks ready at once."""
    flow_env.configure(kontext_pending_s=0.0)
    return flow_env


def test_edit_batch_caches_by_image_content(tmp_path: Path, kontext_env: Any) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(RED)
    (photos / "b-same-as-a.png").write_bytes(RED)
    (photos / "c.png").write_bytes(BLUE)
    (photos / "notes.txt").write_text("not an image, not listed")
    out = tmp_path / "out"
    report = run_batch(["make it winter"], out, model=KONTEXT_PRO, input_images=str(photos))
    assert report.counts["SUCCESS"] == 3
    assert [Path(r.input_image or "").name for r in report.records] == [
        "a.png",
        "b-same-as-a.png",
        "c.png",
    ]
    a, b, c = report.records
    assert a.cache_key == b.cache_key != c.cache_key
    assert b.cached and b.uri == a.uri and not c.cached
    assert kontext_env.stats.generations == 2 and report.api_calls > 0
    assert len(list((out / "images").iterdir())) == 2
    lines = manifest(out)
    assert [Path(line["input_image"]).name for line in lines] == [
        "a.png",
        "b-same-as-a.png",
        "c.png",
    ]
    assert lines[0]["input_image_sha256"] == hashlib.sha256(RED).hexdigest()
    assert report.estimated_cost_usd == pytest.approx(2 * 0.04)

    requests_before = kontext_env.stats.requests
    again = run_batch(["make it winter"], out, model=KONTEXT_PRO, input_images=str(photos))
    assert again.api_calls == 0 and again.cache_hits == 3
    assert kontext_env.stats.requests == requests_before  # not one submit, poll or download

    (photos / "c.png").write_bytes(picture((20, 200, 20)))  # new content, old name
    changed = run_batch(["make it winter"], out, model=KONTEXT_PRO, input_images=str(photos))
    assert [r.cached for r in changed.records] == [True, True, False]
    assert kontext_env.stats.generations == 3


def test_edit_batch_from_a_list_with_per_prompt_overrides(tmp_path: Path, kontext_env: Any) -> None:
    (tmp_path / "red.png").write_bytes(RED)
    prompts = [
        "make it winter",
        {"prompt": "make it night", "model": KONTEXT_MAX, "safety_tolerance": 5, "id": "n-1"},
        {"prompt": "only this one", "input_image": data_uri(BLUE)},  # its own image: not crossed
    ]
    report = run_batch(
        prompts,
        tmp_path / "out",
        model=KONTEXT_PRO,
        input_images=[str(tmp_path / "red.png"), data_uri(BLUE)],
        aspect_ratio="16:9",
        prompt_upsampling=True,
    )
    assert [(r.index, r.model) for r in report.records] == [
        (0, KONTEXT_PRO),
        (0, KONTEXT_PRO),
        (1, KONTEXT_MAX),
        (1, KONTEXT_MAX),
        (2, KONTEXT_PRO),
    ]
    assert report.counts["SUCCESS"] == 5
    assert report.records[2].safety_tolerance == 5 and report.records[2].item_id == "n-1"
    assert all(r.prompt_upsampling and (r.width, r.height) == (1344, 768) for r in report.records)
    assert report.records[4].input_image_sha256 == hashlib.sha256(BLUE).hexdigest()
    assert kontext_env.stats.generations == 5


def test_kontext_and_flux1_in_one_batch_with_moderation_and_errors(
    tmp_path: Path, kontext_env: Any
) -> None:
    prompts = [
        "a calm lake",
        {"prompt": "a calm lake", "model": KONTEXT_PRO},
        {"prompt": "something nsfw", "model": KONTEXT_PRO},
        {"prompt": "refused [[kontext:request-moderated]]", "model": KONTEXT_MAX},
        {"prompt": "broken [[kontext:error]]", "model": KONTEXT_PRO},
    ]
    report = run_batch(prompts, tmp_path)
    assert [r.finish_reason for r in report.records] == [
        FinishReason.SUCCESS,
        FinishReason.SUCCESS,
        FinishReason.CONTENT_FILTERED,
        FinishReason.CONTENT_FILTERED,
        FinishReason.ERROR,
    ]
    moderated = report.records[2]
    assert moderated.uri is None and moderated.filtered_uri
    assert Path(moderated.filtered_uri).stat().st_size == 0  # a marker, never a fake picture
    assert "kontext:error" in (report.records[4].error or "")
    assert len(list((tmp_path / "images").iterdir())) == 2
    assert len(list((tmp_path / "thumbs").iterdir())) == 2
    # A re-run retries only the error; moderated outcomes are remembered, not paid again.
    requests_before = kontext_env.stats.requests
    again = run_batch(prompts, tmp_path)
    assert [r.cached for r in again.records] == [True, True, True, True, False]
    assert kontext_env.stats.requests - requests_before == again.api_calls == 2


def test_edit_batch_from_an_s3_prefix(tmp_path: Path, s3_bucket: str, kontext_env: Any) -> None:
    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="photos/one.png", Body=RED)
    s3.put_object(Bucket=s3_bucket, Key="photos/two.jpg", Body=picture((20, 40, 220), fmt="JPEG"))
    s3.put_object(Bucket=s3_bucket, Key="photos/readme.md", Body=b"# not an image")
    s3.put_object(Bucket=s3_bucket, Key="elsewhere/three.png", Body=BLUE)
    report = run_batch(
        ["make it winter"], tmp_path, model=KONTEXT_PRO, input_images=f"s3://{s3_bucket}/photos/"
    )
    assert [r.input_image for r in report.records] == [
        f"s3://{s3_bucket}/photos/one.png",
        f"s3://{s3_bucket}/photos/two.jpg",
    ]
    assert report.counts["SUCCESS"] == 2
    # Same content as a local file -> the same cache key: found in the destination, not paid.
    (tmp_path / "local-copy.png").write_bytes(RED)
    local = run_batch(
        ["make it winter"],
        tmp_path,
        model=KONTEXT_PRO,
        input_images=[str(tmp_path / "local-copy.png")],
    )
    assert local.records[0].cached and local.api_calls == 0
    assert local.records[0].cache_key == report.records[0].cache_key


def test_build_request_hashes_an_s3_input(s3_bucket: str, s3_server: str) -> None:
    from flux_flows.tasks import build_request

    boto3.client("s3").put_object(Bucket=s3_bucket, Key="in/cat.png", Body=RED)
    request = build_request.fn(
        "make it winter", model=KONTEXT_PRO, input_image=f"s3://{s3_bucket}/in/cat.png", seed=3
    )
    assert request.input_image_sha256 == hashlib.sha256(RED).hexdigest()
    assert (
        request.cache_key
        == kontext("make it winter", input_image=data_uri(RED), seed=request.seed).cache_key
    )


def test_bad_edit_inputs_fail_before_any_spend(tmp_path: Path, kontext_env: Any) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no input images"):
        run_batch(["x"], tmp_path / "out", model=KONTEXT_PRO, input_images=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="does not exist"):
        run_batch(
            ["x"], tmp_path / "out", model=KONTEXT_PRO, input_images=[str(tmp_path / "nope.png")]
        )
    (tmp_path / "red.png").write_bytes(RED)
    with pytest.raises(ValueError, match="cannot edit an image"):
        run_batch(["x"], tmp_path / "out", input_images=[str(tmp_path / "red.png")])  # schnell
    assert kontext_env.stats.requests == 0


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def test_cli_run_edit_folder(tmp_path: Path, cli_env: dict[str, str], kontext_env: Any) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "red.png").write_bytes(RED)
    (photos / "blue.jpg").write_bytes(picture((20, 40, 220), fmt="JPEG"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("make it winter\nmake it night\n")
    out = tmp_path / "out"
    args = ("run", str(prompts), "--to", str(out), "--model", KONTEXT_PRO, "--edit", str(photos))
    done = cli(*args, env=cli_env)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert len(list((out / "images").iterdir())) == 4
    lines = manifest(out)
    assert sorted((Path(m["input_image"]).name, m["prompt"]) for m in lines) == [
        ("blue.jpg", "make it night"),
        ("blue.jpg", "make it winter"),
        ("red.png", "make it night"),
        ("red.png", "make it winter"),
    ]
    assert all(m["finish_reason"] == "SUCCESS" and m["model"] == KONTEXT_PRO for m in lines)
    assert kontext_env.stats.generations == 4

    inline = cli(
        "run",
        "--prompt",
        "make it winter",
        "--to",
        str(out),
        "-m",
        KONTEXT_PRO,
        "--edit",
        str(photos),
        env=cli_env,
    )
    assert inline.returncode == 0, inline.stderr
    assert summary_row(inline.stdout, "API calls") == "0"
    assert kontext_env.stats.generations == 4


def test_cli_run_needs_exactly_one_prompt_source(tmp_path: Path, cli_env: dict[str, str]) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("x\n")
    for args in ((), (str(prompts), "--prompt", "y")):
        done = cli("run", *args, "--to", str(tmp_path), env=cli_env)
        assert done.returncode == 2 and "exactly one" in done.stderr
    done = cli("run", "--prompt", "y", "--edit", str(tmp_path), "--to", str(tmp_path), env=cli_env)
    assert done.returncode == 2 and "Kontext" in done.stderr
