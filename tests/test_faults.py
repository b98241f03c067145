"""The fault matrix: every failure the API, the network, S3 or the machine can throw at a batch.

Each scenario runs the real flow against the emulator over HTTP and a moto S3 server, injects one
kind of fault (emulator knobs and prompt markers; S3 answers through botocore's `before-send`
event on the library's own cached client; SIGKILL of a running batch), and then checks the same
invariants (`Scenario.run`):

1. every requested image ends as exactly one of: stored (SUCCESS, the object exists),
   CONTENT_FILTERED (recorded, bytes under filtered/), ERROR (with a message), or spilled (the
   local file exists);
2. nothing the emulator generated (billed) is lost: every generation is stored, spilled or
   recorded as filtered. A generation whose *delivery* broke (connection dropped mid-body,
   truncated or garbled bytes) never reached the library: it must be an ERROR, and is counted
   apart as "billed, not delivered";
3. nothing is paid twice, and a re-run generates only what the earlier run did not deliver;
4. the manifest (<destination>/manifest.jsonl, and the run's own copy) equals the BatchReport
   line for line, and the report's API calls equal the requests the emulator saw.

Each scenario adds a row to a table written at the end of the session to
$FLUX_FLOWS_MATRIX_FILE (default /tmp/flux-flows-fault-matrix.md) and printed with `-s`, under a
line naming the command, the date and the commit; RELIABILITY.md is pasted from it. Every figure
in a row is counted from the run (or is a parameter of the test), never typed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import httpx
import pytest
from botocore.awsrequest import AWSResponse
from PIL import Image

from conftest import TEST_API_KEY, wait_for_online_workers
from flux_flows.client import FluxClient, RetryPolicy
from flux_flows.errors import APITimeoutError, ResponseError, ServerError, StorageError
from flux_flows.flows import generate_images
from flux_flows.models import FinishReason, ImageRequest
from flux_flows.results import BatchReport, ImageRecord
from flux_flows.storage.s3 import get_s3_client

pytestmark = pytest.mark.usefixtures("flow_env")


@pytest.fixture(autouse=True)
def _no_flow_heartbeats(prefect_api: None) -> Iterator[None]:
    """Prefect's heartbeat thread sleeps in 1 s steps and is joined when a flow run ends: about
    1 s per flow run. Heartbeats only detect crashed runs on a server; nothing here needs them."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


MATRIX_FILE = Path(os.environ.get("FLUX_FLOWS_MATRIX_FILE", "/tmp/flux-flows-fault-matrix.md"))
FAST = RetryPolicy(max_retries=4, initial_delay_s=0.005, max_delay_s=0.02)
DELIVERY_FAULT = re.compile(r"\[\[fault:(drop|truncate|garbage)\]\]")

# --------------------------------------------------------------------------------------------
# The matrix: one row per scenario, written once at the end of the session
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One scenario. `requested` to `spilled` describe the run with the fault (for a process
    killed by SIGKILL, which writes no records: what the destination and the spill folder held at
    the kill, and `errors` is "-"); `lost`, `paid_twice` and `billed_undelivered` cover every run
    of the scenario; `rerun_generations` is what the follow-up run(s) generated."""

    fault: str
    behaviour: str
    test: str
    requested: int
    stored: int
    filtered: int
    errors: int | str
    spilled: int
    lost: int
    paid_twice: int
    billed_undelivered: int
    rerun_generations: str
    in_flight_at_kill: int | None = None


_ROWS: list[Row] = []
_HEADER = (
    "| fault | what happens | test | requested | stored | filtered | errors | spilled | lost "
    "| paid twice | billed, not delivered | re-run generations |\n"
    "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
)


def _line(row: Row) -> str:
    paid_twice = str(row.paid_twice)
    if row.in_flight_at_kill is not None:
        paid_twice += f" (+{row.in_flight_at_kill} in flight at kill)"
    return (
        f"| {row.fault} | {row.behaviour} | `{row.test}` | {row.requested} | {row.stored} | "
        f"{row.filtered} | {row.errors} | {row.spilled} | {row.lost} | {paid_twice} | "
        f"{row.billed_undelivered} | {row.rerun_generations} |"
    )


def _provenance(config: pytest.Config) -> str:
    """The command, the date and the commit the table comes from (a changed tree is said)."""
    import datetime as dt

    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--", "flux_flows", "tests")
    tree = "with uncommitted changes in flux_flows/ or tests/" if changed else "clean tree"
    env = f"FLUX_FLOWS_MATRIX_FILE={MATRIX_FILE} " if "FLUX_FLOWS_MATRIX_FILE" in os.environ else ""
    command = env + "python -m pytest " + " ".join(config.invocation_params.args)
    return (
        f"Generated by `{command}` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC at "
        f"commit {commit} ({tree}); every figure below was counted by the tests."
    )


@pytest.fixture(scope="session")
def fault_matrix(request: pytest.FixtureRequest) -> Iterator[list[Row]]:
    yield _ROWS
    if not _ROWS:
        return
    table = "\n".join([_HEADER, *(_line(r) for r in sorted(_ROWS, key=lambda r: r.test))])
    text = f"{_provenance(request.config)}\n\n{table}\n"
    MATRIX_FILE.write_text(text, encoding="utf-8")
    print(f"\nfault matrix ({len(_ROWS)} rows) written to {MATRIX_FILE}\n{text}")


# --------------------------------------------------------------------------------------------
# Reading what a run left behind (independently of the library's storage code)
# --------------------------------------------------------------------------------------------


class Destination:
    """An s3:// prefix (read with a plain boto3 client, not the library's hooked one) or a folder."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        self.s3 = boto3.client("s3") if uri.startswith("s3://") else None

    @staticmethod
    def _split(uri: str) -> tuple[str, str]:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return bucket, key

    def read(self, uri: str) -> bytes | None:
        if self.s3 is None:
            path = Path(uri)
            return path.read_bytes() if path.is_file() else None
        bucket, key = self._split(uri)
        try:
            return self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            return None

    def exists(self, uri: str) -> bool:
        if self.s3 is None:
            return Path(uri).is_file()
        bucket, key = self._split(uri)
        try:
            self.s3.head_object(Bucket=bucket, Key=key)
        except Exception:
            return False
        return True

    def keys(self, folder: str) -> set[str]:
        """Object names under <destination>/<folder>, relative to the destination."""
        if self.s3 is None:
            root = Path(self.uri)
            return {
                p.relative_to(root).as_posix() for p in (root / folder).glob("*") if p.is_file()
            }
        bucket, prefix = self._split(self.uri)
        root = f"{prefix}/" if prefix else ""
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=root + folder
        )
        return {o["Key"][len(root) :] for page in pages for o in page.get("Contents", [])}

    def manifest(self) -> bytes | None:
        return self.read(f"{self.uri}/manifest.jsonl")


