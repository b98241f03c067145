"""The batch flows on real parts: a Prefect API, the emulator over HTTP, a moto S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import boto3
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from flux_flows import FinishReason, ImageRequest, generate_image
from flux_flows.errors import StorageError
from flux_flows.flows import generate_images, generate_images_from_file
from flux_flows.results import BatchReport
from helpers.common import TEST_API_KEY

pytestmark = pytest.mark.usefixtures("flow_env")


def run(prompts: list[Any], destination: str, **kwargs: Any) -> tuple[BatchReport, Any]:
    state = generate_images(prompts, destination, return_state=True, **kwargs)
    return state.result(), state


def manifest_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_local_batch_stores_images_and_manifest(tmp_path: Path, flow_env: Any) -> None:
    prompts = ["a red fox", "a blue whale", "a green parrot"]
    report, state = run(prompts, str(tmp_path / "out"))
    assert state.is_completed()
    assert report.counts["SUCCESS"] == 3
    assert report.api_calls == 3 and report.cache_hits == 0
    images = sorted((tmp_path / "out" / "images").iterdir())
    assert len(images) == 3
    assert all(p.read_bytes()[:3] == b"\xff\xd8\xff" for p in images)
    manifest = manifest_lines(tmp_path / "out" / "manifest.jsonl")
    assert [m["prompt"] for m in manifest] == prompts
    assert {Path(m["uri"]).name for m in manifest} == {p.name for p in images}
    assert (
        report.manifest_uri
        and Path(report.manifest_uri).read_bytes()
        == (tmp_path / "out" / "manifest.jsonl").read_bytes()
    )
    assert flow_env.stats.generations == 3
    assert report.estimated_cost_usd == pytest.approx(3 * 4 * 0.00035)


def test_rerun_in_same_process_makes_no_api_call(tmp_path: Path, flow_env: Any) -> None:
    prompts = [f"lighthouse {i}" for i in range(5)]
    first, _ = run(prompts, str(tmp_path))
    second, _ = run(prompts, str(tmp_path))
    assert first.api_calls == 5
    assert second.api_calls == 0 and second.cache_hits == 5
    assert [r.uri for r in second.records] == [r.uri for r in first.records]
    assert flow_env.stats.generations == 5
    assert second.saved_usd == pytest.approx(first.estimated_cost_usd)


def test_identical_requests_in_one_batch_are_generated_once(tmp_path: Path, flow_env: Any) -> None:
    report, _ = run(["same", "other", "same", {"prompt": "same"}], str(tmp_path))
    assert flow_env.stats.generations == 2
    assert report.api_calls == 2
    assert [r.cached for r in report.records] == [False, False, True, True]
    assert len({r.uri for r in report.records}) == 2


def test_variants_get_distinct_stable_seeds(tmp_path: Path, flow_env: Any) -> None:
    report, _ = run(["a fox", "a cat"], str(tmp_path), variants=3)
    seeds = [(r.index, r.variant, r.seed) for r in report.records]
    assert len(report.records) == 6 and len({s for _, _, s in seeds}) == 6
    again, _ = run(["a fox", "a cat"], str(tmp_path / "second"), variants=3)
    assert [(r.index, r.variant, r.seed) for r in again.records] == seeds


def test_a_given_seed_is_sent_as_is_and_variants_step_from_it(
    tmp_path: Path, flow_env: Any
) -> None:
    report, _ = run(["a fox", "a cat"], str(tmp_path), variants=3, seed=11)
    assert [(r.index, r.variant, r.seed) for r in report.records] == [
        (i, v, 11 + v) for i in range(2) for v in range(3)
    ]
    assert len({r.uri for r in report.records}) == 6  # the prompt is in the cache key
    assert flow_env.stats.generations == 6


def test_per_prompt_overrides_and_ids(tmp_path: Path, flow_env: Any) -> None:
    prompts = [
        {"prompt": "wide", "aspect_ratio": "16:9", "id": "sku-1"},
        {"prompt": "tall", "aspect_ratio": "9:16", "seed": 77, "output_format": "png"},
    ]
    report, _ = run(prompts, str(tmp_path))
    wide, tall = report.records
    assert (wide.width, wide.height, wide.item_id) == (1344, 768, "sku-1")
    assert (tall.width, tall.height, tall.seed) == (768, 1344, 77)
    assert tall.uri and tall.uri.endswith(".png") and tall.content_type == "image/png"


def test_filtered_and_failed_are_recorded_and_others_go_on(tmp_path: Path, flow_env: Any) -> None:
    prompts = ["a calm lake", "something nsfw", "broken [[status:400]]", "a quiet forest"]
    report, state = run(prompts, str(tmp_path), safety_check=True)
    reasons = [r.finish_reason for r in report.records]
    assert reasons == [
        FinishReason.SUCCESS,
        FinishReason.CONTENT_FILTERED,
        FinishReason.ERROR,
        FinishReason.SUCCESS,
    ]
    filtered, failed = report.records[1], report.records[2]
    assert filtered.uri is None and filtered.filtered_uri and "/filtered/" in filtered.filtered_uri
    assert not any("nsfw" in p.name for p in (tmp_path / "images").iterdir())
    assert failed.uri is None and "InvalidRequestError" in (failed.error or "")
    assert state.is_completed() and "1 failed" in (state.message or "")
    manifest = manifest_lines(tmp_path / "manifest.jsonl")
    assert [m["finish_reason"] for m in manifest] == [r.value for r in reasons]
    # A re-run retries only the failure; the filtered answer is not paid for twice.
    again, _ = run(prompts, str(tmp_path), safety_check=True)
    assert again.api_calls == 1
    assert flow_env.stats.requests == 4 + 1


def test_fail_on_error_fails_the_run(tmp_path: Path) -> None:
    state = generate_images(
        ["fine", "bad [[status:400]]"], str(tmp_path), fail_on_error=True, return_state=True
    )
    assert state.is_failed() and "1 failed" in (state.message or "")


def test_invalid_prompt_fails_before_any_spend(tmp_path: Path, flow_env: Any) -> None:
    with pytest.raises(ValueError, match=r"prompts\[1\].*aspect_ratio") as info:
        generate_images(["good", {"prompt": "bad", "aspect_ratio": "7:3"}], str(tmp_path))
    assert "nothing was generated" in str(info.value)
    assert flow_env.stats.requests == 0


def test_missing_bucket_fails_before_any_spend(s3_server: str, flow_env: Any) -> None:
    with pytest.raises(StorageError, match="no-such-bucket-here"):
        generate_images(["a fox"], "s3://no-such-bucket-here/x/")
    assert flow_env.stats.requests == 0


def test_wrong_key_stops_submitting(
    tmp_path: Path, flow_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIREWORKS_API_KEY", "fw-not-the-right-key-123456")
    report, _ = run([f"p{i}" for i in range(30)], str(tmp_path), max_concurrency=2)
    assert report.counts["ERROR"] == 30
    assert flow_env.stats.requests < 30
    assert any("not attempted" in (r.error or "") for r in report.records)


def test_concurrency_is_bounded(tmp_path: Path, flow_env: Any) -> None:
    flow_env.configure(latency_s=0.15)
    run([f"bounded {i}" for i in range(12)], str(tmp_path), max_concurrency=3)
    assert flow_env.stats.max_in_flight == 3


def test_s3_destination_with_metadata_limits(s3_bucket: str, flow_env: Any) -> None:
    long_prompt = "Ünïcödé 🦊 prompt, " + "very long description " * 200
    report, _ = run([long_prompt, "plain"], f"s3://{s3_bucket}/renders/")
    s3 = boto3.client("s3")
    record = report.records[0]
    assert record.uri and record.uri.startswith(f"s3://{s3_bucket}/renders/images/")
    key = record.uri.removeprefix(f"s3://{s3_bucket}/")
    head = s3.head_object(Bucket=s3_bucket, Key=key)
    assert head["ContentType"] == "image/jpeg"
    metadata = head["Metadata"]
    assert sum(len(k) + len("x-amz-meta-") + len(v.encode()) for k, v in metadata.items()) <= 2048
    assert all(v.isascii() for v in metadata.values())
    assert metadata["seed"] == str(record.seed) and metadata["model"] == record.model
    assert metadata["finish-reason"] == "SUCCESS"
    body = s3.get_object(Bucket=s3_bucket, Key="renders/manifest.jsonl")["Body"].read()
    lines = [json.loads(x) for x in body.decode().splitlines()]
    assert lines[0]["prompt"] == long_prompt.strip()


def test_from_file_reads_s3_csv_with_overrides(
    s3_bucket: str, tmp_path: Path, flow_env: Any
) -> None:
    csv = "prompt,aspect_ratio,seed,id\na red fox,16:9,5,fox-1\na blue whale,,,whale-2\n"
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="in/prompts.csv", Body=csv.encode())
    report = generate_images_from_file(f"s3://{s3_bucket}/in/prompts.csv", str(tmp_path))
    fox, whale = report.records
    assert (fox.aspect_ratio, fox.seed, fox.item_id) == ("16:9", 5, "fox-1")
    assert (whale.aspect_ratio, whale.item_id) == ("1:1", "whale-2")
    assert report.counts["SUCCESS"] == 2


def test_from_file_bad_line_names_the_line(tmp_path: Path, flow_env: Any) -> None:
    source = tmp_path / "prompts.jsonl"
    source.write_text('{"prompt": "ok"}\n{"prompt": "bad", "num_inference_steps": 99}\n')
    with pytest.raises(ValueError, match=r"line 2.*num_inference_steps"):
        generate_images_from_file(str(source), str(tmp_path / "out"))
    assert flow_env.stats.requests == 0


def test_failed_upload_spills_then_rerun_uploads_without_paying(
    tmp_path: Path, flow_env: Any
) -> None:
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "images").write_text("a file where the images folder should be")
    report, state = run(["spilled fox", "spilled cat"], str(destination))
    assert report.spilled == 2 and report.spill_dir
    for record in report.records:
        assert record.spill_path and Path(record.spill_path).exists()
        assert record.uri is None and "upload failed" in (record.error or "")
    assert "kept locally" in (state.message or "")
    (destination / "images").unlink()
    again, _ = run(["spilled fox", "spilled cat"], str(destination))
    assert again.api_calls == 0 and again.spilled == 0
    assert all(r.uri and Path(r.uri).exists() for r in again.records)
    assert flow_env.stats.generations == 2


def test_artifacts_are_published(tmp_path: Path) -> None:
    _, state = run(["artifact fox", "artifact cat"], str(tmp_path))

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    by_type = {a.type: a for a in artifacts}
    assert set(by_type) >= {"table", "markdown", "progress"}
    table = json.loads(by_type["table"].data)
    assert [row["prompt"] for row in table] == ["artifact fox", "artifact cat"]
    assert "API calls" in by_type["markdown"].data
    assert float(by_type["progress"].data) == 100.0


def test_key_never_appears_in_outputs(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    report, state = run(["a fox", "boom [[status:500]]", "bad [[status:401]]"], str(tmp_path))
    captured = capfd.readouterr()
    texts = [
        report.model_dump_json(),
        repr(report),
        state.message or "",
        (tmp_path / "manifest.jsonl").read_text(),
        captured.out,
        captured.err,
        caplog.text,
    ]
    assert report.counts["ERROR"] == 2
    for text in texts:
        assert TEST_API_KEY not in text


def test_prefect_native_cache_on_the_generate_task(flow_env: Any) -> None:
    @flow
    def user_flow() -> Any:
        return generate_image(ImageRequest(prompt="cached fox", seed=3), return_state=True)

    first, second = user_flow(), user_flow()
    assert first.is_completed() and second.name == "Cached"
    assert second.result().data == first.result().data
    assert flow_env.stats.generations == 1


def test_rerun_with_fresh_prefect_database_makes_no_calls_or_uploads(
    s3_bucket: str, tmp_path: Path, flow_env: Any
) -> None:
    destination = f"s3://{s3_bucket}/fresh/"
    prompts = [f"fresh {i}" for i in range(4)]
    first, _ = run(prompts, destination)
    script = textwrap.dedent(
        f"""
        import json
        from flux_flows.flows import generate_images
        from flux_flows.storage.s3 import get_s3_client

        puts = []
        get_s3_client().meta.events.register(
            "provide-client-params.s3.PutObject", lambda params, **kw: puts.append(params["Key"])
        )
        report = generate_images({prompts!r}, {destination!r})
        print("RESULT " + json.dumps({{"api_calls": report.api_calls, "cache_hits": report.cache_hits,
              "puts": puts}}))
        """
    )
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "fresh-prefect-home")}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240
    )
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, done.stderr[-3000:]
    line = lines[0]
    outcome = json.loads(line.removeprefix("RESULT "))
    assert outcome["api_calls"] == 0 and outcome["cache_hits"] == 4
    assert not [k for k in outcome["puts"] if "/images/" in k]
    assert flow_env.stats.generations == 4
    assert first.api_calls == 4


def test_fail_on_error_raises_a_batch_error_with_the_report(tmp_path: Path) -> None:
    from flux_flows.errors import BatchFailedError

    with pytest.raises(BatchFailedError, match="1 failed") as info:
        generate_images(["fine", "bad [[status:400]]"], str(tmp_path), fail_on_error=True)
    assert info.value.report.counts["ERROR"] == 1  # type: ignore[attr-defined]


def test_prefect_cache_is_per_api(emulator: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An image cached from one endpoint (say the emulator) never answers for another."""
    from flux_flows.emulator import Emulator, EmulatorConfig

    @flow
    def user_flow() -> Any:
        return generate_image(ImageRequest(prompt="per-api fox", seed=4), return_state=True)

    assert user_flow().is_completed()
    with Emulator(EmulatorConfig(api_key=TEST_API_KEY)) as other:
        monkeypatch.setenv("FIREWORKS_BASE_URL", other.base_url)
        state = user_flow()
        assert state.name != "Cached" and other.stats.generations == 1


@pytest.mark.parametrize("per_image_tasks", [False, True])
def test_per_image_task_runs_only_when_asked(
    tmp_path: Path, flow_env: Any, per_image_tasks: bool
) -> None:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    report, state = run(
        ["task fox", "task cat", "task bad [[status:400]]"],
        str(tmp_path),
        per_image_tasks=per_image_tasks,
    )
    assert report.counts["SUCCESS"] == 2 and report.counts["ERROR"] == 1
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    renders = [t for t in task_runs if t.name.startswith("render-image")]
    if per_image_tasks:
        assert sorted(t.state.type.value for t in renders) == ["COMPLETED", "COMPLETED", "FAILED"]
    else:
        assert renders == []
