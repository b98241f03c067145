"""End to end on real Prefect parts: server, `prefect deploy`, a process worker, the example flows.

Everything runs as the docs tell a user to run it, from the project root: `prefect server
start`, `prefect work-pool create`, `prefect gcl create`, `prefect --no-prompt deploy
--prefect-file deployments/prefect.yaml --all`, `prefect deployment run`, `prefect worker start`.
Only the parameters that say *where* (the prompt file and destination in a moto bucket) are
overridden at run time; the Fireworks API is the emulator in this test process, reached over
loopback by the worker's flow-run processes through the credentials block and env vars.

Every subprocess has a timeout and is stopped by its own pid (its process group) in a
`finally`, so a hang fails the test instead of the CI job.
"""

from __future__ import annotations

import bisect
import json
import os
import subprocess
import sys
import time
from datetime import UTC
from pathlib import Path
from typing import Any

import boto3
import pytest

from helpers import prefect_server as served
from helpers.common import TEST_API_KEY, wait_for_online_workers
from helpers.prefect_server import (
    CLI_TIMEOUT_S,
    NIGHTLY,
    POOL,
    PREFECT,
    PREFECT_FILE,
    PROJECT_ROOT,
    SHOTS,
    PrefectServer,
    log_tail,
    prefect_cli,
    prefect_client,
    run_worker_once,
    stop,
    worker_env,
)

pytestmark = pytest.mark.deployment
prefect_server = served.prefect_server  # the module's server fixture


def test_deploy_and_run_with_a_process_worker(
    prefect_server: PrefectServer,
    emulator: Any,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    from flux_flows import FireworksCredentials

    # What an operator does once: pool, shared API budget, credentials block.
    prefect_cli(prefect_server, "work-pool", "create", POOL, "--type", "process")
    prefect_cli(prefect_server, "gcl", "create", "fireworks-api", "--limit", "8")
    with prefect_client(prefect_server):
        FireworksCredentials(api_key=TEST_API_KEY, base_url=emulator.base_url).save(
            "fireworks", overwrite=True
        )

    # The documented command, unchanged.
    output = prefect_cli(
        prefect_server, "--no-prompt", "deploy", "--prefect-file", str(PREFECT_FILE), "--all"
    )
    assert output.count("successfully created") == 4, output

    with prefect_client(prefect_server) as client:
        nightly = client.read_deployment_by_name(NIGHTLY)
        shots = client.read_deployment_by_name(SHOTS)
    [schedule] = nightly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("0 2 * * *", "Europe/Berlin")
    assert nightly.work_pool_name == POOL and shots.work_pool_name == POOL
    assert nightly.entrypoint == "flows/nightly_batch.py:nightly_batch"
    directories = [step[next(iter(step))]["directory"] for step in nightly.pull_steps or []]
    assert directories == [str(PROJECT_ROOT)], "the pull step must land in the project root"

    # Tonight's prompt file, and the two runs an operator would trigger.
    prompts = [
        {"id": "sku-1", "prompt": "a red enamel teapot"},
        {"id": "sku-2", "prompt": "a blue wool scarf", "aspect_ratio": "4:3"},
        {"id": "sku-3", "prompt": "a green glass vase"},
    ]
    body = "\n".join(json.dumps(p) for p in prompts).encode()
    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="feeds/products.jsonl", Body=body)
    nightly_params = {
        "source": f"s3://{s3_bucket}/feeds/products.jsonl",
        "destination": f"s3://{s3_bucket}/products",
    }
    products = [
        {"sku": "mug-9", "name": "stoneware mug", "colour": "slate grey"},
        {"sku": "lamp-9", "name": "paper lamp", "colour": "white"},
    ]
    shots_params = {
        "products": products,
        "destination": f"s3://{s3_bucket}/shots",
        "credentials_block": None,  # this one uses the worker's FIREWORKS_* env vars
    }
    prefect_cli(
        prefect_server, "deployment", "run", NIGHTLY, "--params", json.dumps(nightly_params)
    )
    prefect_cli(prefect_server, "deployment", "run", SHOTS, "--params", json.dumps(shots_params))

    worker_log = tmp_path / "worker.log"
    code = run_worker_once(worker_env(prefect_server, emulator, tmp_path), worker_log)
    assert code == 0, log_tail(worker_log)

    with prefect_client(prefect_server) as client:
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        runs = {
            d.id: client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[d.id]))
            )
            for d in (nightly, shots)
        }
    [nightly_run] = [r for r in runs[nightly.id] if r.state and not r.state.is_scheduled()]
    [shots_run] = [r for r in runs[shots.id] if r.state]
    assert nightly_run.state.is_completed(), f"{nightly_run.state}\n{log_tail(worker_log)}"
    assert shots_run.state.is_completed(), f"{shots_run.state}\n{log_tail(worker_log)}"

    # Nightly: images and manifest under the prefix dated by the run's scheduled start (UTC).
    day = nightly_run.expected_start_time.astimezone(UTC).date().isoformat()
    prefix = f"products/{day}/"
    listing = s3.list_objects_v2(Bucket=s3_bucket, Prefix=prefix + "images/")
    images = {obj["Key"] for obj in listing.get("Contents", [])}
    assert len(images) == len(prompts)
    manifest = s3.get_object(Bucket=s3_bucket, Key=prefix + "manifest.jsonl")["Body"].read()
    lines = [json.loads(line) for line in manifest.decode().splitlines()]
    assert [line["item_id"] for line in lines] == ["sku-1", "sku-2", "sku-3"]
    assert all(line["finish_reason"] == "SUCCESS" for line in lines)
    assert {line["uri"] for line in lines} == {f"s3://{s3_bucket}/{key}" for key in images}

    # Product shots: one image per product, generated through the step tasks.
    listing = s3.list_objects_v2(Bucket=s3_bucket, Prefix="shots/images/")
    assert len(listing.get("Contents", [])) == len(products)
    # The emulator checks the key, so both credential paths reached it; nothing was paid twice.
    assert emulator.stats.generations == len(prompts) + len(products)
    assert emulator.stats.duplicates == 0