# --------------------------------------------------------------------------------------------
# Invariants
# --------------------------------------------------------------------------------------------

GenKey = tuple[Any, ...]


def emulator_key(record: ImageRecord) -> GenKey:
    """The emulator's identity of a generation (its `stats.generated` key) for a record."""
    return (
        record.model,
        record.prompt,
        record.seed,
        record.aspect_ratio,
        record.num_inference_steps,
        float(record.guidance_scale),
        record.safety_check,
        record.output_format,
    )


def outcome_of(record: ImageRecord, dest: Destination) -> str:
    """Exactly one of stored / filtered / error / spilled, each with its evidence checked."""
    kinds = []
    if record.spill_path:
        kinds.append("spilled")
    elif record.finish_reason is FinishReason.SUCCESS and record.uri:
        kinds.append("stored")
    elif record.finish_reason is FinishReason.CONTENT_FILTERED:
        kinds.append("filtered")
    if record.finish_reason is FinishReason.ERROR:
        kinds.append("error")
    assert len(kinds) == 1, f"record {record.index} has outcomes {kinds}: {record!r}"
    kind = kinds[0]
    if kind == "stored":
        assert dest.exists(record.uri or ""), f"{record.uri} is reported stored but is missing"
    elif kind == "filtered":
        assert record.uri is None, "a filtered answer must never be reported as a real image"
        assert record.filtered_uri and dest.exists(record.filtered_uri), record
    elif kind == "spilled":
        assert record.uri is None and Path(record.spill_path or "").is_file(), record
        assert record.error, "a spilled image must say why it is not in the destination"
    else:
        assert record.uri is None and (record.error or "").strip(), record
    return kind


@dataclass
class RunResult:
    report: BatchReport
    state: Any
    generated: Counter[GenKey]  # generations the emulator billed during this run
    requests: int
    outcomes: dict[str, str]  # cache key -> outcome
    lost: int
    undelivered: int

    @property
    def kinds(self) -> Counter[str]:
        """Outcomes per requested image (a duplicate request counts as its first's outcome)."""
        return Counter(self.outcomes[r.cache_key] for r in self.report.records)

    def keys(self, kind: str) -> set[GenKey]:
        return {emulator_key(r) for r in self.report.records if self.outcomes[r.cache_key] == kind}


def generated_snapshot(emulator: Any) -> tuple[Counter[GenKey], int]:
    """The emulator's billing once it is idle (no request half-way)."""
    assert emulator.stats.wait_for(lambda s: s.in_flight == 0, timeout=30)
    return Counter(emulator.stats.generated), emulator.stats.requests


def check_invariants(
    report: BatchReport,
    dest: Destination,
    generated: Counter[GenKey],
    *,
    manifest_expected: bool = True,
) -> tuple[dict[str, str], int, int]:
    """Outcome per cache key, lost generations, billed-but-undelivered generations."""
    outcomes: dict[str, str] = {}
    for record in report.records:
        kind = outcome_of(record, dest)
        assert outcomes.setdefault(record.cache_key, kind) == kind, "one request, two outcomes"
    assert report.counts == {
        reason.value: sum(1 for r in report.records if r.finish_reason is reason)
        for reason in FinishReason
    }
    by_key = {emulator_key(r): r for r in report.records}
    lost = undelivered = 0
    for key, count in generated.items():
        record = by_key.get(key)
        assert record is not None, f"the emulator generated {key} that no record asked for"
        kind = outcomes[record.cache_key]
        if DELIVERY_FAULT.search(record.prompt):
            assert kind == "error", f"a broken delivery must be an ERROR, got {kind}"
            undelivered += count
        elif kind not in ("stored", "spilled", "filtered"):
            lost += 1
    if manifest_expected:
        manifest = dest.manifest()
        assert manifest is not None, "no manifest.jsonl next to the images"
        lines = [json.loads(line) for line in manifest.decode().splitlines()]
        assert lines == [json.loads(r.model_dump_json()) for r in report.records]
        assert report.manifest_uri and dest.read(report.manifest_uri) == manifest
    return outcomes, lost, undelivered


@dataclass
class Scenario:
    """One fault, one or more runs of the same batch, one row of the matrix."""

    fault: str
    test: str
    emulator: Any
    destination: str
    rows: list[Row]
    runs: list[RunResult] = field(default_factory=list)
    expected_rerun: str = "-"  # what the re-runs should generate, shown beside what they did

    def __post_init__(self) -> None:
        self.dest = Destination(self.destination)
        self.start, _ = generated_snapshot(self.emulator)

    def run(
        self, prompts: list[Any], *, manifest_expected: bool = True, **kwargs: Any
    ) -> RunResult:
        before, requests_before = generated_snapshot(self.emulator)
        state = generate_images(prompts, self.destination, return_state=True, **kwargs)
        report: BatchReport = state.result()
        after, requests_after = generated_snapshot(self.emulator)
        generated = after - before
        outcomes, lost, undelivered = check_invariants(
            report, self.dest, generated, manifest_expected=manifest_expected
        )
        result = RunResult(
            report, state, generated, requests_after - requests_before, outcomes, lost, undelivered
        )
        assert report.api_calls == result.requests, "API calls in the report != requests served"
        if self.runs:
            # A re-run generates only what no earlier run delivered (undelivered = ERROR).
            previous = self.runs[-1]
            delivered = (
                previous.keys("stored") | previous.keys("filtered") | previous.keys("spilled")
            )
            assert not set(generated) & delivered, "a re-run paid again for a delivered image"
            assert set(generated) <= previous.keys("error")
        self.runs.append(result)
        assert lost == 0, f"{lost} generated images were lost"
        assert self.paid_twice == 0, f"{self.paid_twice} images were paid for twice"
        return result

    @property
    def total(self) -> Counter[GenKey]:
        return generated_snapshot(self.emulator)[0] - self.start

    @property
    def paid_twice(self) -> int:
        """Extra generations of an image whose delivery did not break (those are apart)."""
        return sum(
            count - 1
            for key, count in self.total.items()
            if count > 1 and not DELIVERY_FAULT.search(key[1])
        )

    def record(self, behaviour: str) -> Row:
        first = self.runs[0]
        kinds = first.kinds
        reruns = self.runs[1:]
        rerun = (
            " + ".join(str(sum(r.generated.values())) for r in reruns)
            + f" (expected {self.expected_rerun})"
            if reruns
            else "n/a"
        )
        row = Row(
            fault=self.fault,
            behaviour=behaviour,
            test=self.test,
            requested=len(first.report.records),
            stored=kinds["stored"],
            filtered=kinds["filtered"],
            errors=kinds["error"],
            spilled=kinds["spilled"],
            lost=sum(r.lost for r in self.runs),
            paid_twice=self.paid_twice,
            billed_undelivered=sum(r.undelivered for r in self.runs),
            rerun_generations=rerun,
        )
        self.rows.append(row)
        print("MATRIX " + _line(row))
        return row


