"""The API key never appears in anything a run produces, and the emulator is never reachable.

A batch with every kind of failure (401, 500 after retries, 400, broken answers, a filtered
image, an upload that fails and spills) runs with the key in a FireworksCredentials block and
again from the environment; then everything it produced is scanned for the key: Python logs at
DEBUG (every logger), captured stdout/stderr, the BatchReport, the manifest, every S3 object and
its metadata, the spill folder, and what the Prefect API stored (flow run and its parameters,
task runs, logs, artifacts, block documents). Errors and the reprs of clients and blocks are
checked directly.
"""

from __future__ import annotations

import json
import logging
import pickle
import socket
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)

from flux_flows import FireworksCredentials, FluxClient, FluxError, ImageRequest, RetryPolicy
from flux_flows.emulator import Emulator, EmulatorConfig, serve
from flux_flows.flows import generate_images
from helpers.common import TEST_API_KEY
from helpers.s3 import S3Faults

pytestmark = pytest.mark.usefixtures("flow_env")  # heartbeats off: the `prefect_api` fixture


FAST = RetryPolicy(max_retries=2, initial_delay_s=0.005, max_delay_s=0.01)
KEY = TEST_API_KEY
# Pieces a careless formatter could produce: the key itself, as bytes, JSON-escaped, in a header.
NEEDLES = (KEY, KEY[3:], f"Bearer {KEY}")


def assert_clean(where: str, value: Any) -> None:
    """No form of the key in `value` (text, bytes, or anything JSON- or repr-able)."""
    if isinstance(value, bytes):
        text = value.decode("utf-8", errors="replace")
    elif isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, default=repr)
        except (TypeError, ValueError):
            text = repr(value)
    for needle in NEEDLES:
        assert needle not in text, f"the API key leaked into {where}"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))  # message, args and traceback, formatted


@pytest.fixture
def all_logs() -> Iterator[_Collect]:
    """Every record of every logger at DEBUG, including loggers that do not propagate."""
    handler = _Collect()
    names = ["", "prefect", "flux_flows", "httpx", "httpcore", "botocore", "uvicorn", "urllib3"]
    names += [n for n in logging.root.manager.loggerDict if n.startswith(("prefect", "flux"))]
    saved = []
    for name in dict.fromkeys(names):
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    yield handler
    for logger, level in saved:
        logger.removeHandler(handler)
        logger.setLevel(level)


FAILING_BATCH = [
    "a calm lake",
    "a quiet forest",
    "something nsfw",  # CONTENT_FILTERED
    "bad request [[status:400]]",
    "server down [[status:500]]",
    "flaky [[flaky:1]]",
    "half an image [[fault:truncate]]",
    "proxy page [[fault:html]]",
    "spill me",  # its upload fails: kept in the spill folder
    "refused [[status:401]]",
]


