"""The fault matrix, S3 faults injected on the library's cached client through botocore events:
failed uploads, a spill folder that breaks, a manifest that cannot be stored."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.awsrequest import AWSResponse

from flux_flows.errors import StorageError
from flux_flows.flows import generate_images
from flux_flows.models import FinishReason
from flux_flows.storage.s3_client import get_s3_client
from helpers.matrix import Scenario, distinct, generated_snapshot
from helpers.s3 import S3Faults

pytestmark = pytest.mark.usefixtures("flow_env")


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