@pytest.fixture
def scenario(
    request: pytest.FixtureRequest, flow_env: Any, fault_matrix: list[Row]
) -> Callable[..., Scenario]:
    def make(fault: str, destination: str) -> Scenario:
        return Scenario(fault, request.node.name, flow_env, destination, fault_matrix)

    return make


def distinct(prefix: str, n: int) -> list[str]:
    return [f"{prefix} {i:02d}" for i in range(n)]


ATTEMPTS = RetryPolicy().max_retries + 1  # what the flow's client tries before an image is ERROR


def errors_of(result: RunResult) -> list[ImageRecord]:
    return [r for r in result.report.records if r.finish_reason is FinishReason.ERROR]


def assert_retried_then_errors(result: RunResult, error_type: str) -> None:
    """Some request was retried (more calls than images), and an image is ERROR only once it
    used up its attempts, naming the error."""
    assert result.requests > len(result.report.records), "nothing was retried"
    for record in errors_of(result):
        assert error_type in (record.error or ""), record.error
        assert record.api_calls == ATTEMPTS, record


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
    print("MATRIX " + _line(row))


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


# --------------------------------------------------------------------------------------------
# S3 faults, injected on the library's cached client through botocore events
# --------------------------------------------------------------------------------------------


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.data


class S3Faults:
    """Answers PutObject calls whose key matches with an S3 error instead of sending them.

    Registered on `before-send.s3.PutObject` of `get_s3_client()` (the client the flow uses in
    this process); botocore treats the answer as the server's, so its retries apply. `times` is
    how many attempts per object key fail (None: all of them).
    """

    def __init__(self, match: str, status: int = 503, times: int | None = None) -> None:
        self.pattern = re.compile(match)
        self.status = status
        self.times = times
        self.attempts: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        codes = {500: "InternalError", 503: "ServiceUnavailable", 403: "AccessDenied"}
        self.body = (
            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{codes.get(status, "Error")}'
            f"</Code><Message>injected by test_faults</Message></Error>"
        ).encode()

    def __call__(self, request: Any, **_: Any) -> AWSResponse | None:
        path = urlsplit(request.url).path
        if not self.pattern.search(path):
            return None
        self.attempts[path] += 1
        if self.times is not None and self.failed[path] >= self.times:
            return None
        self.failed[path] += 1
        return AWSResponse(
            request.url, self.status, {"Content-Type": "application/xml"}, _Body(self.body)
        )

    @contextlib.contextmanager
    def active(self) -> Iterator[S3Faults]:
        events = get_s3_client().meta.events
        events.register("before-send.s3.PutObject", self)
        try:
            yield self
        finally:
            events.unregister("before-send.s3.PutObject", self)


def test_s3_hook_fails_puts_and_botocore_retries_them(s3_bucket: str) -> None:
    """The injection mechanism itself: a real botocore retry loop sees our 503s."""
    from botocore.exceptions import ClientError

    client = get_s3_client()
    with S3Faults(r"/probe-", status=503, times=2).active() as faults:
        client.put_object(Bucket=s3_bucket, Key="probe-ok", Body=b"x")
        faults.times = None
        with pytest.raises(ClientError, match="reached max retries: 4"):
            client.put_object(Bucket=s3_bucket, Key="probe-never", Body=b"x")
    assert faults.attempts[f"/{s3_bucket}/probe-ok"] == 3  # 2 injected 503s, then sent
    assert faults.attempts[f"/{s3_bucket}/probe-never"] == 5  # botocore's 5 attempts
    assert boto3.client("s3").head_object(Bucket=s3_bucket, Key="probe-ok")


def test_s3_transient_put_failures_are_retried_and_stored(
    scenario: Callable[..., Scenario], s3_bucket: str
) -> None:
    sc = scenario("S3 PutObject 500 twice per image, then OK", f"s3://{s3_bucket}/run")
    prompts = [*distinct("s3 transient", 5), "s3 transient nsfw"]
    with S3Faults(r"/(images|filtered)/", status=500, times=2).active() as faults:
        first = sc.run(prompts, safety_check=True)
    assert first.kinds == {"stored": 5, "filtered": 1}
    assert len(faults.attempts) == 6 and set(faults.attempts.values()) == {3}
    sc.record("botocore retries (3 attempts per object); stored, nothing spilled")


def test_s3_permanent_put_failure_spills_and_rerun_uploads_without_paying(
    scenario: Callable[..., Scenario], s3_bucket: str
) -> None:
    sc = scenario("S3 PutObject 503 on every attempt", f"s3://{s3_bucket}/run")
    prompts = [*distinct("s3 down", 4), "s3 down nsfw"]
    with S3Faults(r"/(images|filtered)/", status=503).active() as faults:
        first = sc.run(prompts, safety_check=True)
    assert first.kinds == {"spilled": 5}
    assert set(faults.attempts.values()) == {5}  # botocore's attempts, then the spill
    assert all("upload failed, kept locally" in (r.error or "") for r in first.report.records)
    assert "kept locally" in (first.state.message or "")
    spilled = {r.cache_key: Path(r.spill_path or "") for r in first.report.records}
    spilled_bytes = {key: path.read_bytes() for key, path in spilled.items()}
    # S3 still down: the re-run tries the spilled bytes again, keeps them, and pays for nothing.
    with S3Faults(r"/(images|filtered)/", status=503).active():
        second = sc.run(prompts, safety_check=True)
    assert second.kinds == {"spilled": 5} and second.requests == 0
    assert all("still kept locally" in (r.error or "") for r in second.report.records)
    assert all(path.read_bytes() == spilled_bytes[key] for key, path in spilled.items())
    # S3 is back: the next run uploads the spilled bytes and pays for nothing.
    third = sc.run(prompts, safety_check=True)
    assert third.kinds == {"stored": 4, "filtered": 1}
    assert not third.generated and third.requests == 0
    assert all(r.cached for r in third.report.records)
    assert not any(path.exists() for path in spilled.values())
    for record in third.report.records:
        uri = record.uri or record.filtered_uri or ""
        assert sc.dest.read(uri) == spilled_bytes[record.cache_key]
    sc.expected_rerun = "0, 0"
    sc.record(
        "spilled locally after botocore's 5 attempts; a re-run while S3 is down keeps the spill; "
        "once S3 is back the re-run uploads it with no API call"
    )


