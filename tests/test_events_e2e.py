"""Issue 26 end to end on real Prefect parts: the nightly batch's event starts the downstream job.

`prefect server start`, `prefect deploy --all` of deployments/prefect.yaml (whose
`index-after-nightly` deployment carries the trigger), a nightly run against the emulator into a
moto bucket, and one process worker that runs both it and the run the trigger creates. The
downstream run must complete with the batch's manifest URI as its parameter and write the index
beside it; the server must hold the manifest's asset event and no failed automation action.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from helpers import prefect_server as served
from helpers.prefect_server import (
    NIGHTLY,
    POOL,
    PREFECT,
    PREFECT_FILE,
    PROJECT_ROOT,
    PrefectServer,
    log_tail,
    prefect_cli,
    prefect_client,
    stop,
    worker_env,
)

pytestmark = pytest.mark.deployment
prefect_server = served.prefect_server  # the module's server fixture

DOWNSTREAM = "manifest-index/index-after-nightly"
WAIT_S = 240.0


def server_events(server: PrefectServer, names: list[str]) -> list[dict[str, Any]]:
    """The server's stored events with these names (REST `POST /events/filter`)."""
    body = {"filter": {"event": {"name": names}}, "limit": 50}
    answer = httpx.post(f"{server.api_url}/events/filter", json=body, timeout=10.0)
    answer.raise_for_status()
    events: list[dict[str, Any]] = answer.json()["events"]
    return events


def wait_for_downstream(server: PrefectServer, worker: subprocess.Popen[Any], log: Path) -> Any:
    """Until the trigger's run of the downstream deployment is final; fails if the worker dies."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    deadline = time.monotonic() + WAIT_S
    only = DeploymentFilter(name=DeploymentFilterName(any_=["index-after-nightly"]))
    while True:
        with prefect_client(server) as client:
            runs = client.read_flow_runs(deployment_filter=only)
        done = [r for r in runs if r.state and r.state.is_final()]
        if done:
            return done
        assert worker.poll() is None, f"the worker exited:\n{log_tail(log)}"
        assert time.monotonic() < deadline, f"no downstream run finished:\n{log_tail(log)}"
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.wait(timeout=0.5)  # a poll interval that returns if the worker dies


def test_a_nightly_batch_triggers_the_downstream_deployment(
    prefect_server: PrefectServer, emulator: Any, s3_bucket: str, tmp_path: Path
) -> None:
    prefect_cli(prefect_server, "work-pool", "create", POOL, "--type", "process")
    prefect_cli(prefect_server, "gcl", "create", "fireworks-api", "--limit", "8")
    output = prefect_cli(
        prefect_server, "--no-prompt", "deploy", "--prefect-file", str(PREFECT_FILE), "--all"
    )
    assert output.count("successfully created") == 4, output
    s3 = boto3.client("s3")
    prompts = [{"id": f"sku-{i}", "prompt": f"a ceramic bowl, glaze {i}"} for i in range(3)]
    body = "\n".join(json.dumps(p) for p in prompts).encode()
    s3.put_object(Bucket=s3_bucket, Key="feeds/tonight.jsonl", Body=body)
    params = {
        "source": f"s3://{s3_bucket}/feeds/tonight.jsonl",
        "destination": f"s3://{s3_bucket}/products",
        "credentials_block": None,  # the worker's FIREWORKS_* env vars
    }
    prefect_cli(prefect_server, "deployment", "run", NIGHTLY, "--params", json.dumps(params))
    env = worker_env(prefect_server, emulator, tmp_path)
    env["PREFECT_WORKER_QUERY_SECONDS"] = "1"
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", POOL, "--type", "process"],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        [downstream] = wait_for_downstream(prefect_server, worker, log)
    finally:
        stop(worker)
    with prefect_client(prefect_server) as client:
        [nightly] = [
            r
            for r in client.read_flow_runs()
            if r.deployment_id and r.name and r.parameters.get("source") == params["source"]
        ]
    day = nightly.expected_start_time.astimezone(UTC).date().isoformat()
    manifest = f"s3://{s3_bucket}/products/{day}/manifest.jsonl"
    assert downstream.state.is_completed(), f"{downstream.state}\n{log_tail(log)}"
    assert downstream.parameters == {"manifest_uri": manifest}
    index = s3.get_object(Bucket=s3_bucket, Key=f"products/{day}/index.csv")["Body"].read()
    assert len(index.decode().splitlines()) == 1 + len(prompts)

    [batch] = server_events(prefect_server, ["flux-flows.batch.completed"])
    assert batch["resource"]["flux-flows.deployment"] == "nightly-product-images"
    assert batch["payload"]["manifest_uri"] == manifest
    assets = server_events(prefect_server, ["prefect.asset.materialization.succeeded"])
    assert [e["resource"]["prefect.resource.id"] for e in assets] == [manifest]
    assert server_events(prefect_server, ["prefect.automation.action.failed"]) == []
    # The triggers service's reaction: the event's occurred time to the run it created.
    reaction = downstream.created - datetime.fromisoformat(batch["occurred"])
    print(f"\ntrigger reaction: {reaction.total_seconds():.2f} s from event to downstream run")
