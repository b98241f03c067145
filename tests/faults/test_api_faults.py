"""The fault matrix, API faults: 429 storms, 5xx, flaky answers, broken and slow answers, wrong
content types (tests/helpers/matrix.py: the invariants every scenario is checked against)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from flux_flows.client import FluxClient, RetryPolicy
from flux_flows.errors import APITimeoutError, ResponseError, ServerError
from flux_flows.models import ImageRequest
from helpers.common import TEST_API_KEY
from helpers.matrix import (
    ATTEMPTS,
    FAST,
    Row,
    Scenario,
    assert_retried_then_errors,
    distinct,
    errors_of,
    generated_snapshot,
    line_of,
)

pytestmark = pytest.mark.usefixtures("flow_env")

# --------------------------------------------------------------------------------------------
# 429 and 5xx from the API
# --------------------------------------------------------------------------------------------


def test_429_storm_with_retry_after(scenario: Callable[..., Scenario], s3_bucket: str) -> None:
    sc = scenario("429 storm, 50% of requests, `Retry-After: 0.05`", f"s3://{s3_bucket}/run")
    prompts = [*distinct("storm", 15), "storm nsfw 15"]
    sc.emulator.configure(rate_429=0.5, retry_after_s=0.05, fault_seed=429)
    first = sc.run(prompts, max_concurrency=4, safety_check=True)
    assert sc.emulator.stats.by_status.get(429, 0) >= 4
    assert first.kinds["filtered"] == 1
    assert_retried_then_errors(first, "RateLimitError")
    sc.emulator.configure(rate_429=0.0)
    second = sc.run(prompts, max_concurrency=4, safety_check=True)
    # Only the images that used up their retries are generated again, nothing else.
    assert set(second.generated) == first.keys("error")
    assert second.kinds["error"] == 0
    sc.expected_rerun = str(first.kinds["error"])
    sc.record(
        "429s retried (the wait follows the server's Retry-After: "
        "`test_client.py::test_retry_after_is_honoured`); an image still refused after "
        f"{ATTEMPTS} attempts is ERROR (RateLimitError); the re-run generates only those"
    )


def test_429_storm_without_retry_after(scenario: Callable[..., Scenario], s3_bucket: str) -> None:
    sc = scenario("429 storm, 30%, no `Retry-After`", f"s3://{s3_bucket}/run")
    prompts = distinct("no retry-after", 8)
    sc.emulator.configure(rate_429=0.3, retry_after_s=None, fault_seed=7)
    first = sc.run(prompts, max_concurrency=4)
    assert sc.emulator.stats.by_status.get(429, 0) >= 1
    assert_retried_then_errors(first, "RateLimitError")
    sc.emulator.configure(rate_429=0.0)
    second = sc.run(prompts, max_concurrency=4)
    assert set(second.generated) == first.keys("error")
    assert second.kinds["error"] == 0
    sc.expected_rerun = str(first.kinds["error"])
    sc.record(
        "429s retried with exponential backoff "
        "(`test_client.py::test_429_without_retry_after_backs_off_exponentially`); an image "
        f"still refused after {ATTEMPTS} attempts is ERROR; the re-run generates only those"
    )


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_transient_5xx(scenario: Callable[..., Scenario], s3_bucket: str, status: int) -> None:
    sc = scenario(f"transient {status}, 30% of requests", f"s3://{s3_bucket}/run")
    prompts = distinct(f"transient {status}", 8)
    sc.emulator.configure(rate_5xx=0.3, status_5xx=status, fault_seed=status)
    first = sc.run(prompts, max_concurrency=4)
    assert sc.emulator.stats.by_status.get(status, 0) >= 1
    assert_retried_then_errors(first, "ServerError")
    sc.emulator.configure(rate_5xx=0.0)
    second = sc.run(prompts, max_concurrency=4)
    assert set(second.generated) == first.keys("error")
    assert second.kinds["error"] == 0
    sc.expected_rerun = str(first.kinds["error"])
    sc.record(
        f"retried with backoff; an image still failing after {ATTEMPTS} attempts is ERROR "
        "(ServerError); the re-run generates only those"
    )


def test_5xx_outage_then_rerun(scenario: Callable[..., Scenario], s3_bucket: str) -> None:
    sc = scenario("API outage: every request 500", f"s3://{s3_bucket}/run")
    prompts = distinct("outage", 4)
    sc.emulator.configure(rate_5xx=1.0, status_5xx=500)
    first = sc.run(prompts, max_concurrency=4)
    n = len(prompts)
    assert first.kinds["error"] == n and first.requests == n * ATTEMPTS
    assert all(
        "ServerError" in (r.error or "")
        and "500" in (r.error or "")
        and f"{ATTEMPTS} attempts" in (r.error or "")
        for r in first.report.records
    )
    assert all(r.api_calls == ATTEMPTS for r in first.report.records)
    assert not first.generated  # nothing billed
    assert first.state.is_completed()
    sc.emulator.configure(rate_5xx=0.0)
    second = sc.run(prompts, max_concurrency=4)
    assert second.kinds["stored"] == n and sum(second.generated.values()) == n
    sc.expected_rerun = str(n)
    sc.record(
        f"{ATTEMPTS} attempts each, then ERROR (ServerError, HTTP 500); nothing billed; the "
        f"re-run generates the {n}"
    )


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_permanent_5xx_at_the_client(emulator: Any, status: int) -> None:
    """Per status code, fast retries: 5 attempts, then ServerError naming the status; no bill."""
    client = FluxClient(TEST_API_KEY, base_url=emulator.base_url, retry=FAST)
    with client, pytest.raises(ServerError) as info:
        client.generate(ImageRequest(prompt=f"down [[status:{status}]]"))
    assert info.value.status_code == status and info.value.attempts == 5
    assert emulator.stats.requests == 5 and emulator.stats.generations == 0


def test_flaky_503_then_success(scenario: Callable[..., Scenario], s3_bucket: str) -> None:
    sc = scenario("`[[flaky:2]]`: two 503s, then an answer", f"s3://{s3_bucket}/run")
    prompts = ["flaky fox [[flaky:2]]", "flaky cat [[flaky:1]]", "steady owl"]
    first = sc.run(prompts)
    assert first.kinds["stored"] == 3
    assert [r.api_calls for r in first.report.records] == [3, 2, 1]
    assert sum(first.generated.values()) == 3
    sc.record("retried, stored; API calls 3/2/1 recorded per image")


# --------------------------------------------------------------------------------------------
# Broken answers: slow, dropped, truncated, garbled, wrong content types
# --------------------------------------------------------------------------------------------


def test_broken_answers(scenario: Callable[..., Scenario], s3_bucket: str) -> None:
    sc = scenario(
        "broken 200 answers: dropped mid-body, truncated, garbage, HTML page, JSON without images",
        f"s3://{s3_bucket}/run",
    )
    faulty = [
        "cut [[fault:drop]]",
        "half [[fault:truncate]]",
        "noise [[fault:garbage]]",
        "proxy [[fault:html]]",
        "empty [[fault:json-no-images]]",
    ]
    prompts = [*faulty, *distinct("healthy", 3)]
    first = sc.run(prompts, max_concurrency=8)
    records = {r.prompt: r for r in first.report.records}
    assert first.kinds == {"error": 5, "stored": 3}
    assert "APIConnectionError" in (records[faulty[0]].error or "")
    assert records[faulty[0]].api_calls == 5  # a dropped connection is a network error: retried
    assert "truncated" in (records[faulty[1]].error or "")
    assert "not a JPEG or PNG" in (records[faulty[2]].error or "")
    assert "text/html" in (records[faulty[3]].error or "")
    assert "no image" in (records[faulty[4]].error or "")
    for prompt in faulty[1:]:
        assert records[prompt].api_calls == 1  # a malformed answer is not retried blindly
    # Only the broken deliveries were billed and not delivered: drop 5 times, the others once.
    billed = {key[1]: count for key, count in first.generated.items()}
    assert billed == {faulty[0]: 5, faulty[1]: 1, faulty[2]: 1, **dict.fromkeys(prompts[5:], 1)}
    assert all(records[p].uri is None for p in faulty)
    assert all("ResponseError" in (records[p].error or "") for p in faulty[1:])
    sc.record(
        f"each broken answer is ERROR with a message naming the break (drop: "
        f"APIConnectionError, {records[faulty[0]].api_calls} attempts; truncate/garbage/html/"
        f"no-images: ResponseError, 1 attempt); none of them stored; the "
        f"{len(prompts) - len(faulty)} healthy images stored"
    )


def test_slow_answer_past_the_client_timeout(
    emulator: Any, fault_matrix: list[Row], request: pytest.FixtureRequest
) -> None:
    """A timed-out request is abandoned by the client; the emulator then never generates it.

    On the client alone (the flow's own case is the next test): one image, so its row's
    figures are this call's outcome, each counted here."""
    slow_s, timeout_s, retries = 1.5, 0.3, 1
    with (
        FluxClient(
            TEST_API_KEY,
            base_url=emulator.base_url,
            timeout_s=timeout_s,
            retry=RetryPolicy(max_retries=retries, initial_delay_s=0.01),
        ) as client,
        pytest.raises(APITimeoutError) as info,
    ):
        client.generate(ImageRequest(prompt=f"slow [[fault:slow={slow_s}]]"))
    attempts = info.value.attempts
    assert attempts == retries + 1
    assert f"No answer from Fireworks in time after {attempts}" in str(info.value)
    generated, requests = generated_snapshot(emulator)
    assert requests == attempts and not generated
    hung_up = emulator.stats.by_status.get(499, 0)
    assert emulator.stats.by_status == {499: attempts}  # the server saw the client hang up
    row = Row(
        f"slow answer ({slow_s} s) past the client timeout ({timeout_s} s), on the client",
        f"APITimeoutError after {attempts} attempts; the server saw the client hang up "
        f"({hung_up} requests ended 499) and generated nothing",
        request.node.name,
        1, 0, 0, 1, 0,  # one image, no answer: the raise above
        sum(generated.values()), 0, 0, "n/a",
    )  # fmt: skip
    fault_matrix.append(row)
    print("MATRIX " + line_of(row))


def test_slow_answer_past_the_timeout_in_a_flow(
    scenario: Callable[..., Scenario], tmp_path: Path
) -> None:
    from flux_flows import FireworksCredentials

    slow_s, timeout_s = 1.5, 0.3
    sc = scenario(
        f"slow answer ({slow_s} s) past the timeout ({timeout_s} s) set on the flow's "
        "`FireworksCredentials` (`max_retries=0`)",
        str(tmp_path / "out"),
    )
    credentials = FireworksCredentials(
        api_key=TEST_API_KEY, base_url=sc.emulator.base_url, timeout_s=timeout_s, max_retries=0
    )
    first = sc.run([f"slow [[fault:slow={slow_s}]]", "quick"], credentials=credentials)
    assert first.kinds == {"error": 1, "stored": 1}
    (slow,) = errors_of(first)
    assert "APITimeoutError" in (slow.error or "") and slow.api_calls == 1, slow
    sc.record(
        f"the slow image is ERROR (APITimeoutError, {slow.api_calls} attempt) and was not "
        "generated; the other image stored"
    )


@pytest.mark.parametrize(
    ("content_type", "body", "accepted"),
    [
        ("application/octet-stream", "jpeg", True),
        ("image/png", "jpeg", True),  # labelled PNG, really a JPEG: stored as what it is
        ("text/plain", "jpeg", False),
        ("text/html; charset=utf-8", "<html>busy</html>", False),
        ("application/json", '{"base64": ["not base64!"]}', False),
        ("image/jpeg", "", False),
    ],
)
def test_wrong_content_types(content_type: str, body: str, accepted: bool) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    payload = buffer.getvalue() if body == "jpeg" else body.encode()
    calls = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, headers={"content-type": content_type}, content=payload)

    client = FluxClient(
        TEST_API_KEY,
        base_url="http://127.0.0.1:9/inference/v1",
        retry=FAST,
        transport=httpx.MockTransport(answer),  # a wire-level stand-in for this test's answers
    )
    with client:
        if accepted:
            image = client.generate(ImageRequest(prompt="typed"))
            assert image.content_type == "image/jpeg"
        else:
            with pytest.raises(ResponseError):
                client.generate(ImageRequest(prompt="typed"))
    assert len(calls) == 1  # a malformed answer is reported, not retried