def test_unusable_spill_folder_fails_before_any_spend(
    flow_env: Any, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "read-only-home"
    blocker.write_text("a file where the spill folder should be")
    monkeypatch.setenv("FLUX_FLOWS_SPILL_DIR", str(blocker / "spill"))
    with pytest.raises(StorageError, match="spill"):
        generate_images(["double fault"], f"s3://{s3_bucket}/x")
    assert flow_env.stats.requests == 0


def test_spill_failure_after_upload_failure_is_reported_as_a_paid_loss(
    flow_env: Any, s3_bucket: str, tmp_path: Path
) -> None:
    import shutil

    spill_root = tmp_path / "spill"  # FLUX_FLOWS_SPILL_DIR (flow_env); usable at pre-flight

    class BreakSpill(S3Faults):
        def __call__(self, request: Any, **kwargs: Any) -> AWSResponse | None:
            if spill_root.is_dir():  # the disk goes bad between pre-flight and the spill
                shutil.rmtree(spill_root)
                spill_root.write_text("no longer a folder")
            return super().__call__(request, **kwargs)

    with BreakSpill(r"/images/", status=503).active():
        state = generate_images(["double fault"], f"s3://{s3_bucket}/x", return_state=True)
    report = state.result()
    (record,) = report.records
    _, requests = generated_snapshot(flow_env)
    assert report.api_calls == requests == record.api_calls == 1
    assert record.finish_reason is FinishReason.ERROR
    assert "upload failed" in (record.error or "") and "kept locally" in (record.error or "")


def test_s3_permanent_put_failure_of_the_manifest(
    scenario: Callable[..., Scenario], s3_bucket: str
) -> None:
    destination = f"s3://{s3_bucket}/run"
    earlier = distinct("manifest earlier", 2)
    generate_images(earlier, destination)  # an earlier run's manifest.jsonl is in place
    sc = scenario("S3 PutObject 503 for the manifests only", destination)
    prompts = distinct("manifest down", 3)
    with S3Faults(r"manifest\.jsonl$", status=503).active() as faults:
        first = sc.run(prompts, manifest_expected=False)
    assert first.kinds == {"stored": 3}
    assert first.report.manifest_uri is None and len(faults.attempts) == 1
    # The destination's manifest.jsonl is not replaced: downstream jobs still read the
    # earlier run's; the run says so and keeps a copy.
    assert first.state.is_completed()
    stale = sc.dest.manifest() or b""
    assert [json.loads(line)["prompt"] for line in stale.splitlines()] == earlier
    (problem,) = first.report.problems
    assert problem.startswith("manifest NOT stored") and "manifest" in (first.state.message or "")
    kept = Path(problem.rsplit("a copy is kept at ", 1)[1])
    assert [json.loads(line)["prompt"] for line in kept.read_text().splitlines()] == prompts
    sc.record(
        "images stored; the manifest is not written, so `manifest.jsonl` keeps listing the "
        "earlier run; the run keeps a copy in the spill folder and names it in its problems "
        "and its final message"
    )


def test_unstored_manifest_is_reported_and_kept_locally(flow_env: Any, s3_bucket: str) -> None:
    from flux_flows.records.manifests import manifest_bytes

    with S3Faults(r"manifest\.jsonl$", status=503).active():
        state = generate_images(["manifest lost"], f"s3://{s3_bucket}/x", return_state=True)
    report = state.result()
    assert "manifest" in (state.message or "")
    kept = list(Path(report.spill_dir or "").glob("manifest-*.jsonl"))
    assert len(kept) == 1 and kept[0].read_bytes() == manifest_bytes(report.records)


# --------------------------------------------------------------------------------------------
# The machine dies: SIGKILL half-way through a batch, then a re-run on a fresh process
# --------------------------------------------------------------------------------------------

BATCH_SCRIPT = """
import json, sys
from flux_flows.flows import generate_images

prompts, destination, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
report = generate_images(prompts, destination, max_concurrency=int(sys.argv[4]))
with open(out, "w", encoding="utf-8") as handle:
    handle.write(report.model_dump_json())
"""
_CACHE_KEY_IN_NAME = re.compile(r"([0-9a-f]{32})\.[a-z0-9]+$")


def _cache_keys(names: set[str]) -> set[str]:
    return {m.group(1) for name in names if (m := _CACHE_KEY_IN_NAME.search(name))}


def test_sigkill_mid_batch_then_rerun(
    scenario: Callable[..., Scenario], s3_bucket: str, tmp_path: Path
) -> None:
    n, concurrency = 40, 4
    sc = scenario(
        f"process SIGKILLed mid-batch ({n} images, max_concurrency {concurrency})",
        f"s3://{s3_bucket}/killed",
    )
    prompts = distinct("killed batch", n)
    # ~4 s of API time: room to catch the run halfway even on a loaded machine.
    sc.emulator.configure(latency_s=0.4)
    env = _subprocess_env(tmp_path)  # this session's API: no server start-up

    def batch(name: str) -> tuple[list[str], Path, Path]:
        out, log = tmp_path / f"{name}.json", tmp_path / f"{name}.log"
        argv = [
            sys.executable,
            "-c",
            BATCH_SCRIPT,
            json.dumps(prompts),
            sc.destination,
            str(out),
            str(concurrency),
        ]
        return argv, out, log

    argv, _, log = batch("killed")
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 90
            while len(sc.dest.keys("images/")) < n // 2:
                assert process.poll() is None, (
                    "the batch ended before it was killed:\n" + log.read_text()[-3000:]
                )
                assert time.monotonic() < deadline, "no progress:\n" + log.read_text()[-3000:]
                seen = sc.emulator.stats.generations
                sc.emulator.stats.wait_for(lambda s, seen=seen: s.generations > seen, timeout=0.5)
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL
    paid_before_kill, _ = generated_snapshot(sc.emulator)
    paid_before_kill -= sc.start
    stored_at_kill, filtered_at_kill, spilled_at_kill = _at_kill(sc)
    assert n // 2 <= len(stored_at_kill) < n

    after = _rerun_after_kill(
        sc,
        prompts,
        tmp_path,
        paid_before_kill=paid_before_kill,
        stored_at_kill=stored_at_kill,
        in_flight_bound=concurrency,
    )
    assert set(after.rerun.values()) == {1}  # half the batch was left: the re-run made each once
    _kill_row(
        sc,
        f"SIGKILL once {len(stored_at_kill)} were stored; the re-run in a new process finds "
        f"them ({after.report.cache_hits} cache hits) and generates only the other "
        f"{after.report.api_calls}, each once",
        requested=n,
        stored=len(stored_at_kill),
        filtered=filtered_at_kill,
        errors="-",
        spilled=spilled_at_kill,
        after=after,
        expected_rerun=n - len(stored_at_kill),
    )


# --------------------------------------------------------------------------------------------
# SIGKILL in chunked mode (a Dask cluster of worker processes) and on a work-pool worker
# --------------------------------------------------------------------------------------------

CHUNKED_BATCH_SCRIPT = """
import json, sys
from prefect_dask import DaskTaskRunner
from flux_flows.flows import generate_images

if __name__ == "__main__":
    prompts, destination = json.loads(sys.argv[1]), sys.argv[2]
    runner = DaskTaskRunner(
        cluster_kwargs={
            "n_workers": 2, "threads_per_worker": 1, "processes": True, "dashboard_address": None
        }
    )
    generate_images.with_options(task_runner=runner)(
        prompts, destination, max_concurrency=int(sys.argv[3]), chunk_size=int(sys.argv[4])
    )
"""


def _subprocess_env(tmp_path: Path) -> dict[str, str]:
    """The test's env (emulator, moto, spill folder) with this session's Prefect API."""
    from prefect.settings import PREFECT_API_URL

    return {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }


def _kill_group(leader: subprocess.Popen[Any], deadline_s: float = 30.0) -> None:
    """SIGKILL the process group `leader` heads and wait until none of its processes is alive
    (a zombie whose parent died is not: it runs nothing and holds no connection)."""
    import psutil

    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader.pid, signal.SIGKILL)
    leader.wait(timeout=deadline_s)
    deadline = time.monotonic() + deadline_s
    while alive := [
        p.pid
        for p in psutil.process_iter(["status"])
        if _pgid(p.pid) == leader.pid and p.info["status"] != psutil.STATUS_ZOMBIE
    ]:
        assert time.monotonic() < deadline, f"{alive} outlived SIGKILL of their group"
        procs = []
        for pid in alive:
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(pid))
        psutil.wait_procs(procs, timeout=0.5)