def _scan_prefect(flow_run_id: Any) -> int:
    """Scan what the Prefect API stored about the run; returns how many things were read."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # logs reach the API in batches: send what is queued
    read = 0
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        assert_clean("the flow run (parameters, state)", flow_run.model_dump(mode="json"))
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        for task_run in task_runs:
            assert_clean(f"task run {task_run.name}", task_run.model_dump(mode="json"))
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
        for log in logs:
            assert_clean("a log stored by the Prefect API", log.message)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        for artifact in artifacts:
            assert_clean(f"artifact {artifact.key}", artifact.model_dump(mode="json"))
        assert {a.type for a in artifacts} >= {"table", "markdown"}
        assert logs and task_runs
        read = 1 + len(task_runs) + len(logs) + len(artifacts)
    return read


def _scan_bucket(bucket: str) -> int:
    s3 = boto3.client("s3")
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            head = s3.head_object(Bucket=bucket, Key=item["Key"])
            assert_clean(f"S3 metadata of {item['Key']}", head["Metadata"])
            assert_clean(f"S3 headers of {item['Key']}", head["ResponseMetadata"]["HTTPHeaders"])
            body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            assert_clean(f"S3 object {item['Key']}", body)
            count += 1
    return count


@pytest.mark.parametrize("via", ["block", "env"])
def test_key_never_leaks_from_a_failing_batch(
    via: str,
    flow_env: Any,
    s3_bucket: str,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    all_logs: _Collect,
) -> None:
    kwargs: dict[str, Any] = {"safety_check": True, "max_concurrency": len(FAILING_BATCH)}
    if via == "block":
        kwargs["credentials"] = FireworksCredentials(api_key=KEY, base_url=flow_env.base_url)
    destination = f"s3://{s3_bucket}/secrets"
    with S3Faults(r"/images/spill-me-", status=500).active():
        # One task run per image, so the failures' texts also reach the Prefect API to be scanned.
        state = generate_images(
            FAILING_BATCH, destination, return_state=True, per_image_tasks=True, **kwargs
        )
    report = state.result()
    reasons = {r.prompt: r.finish_reason.value for r in report.records}
    assert reasons["something nsfw"] == "CONTENT_FILTERED"
    assert reasons["a calm lake"] == "SUCCESS" and reasons["flaky [[flaky:1]]"] == "SUCCESS"
    assert report.counts["ERROR"] == 5 and report.spilled == 1
    errors = {r.prompt: r.error or "" for r in report.records if r.error}
    assert "rejected the API key" in errors["refused [[status:401]]"]
    assert "after 5 attempts" in errors["server down [[status:500]]"]

    # What the run returned and wrote.
    assert_clean("the BatchReport", report.model_dump_json())
    assert_clean("repr(BatchReport)", repr(report))
    assert_clean("the final state", f"{state!r} {state.message}")
    for text in errors.values():
        assert_clean("an ERROR record", text)
    assert _scan_bucket(s3_bucket) >= 5  # images, filtered, both manifests
    spill = Path(report.spill_dir or "")
    spilled = [p for p in spill.rglob("*") if p.is_file()]
    assert len(spilled) == 2  # bytes + sidecar
    for path in spilled:
        assert_clean(f"spill file {path.name}", path.read_bytes())

    # What the Prefect API stored.
    assert _scan_prefect(state.state_details.flow_run_id) > 5

    # Logs at DEBUG from every logger, and the process's own stdout/stderr.
    captured = capfd.readouterr()
    assert_clean("stdout", captured.out)
    assert_clean("stderr", captured.err)
    assert len(all_logs.lines) > 20
    assert_clean("Python logs at DEBUG", "\n".join(all_logs.lines))
    assert any("retrying" in line for line in all_logs.lines)


# --------------------------------------------------------------------------------------------
# Errors, clients and blocks
# --------------------------------------------------------------------------------------------


def _all_text(error: BaseException) -> str:
    """Message, repr, args and the whole chained traceback (causes and contexts)."""
    parts = [str(error), repr(error), repr(error.args)]
    parts += traceback.format_exception(error)
    parts += [repr(getattr(error, name, None)) for name in ("message", "request_id")]
    return "\n".join(parts)


@pytest.mark.parametrize(
    "prompt",
    [
        "[[status:401]]",
        "[[status:403]]",
        "[[status:400]]",
        "[[status:404]]",
        "[[status:429]]",
        "[[status:500]]",
        "[[fault:drop]]",
        "[[fault:truncate]]",
        "[[fault:garbage]]",
        "[[fault:html]]",
        "[[fault:json-no-images]]",
    ],
)
def test_errors_never_carry_the_key(flow_env: Any, prompt: str) -> None:
    flow_env.configure(retry_after_s=0.01)
    with (
        FluxClient(KEY, base_url=flow_env.base_url, retry=FAST) as client,
        pytest.raises(FluxError) as info,
    ):
        client.generate(ImageRequest(prompt=f"boom {prompt}"))
    assert_clean(f"the error for {prompt}", _all_text(info.value))
    assert_clean("a pickled error", pickle.dumps(info.value))


def test_timeout_and_connection_errors_never_carry_the_key(flow_env: Any) -> None:
    with (
        FluxClient(KEY, base_url=flow_env.base_url, timeout_s=0.2, retry=FAST) as client,
        pytest.raises(FluxError) as timeout,
    ):
        client.generate(ImageRequest(prompt="slow [[fault:slow=1]]"))
    assert_clean("a timeout error", _all_text(timeout.value))
    with socket.socket() as sock:  # a port with nobody listening
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/inference/v1"
    with (
        FluxClient(KEY, base_url=dead, retry=FAST) as client,
        pytest.raises(FluxError) as refused,
    ):
        client.generate(ImageRequest(prompt="nobody home"))
    assert_clean("a connection error", _all_text(refused.value))


@pytest.mark.parametrize(
    ("status", "content_type", "body"),
    [
        (400, "application/json", {"error": {"message": "bad token: Bearer {key}"}}),
        (401, "application/json", {"message": "key {key} is not valid"}),
        (500, "text/plain", "upstream said Authorization: Bearer {key}"),
        (200, "text/html", "<p>proxy echo {key}</p>"),
        (200, "application/json", {"base64": [], "echo": "{key}"}),
    ],
)
def test_a_server_echoing_the_key_is_redacted(status: int, content_type: str, body: Any) -> None:
    """Some gateways echo the Authorization header in their error pages."""
    raw = json.dumps(body) if not isinstance(body, str) else body
    payload = raw.replace("{key}", KEY).encode()

    def answer(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == f"Bearer {KEY}"
        return httpx.Response(status, headers={"content-type": content_type}, content=payload)

    gateway = httpx.MockTransport(answer)
    client = FluxClient(
        KEY, base_url="http://127.0.0.1:9/inference/v1", retry=FAST, transport=gateway
    )
    with client, pytest.raises(FluxError) as info:
        client.generate(ImageRequest(prompt="echo"))
    assert_clean("an error built from an echoing answer", _all_text(info.value))


def test_clients_and_blocks_do_not_show_the_key(prefect_api: None) -> None:
    block = FireworksCredentials(api_key=KEY, base_url="http://127.0.0.1:9/inference/v1")
    with block.get_client() as client:
        for text in (repr(client), str(client), repr(client.retry), repr(vars(client))):
            assert_clean("a FluxClient", text)
    async_client = block.get_async_client()
    assert_clean("an AsyncFluxClient", f"{async_client!r} {vars(async_client)!r}")
    for text in (repr(block), str(block), repr(block.model_dump()), block.model_dump_json()):
        assert_clean("a FireworksCredentials block", text)
    block.save("secrets-test", overwrite=True)
    with get_client(sync_client=True) as prefect:
        stored = prefect.read_block_document_by_name(
            "secrets-test", block_type_slug="fireworks-credentials", include_secrets=False
        )
    assert_clean("the block document read back", stored.model_dump(mode="json"))
    loaded = FireworksCredentials.load("secrets-test")
    assert loaded.api_key.get_secret_value() == KEY  # stored, and only shown when asked


def test_emulator_never_shows_its_key(flow_env: Any) -> None:
    config = httpx.get(flow_env.url + "/_emulator/config").json()
    assert config["api_key"] == "<set>"
    assert_clean("the emulator's config", f"{config} {flow_env!r} {flow_env.config!r}")
    wrong = "fw-a-wrong-key-that-must-not-echo-1234"
    answer = httpx.post(
        flow_env.base_url + "/workflows/accounts/fireworks/models/flux-1-schnell-fp8/text_to_image",
        json={"prompt": "x"},
        headers={"Authorization": f"Bearer {wrong}"},
    )
    assert answer.status_code == 401
    assert wrong not in answer.text
    assert_clean("the emulator's 401", answer.text)


# --------------------------------------------------------------------------------------------
# The emulator accepts any key when unconfigured: it must be reachable from this machine only
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "[::]", "192.168.1.10", "10.0.0.1", "example.com", "", " "]
)
def test_emulator_refuses_non_loopback_hosts(host: str) -> None:
    with pytest.raises(ValueError, match="loopback only"):
        Emulator(EmulatorConfig(), host=host)
    with pytest.raises(ValueError, match="loopback only"):
        serve(host=host, port=0)


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a LISTEN socket on `port`, from the kernel's own table."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, _, port_hex = fields[1].partition(":")
            if int(port_hex, 16) == port and fields[3] == "0A":  # 0A = LISTEN
                if width == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]))
                else:
                    found.add(address)
    return found


def test_emulator_listens_on_loopback_only() -> None:
    for host in ("127.0.0.1", "localhost"):
        with Emulator(EmulatorConfig(), host=host) as emu:
            assert emu.url.startswith("http://127.0.0.1:")
            sockets = [s for server in emu._server.servers for s in server.sockets]  # type: ignore[union-attr]
            assert sockets and {s.getsockname()[0] for s in sockets} == {"127.0.0.1"}
            if Path("/proc/net/tcp").exists():
                assert _listening_addresses(emu.port) == {"127.0.0.1"}
            assert httpx.get(emu.url + "/_emulator/stats").status_code == 200
