"""Contract tests for the Fireworks emulator, spoken to over real HTTP with httpx.

One emulator serves the whole module (starting and stopping costs ~0.2 s each); an autouse
fixture restores its default configuration and state before every test. Timing is observed with
`EmulatorStats.wait_for` and the module clock hook, never with sleeps.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from PIL import Image, ImageChops, ImageStat, UnidentifiedImageError

from flux_flows import emulator as emulator_module
from flux_flows.emulator import Emulator, EmulatorConfig, draw_picture, negotiate
from flux_flows.emulator import state as emulator_state
from flux_flows.models import ASPECT_RATIO_SIZES, DEV, MAX_SEED, SCHNELL

KEY = "fw-emulator-module-key-0123456789abcdef"
ROUTE = "/workflows/accounts/fireworks/models/{model}/text_to_image"
SCHNELL_ROUTE = ROUTE.format(model=SCHNELL)
DEFAULTS = dataclasses.asdict(EmulatorConfig(api_key=KEY))


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    with Emulator(EmulatorConfig(api_key=KEY)) as server:
        yield server


@pytest.fixture(scope="module")
def client(emu: Emulator) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=emu.base_url, headers=headers, timeout=10) as http:
        yield http


@pytest.fixture(autouse=True)
def fresh(request: pytest.FixtureRequest) -> None:
    """Every test starts from the default configuration and zeroed state."""
    if "emu" in request.fixturenames:
        server: Emulator = request.getfixturevalue("emu")
        server.configure(**DEFAULTS)
        server.reset()


def post(client: httpx.Client, body: Any, *, model: str = SCHNELL, **kwargs: Any) -> httpx.Response:
    return client.post(ROUTE.format(model=model), json=body, **kwargs)


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def json_image(response: httpx.Response) -> Image.Image:
    item = response.json()["base64"][0]
    prefix, _, payload = item.partition(",")
    assert prefix == "data:image/png;base64"
    return decode(base64.b64decode(payload))


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    return sum(ImageStat.Stat(ImageChops.difference(a.convert("RGB"), b.convert("RGB"))).mean) / 3


def assert_error(
    response: httpx.Response, status: int, kind: str, param: str | None = None
) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    error = body["error"]
    assert error["type"] == kind
    assert error["param"] == param
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["code"], str)
    assert body["request_id"] == response.headers["x-request-id"]
    return error


# ---------------------------------------------------------------------------------------------
# Answers and Accept negotiation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aspect_ratio", list(ASPECT_RATIO_SIZES))
def test_jpeg_answer_has_the_size_of_its_aspect_ratio(
    client: httpx.Client, aspect_ratio: str
) -> None:
    body = {"prompt": "a lighthouse", "aspect_ratio": aspect_ratio, "seed": 11}
    response = post(client, body, headers={"Accept": "image/jpeg"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert int(response.headers["content-length"]) == len(response.content)
    assert response.headers["seed"] == "11"
    assert response.headers["finish-reason"] == "SUCCESS"
    assert response.headers["x-request-id"]
    assert "x-ratelimit-limit-requests" not in response.headers
    image = decode(response.content)
    assert image.format == "JPEG"
    assert image.size == ASPECT_RATIO_SIZES[aspect_ratio]


@pytest.mark.parametrize("aspect_ratio", ["1:1", "9:21"])
def test_png_answer(client: httpx.Client, aspect_ratio: str) -> None:
    body = {"prompt": "a lighthouse", "aspect_ratio": aspect_ratio, "seed": 12}
    response = post(client, body, headers={"Accept": "image/png"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert (response.headers["seed"], response.headers["finish-reason"]) == ("12", "SUCCESS")
    image = decode(response.content)
    assert (image.format, image.size) == ("PNG", ASPECT_RATIO_SIZES[aspect_ratio])


@pytest.mark.parametrize("aspect_ratio", ["1:1", "16:9"])
def test_json_answer_carries_a_png_data_uri(client: httpx.Client, aspect_ratio: str) -> None:
    body = {"prompt": "a lighthouse", "aspect_ratio": aspect_ratio, "seed": 13}
    response = post(client, body, headers={"Accept": "application/json"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    payload = response.json()
    assert set(payload) == {"id", "base64", "finishReason", "seed"}
    assert payload["id"] == response.headers["x-request-id"]
    assert (payload["finishReason"], payload["seed"]) == ("SUCCESS", 13)
    assert json_image(response).size == ASPECT_RATIO_SIZES[aspect_ratio]


def test_client_without_accept_and_with_extra_fields_gets_jpeg(client: httpx.Client) -> None:
    """As the Vercel AI SDK calls it: no Accept, plus `samples`, `width` and `height`."""
    body = {"prompt": "a cat", "samples": 1, "width": 512, "height": 512, "aspect_ratio": "3:2"}
    request = client.build_request("POST", SCHNELL_ROUTE, json=body)
    del request.headers["accept"]
    response = client.send(request)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert decode(response.content).size == ASPECT_RATIO_SIZES["3:2"]


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, "jpeg"),
        ("", "jpeg"),
        ("*/*", "jpeg"),
        ("image/*", "jpeg"),
        ("image/webp", "jpeg"),
        ("text/html, image/png", "png"),
        ("image/png;q=0.9, application/json", "json"),
        ("application/json;q=0.5, image/png", "png"),
        ("image/png;q=0, image/jpeg;q=0.1", "jpeg"),
        ("IMAGE/PNG", "png"),
        ("*/*;q=0.1, application/json;q=0.8", "json"),
    ],
)
def test_accept_negotiation(accept: str | None, expected: str) -> None:
    assert negotiate(accept) == expected


def test_accept_with_q_values_over_http(client: httpx.Client) -> None:
    headers = {"Accept": "image/png;q=0.9, application/json"}
    response = post(client, {"prompt": "q values"}, headers=headers)
    assert response.headers["content-type"] == "application/json"


def test_jpeg_quality_header_is_honoured(client: httpx.Client) -> None:
    body = {"prompt": "quality", "seed": 3}
    low = post(client, body, headers={"Jpeg-Quality": "10"})
    high = post(client, body, headers={"Jpeg-Quality": "95"})
    default = post(client, body)
    ignored = post(client, body, headers={"Jpeg-Quality": "not-a-number"})
    assert len(low.content) < len(default.content) < len(high.content)
    assert ignored.content == default.content


# ---------------------------------------------------------------------------------------------
# Seeds and determinism
# ---------------------------------------------------------------------------------------------


def test_seed_zero_picks_and_reports_a_random_seed(client: httpx.Client) -> None:
    first = post(client, {"prompt": "random", "seed": 0})
    second = post(client, {"prompt": "random"})
    seeds = [int(first.headers["seed"]), int(second.headers["seed"])]
    assert all(1 <= seed <= MAX_SEED for seed in seeds)
    assert seeds[0] != seeds[1]
    as_json = post(client, {"prompt": "random", "seed": 0}, headers={"Accept": "application/json"})
    assert 1 <= as_json.json()["seed"] <= MAX_SEED


def test_same_inputs_give_the_same_bytes(client: httpx.Client) -> None:
    body = {"prompt": "a quiet harbour at night", "seed": 42, "aspect_ratio": "4:3"}
    for accept in ("image/jpeg", "image/png"):
        first = post(client, body, headers={"Accept": accept})
        second = post(client, body, headers={"Accept": accept})
        assert first.content == second.content


def test_different_seeds_and_prompts_look_different(client: httpx.Client) -> None:
    base = decode(post(client, {"prompt": "a red fox", "seed": 1}).content)
    other_seed = decode(post(client, {"prompt": "a red fox", "seed": 2}).content)
    other_prompt = decode(post(client, {"prompt": "a blue fox", "seed": 1}).content)
    assert mean_difference(base, other_seed) > 20
    assert mean_difference(base, other_prompt) > 5


def test_pixels_are_identical_across_processes(client: httpx.Client) -> None:
    prompt, seed, ratio = "the same in every process ✓", 987654321, "2:3"
    response = post(
        client,
        {"prompt": prompt, "seed": seed, "aspect_ratio": ratio},
        headers={"Accept": "image/png"},
    )
    served = hashlib.sha256(decode(response.content).tobytes()).hexdigest()
    width, height = ASPECT_RATIO_SIZES[ratio]
    code = (
        "import hashlib, sys\n"
        "from flux_flows.emulator import draw_picture\n"
        f"img = draw_picture({prompt!r}, {seed}, {width}, {height})\n"
        "print(hashlib.sha256(img.tobytes()).hexdigest())\n"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert other.stdout.strip() == served
    assert hashlib.sha256(draw_picture(prompt, seed, width, height).tobytes()).hexdigest() == served


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

INVALID_BODIES: list[tuple[str, Any, str]] = [
    ("missing prompt", {}, "prompt"),
    ("prompt not a string", {"prompt": 5}, "prompt"),
    ("blank prompt", {"prompt": "   \n"}, "prompt"),
    ("unknown aspect ratio", {"prompt": "x", "aspect_ratio": "7:5"}, "aspect_ratio"),
    ("aspect ratio not a string", {"prompt": "x", "aspect_ratio": 1.5}, "aspect_ratio"),
    ("guidance as string", {"prompt": "x", "guidance_scale": "3"}, "guidance_scale"),
    ("guidance zero", {"prompt": "x", "guidance_scale": 0}, "guidance_scale"),
    ("guidance negative", {"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    ("guidance too high", {"prompt": "x", "guidance_scale": 20.5}, "guidance_scale"),
    ("guidance bool", {"prompt": "x", "guidance_scale": True}, "guidance_scale"),
    ("steps zero", {"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ("steps above schnell", {"prompt": "x", "num_inference_steps": 13}, "num_inference_steps"),
    ("steps float", {"prompt": "x", "num_inference_steps": 4.5}, "num_inference_steps"),
    ("steps string", {"prompt": "x", "num_inference_steps": "4"}, "num_inference_steps"),
    ("steps bool", {"prompt": "x", "num_inference_steps": True}, "num_inference_steps"),
    ("seed negative", {"prompt": "x", "seed": -1}, "seed"),
    ("seed too big", {"prompt": "x", "seed": 2**32}, "seed"),
    ("seed float", {"prompt": "x", "seed": 1.5}, "seed"),
    ("seed bool", {"prompt": "x", "seed": True}, "seed"),
    ("seed string", {"prompt": "x", "seed": "7"}, "seed"),
    ("safety_check string", {"prompt": "x", "safety_check": "yes"}, "safety_check"),
    ("safety_check int", {"prompt": "x", "safety_check": 1}, "safety_check"),
]


@pytest.mark.parametrize(
    ("body", "param"), [(b, p) for _, b, p in INVALID_BODIES], ids=[n for n, _, _ in INVALID_BODIES]
)
def test_invalid_field_is_a_400_naming_the_field(
    client: httpx.Client, emu: Emulator, body: dict, param: str
) -> None:
    error = assert_error(post(client, body), 400, "invalid_request_error", param)
    assert error["code"] == "INVALID_ARGUMENT"
    assert param in error["message"]
    assert emu.stats.generations == 0


def test_dev_step_range_differs_from_schnell(client: httpx.Client) -> None:
    assert post(client, {"prompt": "x", "num_inference_steps": 50}, model=DEV).status_code == 200
    error = assert_error(
        post(client, {"prompt": "x", "num_inference_steps": 51}, model=DEV),
        400,
        "invalid_request_error",
        "num_inference_steps",
    )
    assert "1..50" in error["message"]
    error = assert_error(
        post(client, {"prompt": "x", "num_inference_steps": 13}),
        400,
        "invalid_request_error",
        "num_inference_steps",
    )
    assert "1..12" in error["message"]


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'"prompt"', b"", b'{"prompt": "x"'])
def test_body_that_is_not_a_json_object_is_a_400(client: httpx.Client, raw: bytes) -> None:
    response = client.post(SCHNELL_ROUTE, content=raw, headers={"Content-Type": "application/json"})
    assert_error(response, 400, "invalid_request_error", None)


def test_nan_guidance_is_rejected(client: httpx.Client) -> None:
    response = client.post(SCHNELL_ROUTE, content=b'{"prompt": "x", "guidance_scale": NaN}')
    assert_error(response, 400, "invalid_request_error", "guidance_scale")


def test_edge_values_nulls_and_unknown_fields_are_accepted(
    client: httpx.Client, emu: Emulator
) -> None:
    edges = {
        "prompt": " padded ",
        "guidance_scale": 20,
        "num_inference_steps": 12,
        "seed": MAX_SEED,
        "safety_check": False,
        "aspect_ratio": "9:16",
        "unknown": {"nested": [1]},
    }
    response = post(client, edges)
    assert response.status_code == 200
    assert response.headers["seed"] == str(MAX_SEED)
    nulls = post(
        client, {"prompt": "x", "aspect_ratio": None, "seed": None, "guidance_scale": None}
    )
    assert nulls.status_code == 200
    assert decode(nulls.content).size == (1024, 1024)
    keys = list(emu.stats.generated)
    assert (SCHNELL, "x", int(nulls.headers["seed"]), "1:1", 4, 3.5, False, "jpeg") in keys


def test_oversized_body_is_a_413(client: httpx.Client) -> None:
    response = post(client, {"prompt": "x" * (emulator_module.MAX_BODY_BYTES + 10)})
    assert_error(response, 413, "invalid_request_error")


# ---------------------------------------------------------------------------------------------
# Auth, routing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "", f"Basic {KEY}", "Bearer", "Bearer wrong-key-123", KEY, f"Bearer {KEY}x"],
)
def test_bad_or_missing_key_is_a_401_that_never_echoes_keys(
    emu: Emulator, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = httpx.post(emu.base_url + SCHNELL_ROUTE, json={"prompt": "x"}, headers=headers)
    error = assert_error(response, 401, "authentication_error")
    assert error["message"] == "The API key you provided is invalid."
    assert KEY not in response.text
    assert "wrong-key-123" not in response.text
    assert KEY not in str(response.headers)


def test_without_a_configured_key_any_bearer_key_is_accepted(
    client: httpx.Client, emu: Emulator
) -> None:
    emu.configure(api_key=None)
    anything = post(client, {"prompt": "x"}, headers={"Authorization": "Bearer anything"})
    assert anything.status_code == 200
    empty = post(client, {"prompt": "x"}, headers={"Authorization": "Bearer"})
    assert_error(empty, 401, "authentication_error")


def test_unknown_model_is_a_404(client: httpx.Client) -> None:
    error = assert_error(
        post(client, {"prompt": "x"}, model="flux-2-ultra"), 404, "not_found_error"
    )
    assert error["code"] == "NOT_FOUND"
    assert error["message"] == ("Model not found, inaccessible, and/or not deployed: flux-2-ultra")


def test_unknown_path_and_wrong_method(client: httpx.Client, emu: Emulator) -> None:
    assert_error(client.post("/chat/completions", json={}), 404, "not_found_error")
    assert_error(client.post(SCHNELL_ROUTE + "/", json={"prompt": "x"}), 404, "not_found_error")
    wrong = client.get(SCHNELL_ROUTE)
    assert_error(wrong, 405, "invalid_request_error")
    assert "POST" in wrong.headers["allow"]
    assert emu.stats.by_status == {405: 1}


# ---------------------------------------------------------------------------------------------
# Content filtering
# ---------------------------------------------------------------------------------------------


def test_filtered_generation_is_black_same_size_and_billed(
    client: httpx.Client, emu: Emulator
) -> None:
    body = {"prompt": "An NSFW scene", "safety_check": True, "aspect_ratio": "16:9", "seed": 9}
    response = post(client, body)
    assert response.status_code == 200
    assert response.headers["finish-reason"] == "CONTENT_FILTERED"
    assert response.headers["seed"] == "9"
    image = decode(response.content)
    assert image.size == ASPECT_RATIO_SIZES["16:9"]
    assert image.convert("RGB").getextrema() == ((0, 0), (0, 0), (0, 0))
    as_json = post(client, body, headers={"Accept": "application/json"})
    assert as_json.json()["finishReason"] == "CONTENT_FILTERED"
    assert json_image(as_json).getextrema() == ((0, 0), (0, 0), (0, 0))
    unchecked = post(client, {**body, "safety_check": False})
    assert unchecked.headers["finish-reason"] == "SUCCESS"
    assert decode(unchecked.content).convert("RGB").getextrema() != ((0, 0), (0, 0), (0, 0))
    assert emu.stats.generations == 3


def test_filter_words_are_configurable(client: httpx.Client, emu: Emulator) -> None:
    emu.configure(filter_words=("dragon",))
    dragon = post(client, {"prompt": "A DRAGON", "safety_check": True})
    nsfw = post(client, {"prompt": "nsfw", "safety_check": True})
    assert dragon.headers["finish-reason"] == "CONTENT_FILTERED"
    assert nsfw.headers["finish-reason"] == "SUCCESS"


# ---------------------------------------------------------------------------------------------
# Rate limits and random faults
# ---------------------------------------------------------------------------------------------


def test_rpm_limit_answers_429_once_the_window_is_full(
    client: httpx.Client, emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu.configure(rpm_limit=2)
    first, second = post(client, {"prompt": "a"}), post(client, {"prompt": "b"})
    assert [first.status_code, second.status_code] == [200, 200]
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert second.headers["x-ratelimit-over-limit"] == "no"
    third = post(client, {"prompt": "c"})
    assert_error(third, 429, "rate_limit_error")
    assert 1 <= int(third.headers["retry-after"]) <= 60
    assert third.headers["x-ratelimit-over-limit"] == "yes"
    assert third.headers["x-ratelimit-remaining-requests"] == "0"
    assert emu.stats.generations == 2

    later = emulator_state.monotonic_now() + 61  # the window slides: move the clock, don't sleep
    monkeypatch.setattr(emulator_state, "monotonic_now", lambda: later)
    assert post(client, {"prompt": "d"}).status_code == 200


def test_random_faults_are_reproducible_with_fault_seed(
    client: httpx.Client, emu: Emulator
) -> None:
    emu.configure(rate_429=0.3, rate_5xx=0.3, status_5xx=502, fault_seed=7)

    def statuses() -> list[int]:
        return [post(client, {"prompt": f"p{i}"}).status_code for i in range(16)]

    first = statuses()
    emu.reset()
    assert statuses() == first
    assert {200, 429, 502} <= set(first)
    emu.configure(fault_seed=8)
    assert statuses() != first


def test_random_fault_answers_have_the_error_shape(client: httpx.Client, emu: Emulator) -> None:
    emu.configure(rate_429=1.0, retry_after_s=2.5)
    limited = post(client, {"prompt": "x"})
    assert_error(limited, 429, "rate_limit_error")
    assert limited.headers["retry-after"] == "2.5"
    emu.configure(retry_after_s=None)
    assert "retry-after" not in post(client, {"prompt": "x"}).headers
    emu.configure(rate_429=0.0, rate_5xx=1.0)
    assert_error(post(client, {"prompt": "x"}), 503, "server_error")
    assert emu.stats.generations == 0


# ---------------------------------------------------------------------------------------------
# Fault markers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 402, 418, 429, 500, 503, 520])
def test_status_marker(client: httpx.Client, emu: Emulator, status: int) -> None:
    response = post(client, {"prompt": f"boom [[status:{status}]]"})
    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "code", "type", "param"}
    assert ("retry-after" in response.headers) == (status == 429)
    assert emu.stats.generations == 0


def test_flaky_marker_fails_the_first_n_tries_per_prompt_and_seed(
    client: httpx.Client, emu: Emulator
) -> None:
    body = {"prompt": "[[flaky:2]] a mountain", "seed": 5}
    assert [post(client, body).status_code for _ in range(4)] == [503, 503, 200, 200]
    assert post(client, {**body, "seed": 6}).status_code == 503
    assert emu.stats.generations == 2
    emu.reset()
    assert post(client, body).status_code == 503


def test_drop_marker_cuts_the_connection_mid_body(
    client: httpx.Client, emu: Emulator, capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        post(client, {"prompt": "[[fault:drop]] a boat"})
    assert emu.stats.wait_for(lambda s: s.in_flight == 0, timeout=5)
    assert emu.stats.generations == 1
    assert emu.stats.by_status == {200: 1}
    assert "without completing" not in capfd.readouterr().err
    assert post(client, {"prompt": "after the drop"}).status_code == 200


def test_truncate_marker_sends_half_an_image_with_a_consistent_length(
    client: httpx.Client, emu: Emulator
) -> None:
    for accept in ("image/jpeg", "image/png"):
        response = post(client, {"prompt": "[[fault:truncate]] a boat"}, headers={"Accept": accept})
        assert response.status_code == 200
        assert int(response.headers["content-length"]) == len(response.content)
        with pytest.raises(OSError):
            decode(response.content)
    assert emu.stats.generations == 2


def test_garbage_marker_sends_bytes_that_are_no_image(client: httpx.Client, emu: Emulator) -> None:
    response = post(client, {"prompt": "[[fault:garbage]] a boat"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    with pytest.raises(UnidentifiedImageError):
        decode(response.content)
    assert emu.stats.generations == 1


def test_html_marker_sends_a_proxy_page(client: httpx.Client, emu: Emulator) -> None:
    response = post(client, {"prompt": "[[fault:html]] a boat"}, headers={"Accept": "image/jpeg"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<html" in response.text
    assert emu.stats.generations == 0


def test_json_no_images_marker(client: httpx.Client, emu: Emulator) -> None:
    response = post(
        client, {"prompt": "[[fault:json-no-images]]"}, headers={"Accept": "application/json"}
    )
    assert response.status_code == 200
    assert response.json()["base64"] == []
    assert emu.stats.generations == 0


def test_slow_marker_delays_the_answer(client: httpx.Client, emu: Emulator) -> None:
    assert post(client, {"prompt": "[[fault:slow=0.2]] quick"}).status_code == 200
    with pytest.raises(httpx.ReadTimeout):
        post(client, {"prompt": "[[fault:slow=30]] slow"}, timeout=httpx.Timeout(10, read=0.3))
    # The client gave up: the server notices, stops waiting and frees the slot.
    assert emu.stats.wait_for(lambda s: s.in_flight == 0, timeout=5)
    assert emu.stats.by_status == {200: 1, 499: 1}
    assert emu.stats.generations == 1


# ---------------------------------------------------------------------------------------------
# Sizes for benchmarks, concurrency, stats and control routes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aspect_ratio", ["1:1", "21:9", "9:16"])
def test_image_kb_makes_jpegs_about_that_big(
    client: httpx.Client, emu: Emulator, aspect_ratio: str
) -> None:
    emu.configure(image_kb=300)
    body = {"prompt": "sized for benchmarks", "aspect_ratio": aspect_ratio, "seed": 4}
    response = post(client, body)
    assert 0.75 * 300 * 1024 <= len(response.content) <= 1.25 * 300 * 1024
    assert decode(response.content).size == ASPECT_RATIO_SIZES[aspect_ratio]
    assert post(client, body).content == response.content


def test_concurrent_requests_are_served_in_parallel(client: httpx.Client, emu: Emulator) -> None:
    emu.configure(latency_s=0.5)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(post, client, {"prompt": f"parallel {i}"}) for i in range(4)]
        # All four are inside the handler at once, so the latency sleep does not block the loop.
        assert emu.stats.wait_for(lambda s: s.in_flight == 4, timeout=5)
        assert [f.result().status_code for f in futures] == [200] * 4
    assert emu.stats.max_in_flight == 4
    assert emu.stats.in_flight == 0


def test_stats_count_requests_generations_statuses_and_duplicates(
    client: httpx.Client, emu: Emulator
) -> None:
    same = {"prompt": "twice", "seed": 77}
    for body in (same, same, {"prompt": "once", "seed": 77}, {"prompt": ""}):
        post(client, body)
    stats = emu.stats
    assert (stats.requests, stats.generations) == (4, 3)
    assert stats.by_status == {200: 3, 400: 1}
    assert stats.generated[(SCHNELL, "twice", 77, "1:1", 4, 3.5, False, "jpeg")] == 2
    assert stats.duplicates == 1
    snapshot = stats.as_dict()
    assert snapshot["generated_duplicates"] == 1
    assert snapshot["generated_unique"] == 2
    emu.reset_stats()
    assert (stats.requests, stats.generations, stats.by_status, stats.duplicates) == (0, 0, {}, 0)


def test_control_routes(emu: Emulator, client: httpx.Client) -> None:
    post(client, {"prompt": "one", "seed": 1})
    post(client, {"prompt": "one", "seed": 1})
    with httpx.Client(base_url=emu.url, headers=emu.control_headers) as control:
        stats = control.get("/_emulator/stats").json()
        assert stats["requests"] == 2
        assert stats["generated_duplicates"] == 1
        assert stats["by_status"] == {"200": 2}

        changed = control.post("/_emulator/config", json={"rpm_limit": 5, "filter_words": ["owl"]})
        assert changed.status_code == 200
        assert (emu.config.rpm_limit, emu.config.filter_words) == (5, ("owl",))
        assert changed.json()["api_key"] == "<set>"
        assert KEY not in changed.text
        assert control.get("/_emulator/config").json()["rpm_limit"] == 5

        assert_error(
            control.post("/_emulator/config", json={"nope": 1}), 400, "invalid_request_error"
        )
        assert_error(
            control.post("/_emulator/config", json={"rate_429": 2}), 400, "invalid_request_error"
        )
        assert_error(control.post("/_emulator/config", content=b"[]"), 400, "invalid_request_error")
        assert emu.config.rate_429 == 0.0

        reset = control.post("/_emulator/reset").json()
        assert (reset["requests"], reset["generated_duplicates"]) == (0, 0)


# The control routes answer this machine's tools only: not a web page, not a rebound DNS name.
EVIL = "http://evil.example"


def control_call(emu: Emulator, method: str, path: str, **headers: str) -> httpx.Response:
    """A raw request as a browser would send it: a text/plain body needs no CORS preflight."""
    body = b'{"api_key": null}' if method == "POST" else None
    with httpx.Client(base_url=emu.url, timeout=10) as http:
        return http.request(
            method, path, content=body, headers={"Content-Type": "text/plain", **headers}
        )


@pytest.mark.parametrize("path", ["/_emulator/config", "/_emulator/reset"])
def test_changes_need_the_control_token(emu: Emulator, path: str) -> None:
    for token in ({}, {"X-Emulator-Token": "guess"}, {"X-Emulator-Token": ""}):
        answer = control_call(emu, "POST", path, **token)
        assert_error(answer, 401, "authentication_error")
        assert "X-Emulator-Token" in answer.text and emu.control_token not in answer.text
    assert emu.config.api_key == KEY  # the key check was not switched off
    ok = control_call(emu, "POST", "/_emulator/config", **emu.control_headers)
    assert ok.status_code == 200 and emu.config.api_key is None


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": EVIL},
        {"Origin": "null"},
        {"Origin": "http://localhost:1"},  # another local port is another origin
        {"Origin": "https://127.0.0.1:{port}"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Host": "evil.example:{port}"},  # DNS rebinding: the page's own name, our address
        {"Host": "evil.example"},
        {"Host": "127.0.0.1:{other}"},
        {"Host": "[::1"},
    ],
)
def test_cross_origin_and_foreign_host_requests_are_refused(
    emu: Emulator, client: httpx.Client, headers: dict[str, str]
) -> None:
    filled = {
        k: v.format(port=emu.port, other=emu.port + 1 if emu.port < 65535 else 1)
        for k, v in headers.items()
    }
    for method, path in (("POST", "/_emulator/config"), ("POST", "/_emulator/reset")):
        answer = control_call(emu, method, path, **emu.control_headers, **filled)
        assert_error(answer, 403, "permission_error")
    for path in ("/_emulator/config", "/_emulator/stats"):
        assert_error(control_call(emu, "GET", path, **filled), 403, "permission_error")
    assert emu.config.api_key == KEY
    # The API routes answer as Fireworks does, whatever the Host (tunnels, proxies).
    assert post(client, {"prompt": "x"}, headers=filled).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Host": "localhost:{port}"},
        {"Origin": "http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"},
        {"Origin": "http://localhost:{port}"},
        {"Sec-Fetch-Site": "none"},
    ],
)
def test_this_machines_own_spellings_are_accepted(emu: Emulator, headers: dict[str, str]) -> None:
    filled = {k: v.format(port=emu.port) for k, v in headers.items()}
    assert control_call(emu, "GET", "/_emulator/stats", **filled).status_code == 200
    answer = control_call(emu, "POST", "/_emulator/reset", **emu.control_headers, **filled)
    assert answer.status_code == 200


def test_each_emulator_has_its_own_token_and_hides_it(emu: Emulator) -> None:
    with Emulator() as other:
        assert other.control_token != emu.control_token and len(other.control_token) >= 32
        answer = control_call(other, "POST", "/_emulator/reset", **emu.control_headers)
        assert answer.status_code == 401
    assert emu.control_token not in repr(emu)
    chosen = emulator_module.create_app(
        EmulatorConfig(), emulator_module.EmulatorStats(), control_token="chosen-token"
    )
    assert chosen.state.control_token == "chosen-token"


def test_configure_is_all_or_nothing(emu: Emulator) -> None:
    with pytest.raises(ValueError, match="unknown"):
        emu.configure(latency_s=1.0, nope=True)
    with pytest.raises(ValueError, match="rate_429"):
        emu.configure(latency_s=1.0, rate_429=1.5)
    assert emu.config.latency_s == 0.0


def test_server_logs_neither_keys_nor_prompts(
    client: httpx.Client, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    secret_prompt = "secret-prompt-7f3a9"
    post(client, {"prompt": secret_prompt})
    post(client, {"prompt": secret_prompt, "seed": "bad"})
    post(client, {"prompt": secret_prompt}, headers={"Authorization": "Bearer other-key-55"})
    post(client, {"prompt": secret_prompt + " [[status:500]]"})
    out, err = capfd.readouterr()
    logged = out + err + caplog.text
    for secret in (KEY, "other-key-55", secret_prompt):
        assert secret not in logged


# ---------------------------------------------------------------------------------------------
# Lifecycle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::", "example.com", ""])
def test_non_loopback_hosts_are_refused(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        Emulator(host=host)


def test_loopback_names_are_accepted() -> None:
    with Emulator(host="localhost") as local:
        assert local.base_url.startswith("http://127.0.0.1:")
        assert local.base_url.endswith("/inference/v1")


def test_two_emulators_run_side_by_side() -> None:
    with (
        Emulator(EmulatorConfig(api_key="key-a")) as a,
        Emulator(EmulatorConfig(api_key="key-b", rate_5xx=1.0)) as b,
    ):
        assert a.port != b.port
        url_a, url_b = a.base_url + SCHNELL_ROUTE, b.base_url + SCHNELL_ROUTE
        ok = httpx.post(url_a, json={"prompt": "x"}, headers={"Authorization": "Bearer key-a"})
        failing = httpx.post(url_b, json={"prompt": "x"}, headers={"Authorization": "Bearer key-b"})
        wrong = httpx.post(url_b, json={"prompt": "x"}, headers={"Authorization": "Bearer key-a"})
        assert (ok.status_code, failing.status_code, wrong.status_code) == (200, 503, 401)
        assert (a.stats.requests, b.stats.requests) == (1, 2)
    with pytest.raises(httpx.ConnectError):
        httpx.post(url_a, json={"prompt": "x"})


def test_conftest_emulator_fixture(emulator: Emulator) -> None:
    headers = {"Authorization": f"Bearer {emulator.config.api_key}"}
    response = httpx.post(emulator.base_url + SCHNELL_ROUTE, json={"prompt": "x"}, headers=headers)
    assert response.status_code == 200
    assert emulator.stats.generations == 1


def test_serve_runs_in_the_foreground_for_the_cli() -> None:
    code = "from flux_flows.emulator import serve\nserve(port=0)\n"
    process = subprocess.Popen(
        [sys.executable, "-c", code], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()  # printed once the socket is listening
        base_url = line.strip().rpartition("FIREWORKS_BASE_URL=")[2]
        assert base_url.startswith("http://127.0.0.1:")
        headers = {"Authorization": "Bearer any-key"}
        response = httpx.post(base_url + SCHNELL_ROUTE, json={"prompt": "x"}, headers=headers)
        assert response.status_code == 200
        origin = base_url.removesuffix("/inference/v1")
        stats = httpx.get(origin + "/_emulator/stats").json()
        assert stats["generations"] == 1
        token_line = process.stderr.readline()  # the control token, made at start
        assert "X-Emulator-Token" in token_line
        token = token_line.strip().rpartition(" ")[2]
        assert httpx.post(origin + "/_emulator/reset").status_code == 401
        reset = httpx.post(origin + "/_emulator/reset", headers={"X-Emulator-Token": token})
        assert reset.status_code == 200 and reset.json()["generations"] == 0
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()


def test_render_image_matches_what_is_served(client: httpx.Client) -> None:
    response = post(client, {"prompt": "direct", "seed": 5}, headers={"Accept": "image/png"})
    assert decode(response.content).tobytes() == draw_picture("direct", 5, 1024, 1024).tobytes()


def test_json_payload_round_trips(client: httpx.Client) -> None:
    response = post(
        client, {"prompt": "round trip", "seed": 8}, headers={"Accept": "application/json"}
    )
    assert json.loads(response.content)["seed"] == 8