def _wait_for_stored(
    sc: Scenario, at_least: int, alive: Callable[[], bool], log: Callable[[], str]
) -> None:
    """Until `at_least` images are in the bucket, woken by each new generation (no fixed sleep)."""
    deadline = time.monotonic() + 90
    while len(sc.dest.keys("images/")) < at_least:
        assert alive(), "the batch ended before it was killed:\n" + log()[-3000:]
        assert time.monotonic() < deadline, "no progress:\n" + log()[-3000:]
        seen = sc.emulator.stats.generations
        sc.emulator.stats.wait_for(lambda s, seen=seen: s.generations > seen, timeout=0.5)


@dataclass
class AfterKill:
    """What a kill cost, counted over the killed run and its re-run."""

    report: BatchReport  # the re-run's
    rerun: Counter[GenKey]  # the re-run's generations
    in_flight_at_kill: set[GenKey]  # generated before the kill, never stored by the killed run
    lost: int  # billed generations whose image is not stored at the end
    paid_twice: int  # extra generations beyond those of the images in flight at the kill
    billed_undelivered: int


def _at_kill(sc: Scenario) -> tuple[set[str], int, int]:
    """What the killed run left: cache keys of the images in the destination, filtered answers
    in the destination, images in the spill folder."""
    from flux_flows.rendering.spill import SpillFolder

    spilled = SpillFolder(sc.destination, Path(os.environ["FLUX_FLOWS_SPILL_DIR"])).cache_keys()
    return _cache_keys(sc.dest.keys("images/")), len(sc.dest.keys("filtered/")), len(spilled)


def _kill_row(
    sc: Scenario,
    behaviour: str,
    *,
    requested: int,
    stored: int,
    filtered: int,
    errors: int | str,
    spilled: int,
    after: AfterKill,
    expected_rerun: int,
) -> Row:
    row = Row(
        sc.fault,
        behaviour,
        sc.test,
        requested,
        stored,
        filtered,
        errors,
        spilled,
        after.lost,
        after.paid_twice,
        after.billed_undelivered,
        f"{sum(after.rerun.values())} (expected {expected_rerun})",
        in_flight_at_kill=len(after.in_flight_at_kill),
    )
    sc.rows.append(row)
    print("MATRIX " + _line(row))
    return row


