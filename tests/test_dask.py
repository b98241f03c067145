"""The batch flow runs unchanged on a Dask cluster of worker *processes*.

Everything a render task needs must be pickled to another interpreter and back: the job going
out (request, destination, credentials settings) and the small result coming back. A client
(httpx, boto3) or a lock slipping into either would fail here, as it would on a real cluster;
threads in one process would hide it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest

from flux_flows import FinishReason
from flux_flows.flows import generate_images

pytestmark = [pytest.mark.dask, pytest.mark.usefixtures("flow_env")]

distributed = pytest.importorskip("distributed")
prefect_dask = pytest.importorskip("prefect_dask")


@pytest.fixture
def dask_cluster() -> Iterator[Any]:
    """Two worker processes with two threads each, started after the env points at the emulator.

    Worker processes inherit the environment at start, which is how they find the emulator,
    the moto endpoint and the spill folder, as workers on real machines find theirs.
    """
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=2,
        processes=True,
        dashboard_address=None,
        silence_logs=40,
    ) as cluster:
        yield cluster


def worker_state(client: Any) -> dict[str, dict[str, Any]]:
    """What each worker process did, read inside the worker: its pid and its cached clients."""

    def probe() -> dict[str, Any]:
        import sys

        blocks = sys.modules.get("flux_flows.blocks")
        return {
            "pid": os.getpid(),
            "flux_clients": blocks._cached_client.cache_info().currsize if blocks else 0,
        }

    return client.run(probe)


def test_batch_on_dask_worker_processes(s3_bucket: str, flow_env: Any, dask_cluster: Any) -> None:
    from prefect_dask import DaskTaskRunner

    prompts: list[Any] = [f"a dask painting {i}" for i in range(10)]
    prompts += ["a dask painting 3", {"prompt": "a dask painting 7"}]  # duplicates: paid once
    distinct = 10
    destination = f"s3://{s3_bucket}/dask/"
    runner = DaskTaskRunner(address=dask_cluster.scheduler_address)

    state = generate_images.with_options(task_runner=runner)(
        prompts, destination, max_concurrency=4, return_state=True
    )

    assert state.is_completed(), state.message
    report = state.result()
    assert report.counts[FinishReason.SUCCESS] == len(prompts)
    assert report.api_calls == distinct
    # Exactly one generation per distinct image, none twice.
    assert flow_env.stats.generations == distinct
    assert len(flow_env.stats.generated) == distinct
    assert set(flow_env.stats.generated.values()) == {1}
    s3 = boto3.client("s3")
    listing = s3.list_objects_v2(Bucket=s3_bucket, Prefix="dask/images/")
    keys = [obj["Key"] for obj in listing.get("Contents", [])]
    assert len(keys) == distinct
    assert {r.uri for r in report.records} == {f"s3://{s3_bucket}/{k}" for k in keys}
    manifest = s3.get_object(Bucket=s3_bucket, Key="dask/manifest.jsonl")["Body"].read()
    assert len(manifest.decode().splitlines()) == len(prompts)
    assert all(json.loads(line)["finish_reason"] == "SUCCESS" for line in manifest.splitlines())
    # The work ran in the worker processes, each of which built its own API client there.
    with distributed.Client(dask_cluster) as client:
        workers = worker_state(client)
    assert len(workers) == 2
    assert all(w["pid"] != os.getpid() for w in workers.values())
    assert sum(w["flux_clients"] for w in workers.values()) >= 1


def load_example(name: str) -> ModuleType:
    """A flow from flows/ as a user runs it: by file path, not as an installed package."""
    path = Path(__file__).resolve().parents[1] / "flows" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"flux_flows_example_{name}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nightly_batch_fans_out_to_a_dask_address(
    s3_bucket: str, flow_env: Any, dask_cluster: Any
) -> None:
    """The example nightly flow's `dask_address` parameter: an existing cluster does the work."""
    nightly = load_example("nightly_batch").nightly_batch
    lines = [json.dumps({"id": f"sku-{i}", "prompt": f"a nightly dask lamp {i}"}) for i in range(6)]
    boto3.client("s3").put_object(
        Bucket=s3_bucket, Key="feeds/tonight.jsonl", Body="\n".join(lines).encode()
    )

    report = nightly(
        f"s3://{s3_bucket}/feeds/tonight.jsonl",
        f"s3://{s3_bucket}/nightly",
        run_date=date(2026, 1, 2),
        dask_address=dask_cluster.scheduler_address,
    )

    assert report.counts[FinishReason.SUCCESS] == 6
    assert report.destination == f"s3://{s3_bucket}/nightly/2026-01-02"
    listing = boto3.client("s3").list_objects_v2(
        Bucket=s3_bucket, Prefix="nightly/2026-01-02/images/"
    )
    assert len(listing.get("Contents", [])) == 6
    assert flow_env.stats.generations == 6
    with distributed.Client(dask_cluster) as client:
        workers = worker_state(client)
    assert sum(w["flux_clients"] for w in workers.values()) >= 1


def test_dask_runs_chunks_not_one_task_run_per_image(
    tmp_path: Path, flow_env: Any, dask_cluster: Any
) -> None:
    """The README's scale-out call: a few chunk task runs, each rendering many images."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect_dask import DaskTaskRunner

    prompts = [f"a chunked lamp {i}" for i in range(23)]
    runner = DaskTaskRunner(address=dask_cluster.scheduler_address)
    state = generate_images.with_options(task_runner=runner)(
        prompts, str(tmp_path), max_concurrency=8, chunk_size=5, return_state=True
    )
    report = state.result()
    assert report.counts[FinishReason.SUCCESS] == 23 and flow_env.stats.generations == 23
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
    names = sorted(t.name.rsplit("-", 1)[0] for t in task_runs)
    assert names == ["render-chunk-task"] * 5  # ceil(23 / 5), not 23 task runs
    assert all(t.state.type.value == "COMPLETED" for t in task_runs)
    # Never more than the batch's window in flight at the API, across both workers.
    assert flow_env.stats.max_in_flight <= 8