@pytest.mark.parametrize("script", ["flows/nightly_batch.py", "flows/compose_steps.py"])
def test_example_scripts_run_offline(
    prefect_server: PrefectServer, script: str, tmp_path: Path
) -> None:
    """`python flows/x.py` with no Fireworks settings starts its own emulator and writes locally."""
    env = dict(prefect_server.env)
    for name in ("FIREWORKS_API_KEY", "FIREWORKS_BASE_URL"):
        env.pop(name, None)
    env["FLUX_FLOWS_SPILL_DIR"] = str(tmp_path / "spill")
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, script, "--destination", str(out)],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S * 2,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "local Fireworks emulator" in done.stderr
    images = list(out.rglob("images/*.jpg"))
    assert len(images) >= 3
    assert all(p.read_bytes()[:3] == b"\xff\xd8\xff" for p in images)


def _most_in_any_window(times: list[float], window_s: float) -> int:
    """The most request arrivals in any `window_s`-long stretch of `times`."""
    times = sorted(times)
    return max(
        (bisect.bisect_left(times, t + window_s) - i for i, t in enumerate(times)), default=0
    )


def test_chunk_share_spreads_a_batch_over_the_online_workers() -> None:
    from flux_flows.rendering.work_pools import FALLBACK_PARALLEL, chunk_share

    assert chunk_share(32, chunks=40, online=2) == 16
    assert chunk_share(32, chunks=40, online=5) == 6
    assert chunk_share(32, chunks=1, online=4) == 32  # one chunk: the whole window
    assert chunk_share(32, chunks=40, online=None) == 32 // FALLBACK_PARALLEL
    assert chunk_share(32, chunks=40, online=0) == 32 // FALLBACK_PARALLEL
    assert chunk_share(2, chunks=10, online=8) == 1  # never below one slot