def _rerun_after_kill(
    sc: Scenario,
    prompts: list[str],
    tmp_path: Path,
    *,
    paid_before_kill: Counter[GenKey],
    stored_at_kill: set[str],
    in_flight_bound: int,
) -> AfterKill:
    """Re-run the batch in a fresh process (plain threads) and check what a kill may cost:
    every image stored exactly once, the re-run generated exactly the images not stored at the
    kill, each once, and the only images paid twice are those generated but not stored at the
    kill (at most `in_flight_bound`)."""
    n = len(prompts)
    out, log = tmp_path / "rerun.json", tmp_path / "rerun.log"
    argv = [sys.executable, "-c", BATCH_SCRIPT, json.dumps(prompts), sc.destination, str(out)]
    with log.open("wb") as sink:
        done = subprocess.run(
            [*argv, "4"],
            env=_subprocess_env(tmp_path),
            stdout=sink,
            stderr=subprocess.STDOUT,
            timeout=120,
        )
    assert done.returncode == 0, log.read_text()[-3000:]
    report = BatchReport.model_validate_json(out.read_text(encoding="utf-8"))
    total, _ = generated_snapshot(sc.emulator)
    total -= sc.start
    rerun = total - paid_before_kill

    key_of = {r.cache_key: emulator_key(r) for r in report.records}
    stored_keys = {key_of[ck] for ck in stored_at_kill}
    in_flight_at_kill = set(paid_before_kill) - stored_keys
    # Every image exactly once in the bucket: one object per distinct request, none extra.
    assert sorted(_cache_keys(sc.dest.keys("images/"))) == sorted(key_of)
    assert len(sc.dest.keys("images/")) == n
    # The re-run generated exactly the images not yet stored, each once.
    assert sum(rerun.values()) == n - len(stored_at_kill)
    assert set(rerun) == set(key_of.values()) - stored_keys
    assert set(rerun.values()) <= {1}  # none at all if everything was stored before
    # The only double payment: images generated when the process died, never stored.
    paid_twice = {key for key, count in total.items() if count > 1}
    assert paid_twice == in_flight_at_kill
    assert len(in_flight_at_kill) <= in_flight_bound
    assert max(total.values()) <= 2
    outcomes, _, _ = check_invariants(report, sc.dest, rerun)
    assert set(outcomes.values()) == {"stored"}
    assert report.cache_hits == len(stored_at_kill) and report.api_calls == n - len(stored_at_kill)
    stored_at_end = {key_of[ck] for ck in _cache_keys(sc.dest.keys("images/"))}
    after = AfterKill(
        report=report,
        rerun=rerun,
        in_flight_at_kill=in_flight_at_kill,
        lost=sum(count for key, count in total.items() if key not in stored_at_end),
        paid_twice=sum(count - 1 for key, count in total.items() if key not in in_flight_at_kill),
        billed_undelivered=sum(
            count for key, count in total.items() if DELIVERY_FAULT.search(key[1])
        ),
    )
    assert after.lost == 0 and after.paid_twice == 0
    return after


def test_sigkill_mid_batch_in_chunked_mode_then_rerun(
    scenario: Callable[..., Scenario], s3_bucket: str, tmp_path: Path
) -> None:
    """The batch runs its chunks on a Dask LocalCluster of 2 worker processes; the whole process
    group (the flow, the scheduler, the nannies, the workers) is SIGKILLed mid-batch."""
    pytest.importorskip("prefect_dask")
    n, concurrency, chunk_size = 40, 4, 5
    sc = scenario(
        f"process group SIGKILLed mid-batch in chunked mode (Dask, 2 worker processes, {n} "
        f"images in chunks of {chunk_size}, max_concurrency {concurrency})",
        f"s3://{s3_bucket}/chunked",
    )
    prompts = distinct("killed chunked batch", n)
    sc.emulator.configure(latency_s=0.4)  # ~4 s of API time: room to catch the run halfway
    script = tmp_path / "chunked_batch.py"
    script.write_text(CHUNKED_BATCH_SCRIPT, encoding="utf-8")
    log = tmp_path / "killed.log"
    argv = [sys.executable, str(script), json.dumps(prompts), sc.destination]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*argv, str(concurrency), str(chunk_size)],
            env=_subprocess_env(tmp_path),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _wait_for_stored(
                sc, n // 2, lambda: process.poll() is None, lambda: log.read_text(errors="replace")
            )
            # More than one process: the Dask workers ran the chunks, and all die together.
            import psutil

            group = [p for p in psutil.process_iter() if _pgid(p.pid) == process.pid]
            group_size = len(group)
            assert group_size >= 3, [p.pid for p in group]
        finally:
            _kill_group(process)
    assert process.returncode == -signal.SIGKILL
    paid_before_kill, _ = generated_snapshot(sc.emulator)
    paid_before_kill -= sc.start
    stored_at_kill, filtered_at_kill, spilled_at_kill = _at_kill(sc)
    assert n // 2 <= len(stored_at_kill) < n

    after = _rerun_after_kill(
        sc,
        prompts,
        tmp_path,
        paid_before_kill=paid_before_kill,
        stored_at_kill=stored_at_kill,
        in_flight_bound=concurrency,
    )
    _kill_row(
        sc,
        f"SIGKILL of the group ({group_size} processes) once {len(stored_at_kill)} were "
        f"stored; the re-run in a new process finds them ({after.report.cache_hits} cache "
        f"hits) and generates only the other {after.report.api_calls}, each once",
        requested=n,
        stored=len(stored_at_kill),
        filtered=filtered_at_kill,
        errors="-",
        spilled=spilled_at_kill,
        after=after,
        expected_rerun=n - len(stored_at_kill),
    )


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return -1


PROJECT_ROOT = Path(__file__).resolve().parents[1]
PREFECT_BIN = str(Path(sys.executable).with_name("prefect"))
POOL = "flux-flows-pool"  # as deployments/prefect.yaml declares the chunk deployment's pool
CHUNK_DEPLOYMENT = "render-chunk/flux-flows-chunks"
# The chunk runs' heartbeats (`<chunk>.alive`), every 2 s here instead of 20 s: the batch takes a
# RUNNING chunk run whose heartbeat stopped for MISSED_BEATS beats for dead and marks it Crashed.
# No Prefect zombie automation, no Prefect heartbeat setting: an OSS server has neither by default.
CHUNK_BEAT_S = 2.0


def _prefect_cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [PREFECT_BIN, *args],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}{done.stderr}"
    return done.stdout


def _worker_env(tmp_path: Path) -> dict[str, str]:
    """What a worker host provides (as in test_deployment): this session's Prefect API, the
    emulator's URL and key, moto's AWS settings, a spill folder; Prefect's defaults otherwise
    (no flow-run heartbeats)."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_API_URL=str(PREFECT_API_URL.value()),
        PREFECT_HOME=str(tmp_path / "worker-prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_CLI_COLORS="false",
    )
    return env


def _tree(pid: int) -> list[Any]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _kill_tree(pid: int, *, whole_tree: bool = True) -> None:
    """SIGKILL every process group in the tree under `pid` (the worker's, and its flow-run
    process's, which Prefect 3 starts in a session of its own): the machine dies. With
    `whole_tree=False`, only the group `pid` leads."""
    groups = {_pgid(p.pid) for p in _tree(pid)} if whole_tree else {_pgid(pid)}
    groups -= {-1, os.getpgid(0)}
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


@pytest.mark.parametrize("scope", ["machine", "worker-group"])
def test_sigkill_of_a_pool_worker_mid_chunk_then_rerun(
    scenario: Callable[..., Scenario],
    s3_bucket: str,
    tmp_path: Path,
    scope: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch's chunks run as flow runs of the chunk deployment on a process pool with two
    workers (each one chunk at a time); one worker is SIGKILLed while its chunk's requests are
    in flight.

    `machine`: the worker's process group and its flow-run process's (Prefect starts that in a
    session of its own) die together. The batch still ends: the orphaned run's heartbeat stops,
    the batch marks it Crashed after MISSED_BEATS beats, its images are ERROR records, every
    other chunk is stored. `worker-group`: only the worker's own process group is killed; its flow-run process
    survives it. Either way a re-run in a new process generates only what is missing, and
    nothing is paid twice but what the killed process had in flight."""
    import threading

    import psutil
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    from flux_flows.rendering.work_pools import MISSED_BEATS

    n, chunk_size, concurrency = 15, 3, 8  # each chunk run holds 4 of the batch's 8 slots
    monkeypatch.setenv("FLUX_FLOWS_CHUNK_HEARTBEAT_S", str(CHUNK_BEAT_S))  # read by the batch
    sc = scenario(
        (
            "pool worker and its flow-run process SIGKILLed mid-chunk"
            if scope == "machine"
            else "pool worker's process group SIGKILLed mid-chunk (its flow-run process lives)"
        )
        + f" ({n} images, chunks of {chunk_size} on 2 process workers)",
        f"s3://{s3_bucket}/pool-killed",
    )
    prompts = distinct("killed pool worker", n)
    # Long enough that a chunk's requests are caught in flight; short enough for a quick test.
    sc.emulator.configure(latency_s=1.5)
    emulator_port = urlsplit(sc.emulator.base_url).port
    env = _worker_env(tmp_path)
    _prefect_cli(env, "work-pool", "create", POOL, "--type", "process", "--overwrite")
    _prefect_cli(
        env, "--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--name",
        CHUNK_DEPLOYMENT.partition("/")[2],
    )  # fmt: skip
    workers: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]

    def tails() -> str:
        return "\n".join(log.read_text(errors="replace")[-3000:] for log in logs)

    killed: dict[str, Any] = {}
    stop = threading.Event()

    def chunk_is_stored(run_id: str) -> bool:
        """Whether every image of the run's chunk is already in the bucket (then its results
        may be written any moment: too late to catch it mid-chunk)."""
        with get_client(sync_client=True) as client:
            chunk_key = client.read_flow_run(run_id).parameters["chunk_key"]
        body = sc.dest.read(f"{sc.destination}/{chunk_key}") or b""
        wanted = {ImageRequest.model_validate_json(line).cache_key for line in body.splitlines()}
        return bool(wanted) and wanted <= _cache_keys(sc.dest.keys("images/"))

    def kill_a_worker_mid_chunk() -> None:
        """Watch the workers' flow-run processes; SIGKILL the first one caught with requests in
        flight at the emulator, with its worker; make sure the batch cannot hang after that."""
        while not stop.is_set() and not killed:
            for worker in workers:
                for proc in _tree(worker.pid)[1:]:
                    with contextlib.suppress(psutil.Error):
                        busy = [
                            c
                            for c in proc.net_connections(kind="tcp")
                            if c.raddr and c.raddr.port == emulator_port
                        ]
                        run_id = proc.environ().get("PREFECT__FLOW_RUN_ID")
                        if (
                            busy
                            and run_id
                            and sc.emulator.stats.in_flight > 0
                            and not chunk_is_stored(run_id)
                        ):
                            _kill_tree(worker.pid, whole_tree=scope == "machine")
                            worker.wait(timeout=30)
                            if scope == "machine":  # SIGKILL is delivered, then acted on
                                lived = bool(psutil.wait_procs([proc], timeout=10)[1])
                            else:  # right after its worker died: its images are in flight
                                try:
                                    lived = proc.status() != psutil.STATUS_ZOMBIE
                                except psutil.Error:
                                    lived = False
                            killed.update(worker=worker, run_id=run_id, chunk_process_lived=lived)
                            break
                if killed:
                    break
            stop.wait(0.05)
        # The batch waits for the orphaned run to reach a final state; if it never marks it, end
        # it here so the test fails instead of hanging 6 hours.
        if killed and not stop.wait(MISSED_BEATS * CHUNK_BEAT_S + 60):
            with get_client(sync_client=True) as client:
                state = client.read_flow_run(killed["run_id"]).state
                if state is None or not state.is_final():
                    killed["forced"] = state.name if state else "no state"
                    client.set_flow_run_state(killed["run_id"], Crashed(), force=True)

    watcher = threading.Thread(target=kill_a_worker_mid_chunk, daemon=True)
    worker_command = [PREFECT_BIN, "worker", "start", "--pool", POOL, "--type", "process"]
    worker_command += ["--limit", "1"]  # one chunk at a time: what one kill can cost is bounded
    names = [f"fault-worker-{scope}-{i}-{os.getpid()}" for i in range(2)]
    try:
        for i, log in enumerate(logs):
            with log.open("wb") as sink:
                workers.append(
                    subprocess.Popen(
                        [*worker_command, "--name", names[i]],
                        env=env,
                        cwd=PROJECT_ROOT,
                        stdout=sink,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        with get_client(sync_client=True) as client:
            wait_for_online_workers(client, POOL, names, workers, tails)
        watcher.start()
        before, _ = generated_snapshot(sc.emulator)
        started = time.monotonic()
        state = generate_images(
            prompts,
            sc.destination,
            chunk_size=chunk_size,
            max_concurrency=concurrency,
            chunk_deployment=CHUNK_DEPLOYMENT,
            return_state=True,
        )
        batch_s = time.monotonic() - started
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join(timeout=30)
        for worker in workers:
            if worker.poll() is None:
                _kill_tree(worker.pid)
            worker.wait(timeout=30)
    assert killed, "no worker was caught mid-chunk:\n" + tails()
    assert "forced" not in killed, (
        f"the killed worker's run stayed {killed['forced']} until the test's deadline: nothing "
        f"marked it final\n{tails()}"
    )
    assert killed["worker"].returncode == -signal.SIGKILL
    report: BatchReport = state.result()
    paid_before_rerun, _ = generated_snapshot(sc.emulator)
    paid_before_rerun -= sc.start
    first = paid_before_rerun - (before - sc.start)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=[CHUNK_DEPLOYMENT.partition("/")[2]])
            )
        )
        limits = [x.name for x in client.read_global_concurrency_limits(limit=100)]
    # This batch's chunk runs (the session's API keeps other tests' runs): its bucket's.
    bucket = f"s3://{s3_bucket}/"
    states = {str(r.id): r.state for r in runs if r.parameters["destination"].startswith(bucket)}
    assert len(states) == -(-n // chunk_size), states
    killed_state = states[killed["run_id"]]
    others = [s for run_id, s in states.items() if run_id != killed["run_id"]]
    assert all(s.type is StateType.COMPLETED for s in others), others
    assert not [name for name in limits if name.startswith("flux-flows-")]
    errors = [r for r in report.records if r.finish_reason is FinishReason.ERROR]
    if scope == "machine":
        # The batch marked the orphaned run Crashed when its heartbeat stopped; its chunk's
        # images are ERROR records of this run; all the others are stored.
        assert not killed["chunk_process_lived"]
        assert killed_state.type is StateType.CRASHED, killed_state
        assert "stopped answering" in (killed_state.message or ""), killed_state.message
        assert len(errors) == chunk_size, report.counts
        assert all("Crashed without results" in (r.error or "") for r in errors)
    else:
        # The flow-run process outlived its worker (its own session) and ran on; its run ends
        # in a final state, its heartbeat beating; its chunk is stored or ERROR whole.
        assert killed["chunk_process_lived"], "the flow-run process died with its worker's group"
        assert killed_state.is_final(), killed_state
        assert len(errors) in (0, chunk_size), report.counts
    assert report.counts[FinishReason.SUCCESS.value] == n - len(errors)
    outcomes, _, _ = check_invariants(report, sc.dest, first)
    assert sc.emulator.stats.max_in_flight <= concurrency
    # Nothing generated is lost but what the killed process had in flight (paid, never stored).
    key_of = {r.cache_key: emulator_key(r) for r in report.records}
    stored_at_end = _cache_keys(sc.dest.keys("images/"))
    unstored = set(first) - {key_of[ck] for ck in stored_at_end}
    error_keys = {emulator_key(r) for r in errors}
    assert unstored <= error_keys and len(unstored) <= chunk_size

    after = _rerun_after_kill(
        sc,
        prompts,
        tmp_path,
        paid_before_kill=paid_before_rerun,
        stored_at_kill=stored_at_end,
        in_flight_bound=chunk_size,
    )
    assert set(after.rerun) <= error_keys  # the re-run did only the killed chunk's missing images
    kinds = Counter(outcomes[r.cache_key] for r in report.records)
    stored_by_killed = len({r.cache_key for r in errors} & stored_at_end)
    if scope == "machine":
        behaviour = (
            f"the batch marks the orphaned chunk run Crashed when its heartbeat stops "
            f"({CHUNK_BEAT_S:.0f} s beats, dead after {MISSED_BEATS}) and ends in "
            f"{batch_s:.0f} s with its {chunk_size} images ERROR ({stored_by_killed} of them "
            "stored before the kill); the re-run generates only the rest"
        )
    else:
        behaviour = (
            f"the chunk's flow-run process runs on without its worker; its run ends "
            f"{killed_state.name} ({killed_state.message!r}), the batch in {batch_s:.0f} s with "
            f"{len(errors)} images ERROR; the re-run generates only the rest"
        )
    assert after.report.counts[FinishReason.SUCCESS.value] == n
    _kill_row(
        sc,
        behaviour,
        requested=len(report.records),
        stored=kinds["stored"],
        filtered=kinds["filtered"],
        errors=kinds["error"],
        spilled=kinds["spilled"],
        after=after,
        expected_rerun=n - len(stored_at_end),
    )


def _running_flow_run() -> Any:
    """A flow run set RUNNING on the session's API, as a chunk run is while it renders."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    @flow(name="heartbeat-probe")
    def probe() -> None:  # never run: only its flow run's state is used
        return None

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(probe)
        client.set_flow_run_state(run.id, Running(), force=True)
    return run.id


def test_a_chunk_run_whose_heartbeat_stops_is_crashed_by_the_batch(tmp_path: Path) -> None:
    """`pools._wait_for` on a RUNNING run whose heartbeat never changes: Crashed, with a message,
    after MISSED_BEATS beats (here 4 x 0.25 s), not after WAIT_FOR_CHUNK_S."""
    from flux_flows.rendering.work_pools import MISSED_BEATS, _wait_for
    from flux_flows.storage import open_storage

    storage = open_storage(str(tmp_path / "dest"))
    # written once, then silence
    storage.put("runs/x/chunks/chunk-00001.alive", b'{"beat": 1}', content_type="application/json")
    run_id = _running_flow_run()
    beat = 0.25
    started = time.monotonic()
    state = _wait_for(run_id, storage, "runs/x/chunks/chunk-00001.alive", beat)
    waited = time.monotonic() - started
    assert state.is_crashed(), state
    assert "stopped answering" in (state.message or "")
    assert MISSED_BEATS * beat <= waited < 60, waited


def test_a_chunk_run_that_beats_is_waited_for(tmp_path: Path) -> None:
    """A run whose heartbeat keeps changing is alive however long it takes: `_wait_for` returns
    its own final state (here Completed, set once it has outlived many dead-after deadlines)."""
    import threading

    from prefect.client.orchestration import get_client
    from prefect.states import Completed

    from flux_flows.rendering.work_pools import MISSED_BEATS, _heartbeat, _wait_for
    from flux_flows.storage import open_storage

    storage = open_storage(str(tmp_path / "dest"))
    key = "runs/x/chunks/chunk-00001.alive"
    run_id = _running_flow_run()
    beat = 0.25
    outlived = threading.Event()

    def finish_later() -> None:
        outlived.wait(3 * MISSED_BEATS * beat)  # a duration to outlive, not a synchronisation
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run_id, Completed(), force=True)

    finisher = threading.Thread(target=finish_later, daemon=True)
    with _heartbeat(storage, key, beat):
        finisher.start()
        state = _wait_for(run_id, storage, key, beat)
    finisher.join(timeout=30)
    assert state.is_completed(), state
    assert not storage.exists(key)  # the heartbeat is removed at the end