def test_a_batch_spreads_its_chunks_over_two_pool_workers(
    prefect_server: PrefectServer,
    emulator: Any,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 15: chunks as runs of the chunk deployment on a process pool with two workers; the
    batch's in-flight limit (a Prefect global concurrency limit, each chunk run holding its
    share) and its requests-per-minute (each chunk pacing at its share) hold across both."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flux_flows import generate_images

    with prefect_client(prefect_server) as client:
        pools = {p.name for p in client.read_work_pools()}
    if POOL not in pools:
        prefect_cli(prefect_server, "work-pool", "create", POOL, "--type", "process")
    prefect_cli(
        prefect_server, "--no-prompt", "deploy", "--prefect-file", str(PREFECT_FILE), "--all"
    )
    rpm, concurrency = 60, 2
    # The emulator answers 429 to a request over `rpm` in any 60 s: the batch must never see one.
    emulator.configure(latency_s=0.3, rpm_limit=rpm)
    arrivals: list[float] = []
    record_start = emulator.stats.record_start

    def stamped() -> None:
        arrivals.append(time.monotonic())
        record_start()

    monkeypatch.setattr(emulator.stats, "record_start", stamped)
    env = worker_env(prefect_server, emulator, tmp_path)
    env["PREFECT_WORKER_QUERY_SECONDS"] = "1"
    workers, logs = [], []
    names = [f"spread-{n}-{os.getpid()}" for n in range(2)]
    worker_command = [PREFECT, "worker", "start", "--pool", POOL, "--type", "process"]
    for n in range(2):
        logs.append(tmp_path / f"worker-{n}.log")
        with logs[-1].open("w") as out:
            workers.append(
                subprocess.Popen(
                    [*worker_command, "--name", names[n]],
                    env=env,
                    cwd=PROJECT_ROOT,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    monkeypatch.setenv("FIREWORKS_API_KEY", TEST_API_KEY)
    monkeypatch.setenv("FIREWORKS_BASE_URL", emulator.base_url)
    monkeypatch.setenv("FLUX_FLOWS_SPILL_DIR", str(tmp_path / "spill"))
    prompts = [f"a pooled lantern {i}" for i in range(10)]
    try:
        # Both workers ONLINE first: the batch reads them to size each chunk's share (1 of 2).
        with prefect_client(prefect_server) as client:
            wait_for_online_workers(client, POOL, names, workers)
        with temporary_settings({PREFECT_API_URL: prefect_server.api_url}):
            try:
                report = generate_images(
                    prompts,
                    f"s3://{s3_bucket}/pool",
                    chunk_size=3,
                    max_concurrency=concurrency,
                    requests_per_minute=rpm,
                    chunk_deployment="render-chunk/flux-flows-chunks",
                )
            finally:
                # The process-wide events worker was made for this server: deliver its events
                # and drop it while the server is up, or later tests' events go to a dead port
                # (each send then times out, and the session's end waits for all of them).
                from prefect.events.worker import EventsWorker

                EventsWorker.drain_all(timeout=60)
    finally:
        for worker in workers:
            stop(worker)
    tails = "\n".join(log_tail(log) for log in logs)
    assert report.counts["SUCCESS"] == 10, tails
    assert emulator.stats.generations == 10 and emulator.stats.duplicates == 0
    assert emulator.stats.max_in_flight <= concurrency, "the batch's limit must hold across workers"
    # The pace holds across workers: no 429 (nothing over `rpm` in any 60 s), no 60 s window
    # over `rpm`, and, at this test's scale, no 5 s over 5 s' worth plus one request per chunk
    # run holding slots (each starts one paced interval after taking them). Unpaced, the 10
    # requests would arrive within ~2 s.
    assert emulator.stats.by_status.get(429, 0) == 0, emulator.stats.by_status
    assert len(arrivals) == 10
    assert _most_in_any_window(arrivals, 60.0) <= rpm
    assert _most_in_any_window(arrivals, 5.0) <= 5 * rpm / 60 + concurrency, sorted(arrivals)
    assert max(arrivals) - min(arrivals) >= (10 - 2 * concurrency) * 60 / rpm, sorted(arrivals)
    listing = boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="pool/images/")
    assert len(listing.get("Contents", [])) == 10
    with prefect_client(prefect_server) as client:
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

        chunk_runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["flux-flows-chunks"])
            )
        )
        limits = [x.name for x in client.read_global_concurrency_limits(limit=100)]
    assert len(chunk_runs) == 4 and all(r.state.is_completed() for r in chunk_runs)  # 3+3+3+1
    # Each chunk run held one of the two slots: the batch spread over both workers.
    assert {r.parameters["share"] for r in chunk_runs} == {1}
    assert {r.parameters["requests_per_minute"] for r in chunk_runs} == {rpm / concurrency}
    assert not [name for name in limits if name.startswith("flux-flows-")]  # the batch's, removed
