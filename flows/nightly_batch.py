"""Nightly batch: a JSONL prompt file in S3 becomes images under a dated prefix, with a manifest.

The shape of the job most teams start with: a product-feed export lands a JSONL file in S3 every
evening (`{"prompt": ..., "id": "sku-123", "aspect_ratio": "4:3"}` per line), and this flow, run
by a scheduled deployment (see `deployments/prefect.yaml`), turns it into images under
`<destination>/<YYYY-MM-DD>/` with `manifest.jsonl` beside them for the downstream job.

The date comes from the run's *scheduled* start time (in UTC), not from the clock when it
happens to start: a run that waited for a worker until morning, or a retry of last night's run,
still writes into last night's folder, so re-running a night resumes it instead of paying again.
Pass `run_date` to backfill a given day.

Credentials: name a `FireworksCredentials` block (`credentials_block`) so the key lives in
Prefect's encrypted block storage, not in deployment parameters; without one, the worker's
`FIREWORKS_API_KEY` / `FIREWORKS_BASE_URL` are used. S3 access follows the standard AWS
configuration of the worker (env, profile, instance role, `AWS_ENDPOINT_URL` for S3-compatible
stores), or a prefect-aws `AwsCredentials` block named by `aws_credentials_block`.

Run it as a script to try it offline: `python flows/nightly_batch.py`. With FIREWORKS_BASE_URL
unset it starts the local Fireworks emulator and writes to ./flux-flows-output/nightly/.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flux_flows import BatchReport, FireworksCredentials, generate_images_from_file

SAMPLE_PROMPTS = Path(__file__).with_name("sample_prompts.jsonl")
LOCAL_DESTINATION = "./flux-flows-output/nightly"


class NightlyBatchFailed(RuntimeError):
    """Images failed and the run was asked to fail for it (`fail_on_error=True`)."""


def night_of(scheduled_start: datetime | None, run_date: date | None = None) -> date:
    """The day a run belongs to: `run_date` if given, else its scheduled start as a UTC date.

    A naive datetime is taken as UTC (Prefect's own times are always aware).
    """
    if run_date is not None:
        return run_date
    if scheduled_start is None:
        return datetime.now(UTC).date()
    if scheduled_start.tzinfo is None:
        scheduled_start = scheduled_start.replace(tzinfo=UTC)
    return scheduled_start.astimezone(UTC).date()


def dated_destination(destination: str, day: date) -> str:
    """`<destination>/<YYYY-MM-DD>/`, for `s3://bucket/prefix` and local folders alike."""
    if not destination.strip():
        raise ValueError("destination is empty: pass s3://BUCKET/PREFIX or a local folder")
    return f"{destination.strip().rstrip('/')}/{day.isoformat()}/"


def load_credentials(block_name: str | None) -> FireworksCredentials | None:
    """The named block, or None so the library reads FIREWORKS_API_KEY / FIREWORKS_BASE_URL."""
    return FireworksCredentials.load(block_name) if block_name else None  # type: ignore[return-value]


def load_aws_credentials(block_name: str | None) -> Any:
    """A prefect-aws `AwsCredentials` block by name; imported only when asked for (optional extra)."""
    if not block_name:
        return None
    try:
        from prefect_aws import AwsCredentials
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            f"aws_credentials_block={block_name!r} needs prefect-aws: pip install 'flux-flows[aws]'"
        ) from exc
    return AwsCredentials.load(block_name)


@flow(name="nightly-batch", log_prints=True, persist_result=False)
def nightly_batch(
    source: str,
    destination: str,
    credentials_block: str | None = None,
    aws_credentials_block: str | None = None,
    run_date: date | None = None,
    model: str = "flux-1-schnell-fp8",
    aspect_ratio: str = "1:1",
    variants: int = 1,
    seed: int | None = None,
    max_concurrency: int = 8,
    requests_per_minute: float | None = None,
    concurrency_limit: str | None = None,
    rate_limit: str | None = None,
    budget_usd: float | None = None,
    fail_on_error: bool = False,
    dask_address: str | None = None,
) -> BatchReport:
    """Generate tonight's images from the prompt file `source` into `<destination>/<date>/`.

    `source` is `s3://bucket/key.jsonl` (or `.csv`/`.txt`, or a local path); per-line keys
    override `model`, `aspect_ratio`, `seed` and the other request fields (`seed` is sent as
    is, its variants step from it: seed + 1, ...). Images already under
    tonight's prefix are not generated again, so a re-run only does what is missing.
    `concurrency_limit` names a Prefect global concurrency limit shared by every run that uses
    this Fireworks account (`prefect gcl create fireworks-api --limit 8`); `rate_limit` one with
    slot decay for its requests per minute (`prefect gcl create fireworks-rpm --limit 10
    --slot-decay-per-second 9`). `fail_on_error=True`
    makes the run Failed when any image failed, so the deployment's alerting fires.
    `dask_address` (`tcp://scheduler:8786`) fans the images out over an existing Dask cluster
    instead of this worker's threads.
    """
    logger = get_run_logger()
    day = night_of(flow_run.scheduled_start_time, run_date)
    target = dated_destination(destination, day)
    logger.info("night of %s: %s -> %s", day.isoformat(), source, target)
    batch = generate_images_from_file
    if dask_address:
        from prefect_dask import DaskTaskRunner

        batch = batch.with_options(task_runner=DaskTaskRunner(address=dask_address))
    state = batch(
        source,
        target,
        model=model,
        aspect_ratio=aspect_ratio,
        seed=seed,
        variants=variants,
        max_concurrency=max_concurrency,
        requests_per_minute=requests_per_minute,
        credentials=load_credentials(credentials_block),
        aws_credentials=load_aws_credentials(aws_credentials_block),
        budget_usd=budget_usd,
        concurrency_limit=concurrency_limit,
        rate_limit=rate_limit,
        fail_on_error=fail_on_error,
        return_state=True,
    )
    # A batch that ends Failed (fail_on_error) carries its report, not an exception, and Prefect
    # cannot re-raise that in the parent; say what failed instead.
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, BaseException):
        raise outcome
    if not state.is_completed():
        raise NightlyBatchFailed(f"night of {day.isoformat()}: {state.message}")
    return outcome


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run the nightly batch once, now. Without FIREWORKS_BASE_URL it runs "
        "against a local Fireworks emulator, so it needs no key and costs nothing."
    )
    parser.add_argument("--source", default=str(SAMPLE_PROMPTS), help="prompt file or s3:// URI")
    parser.add_argument("--destination", default=LOCAL_DESTINATION, help="folder or s3:// URI")
    parser.add_argument("--credentials-block", default=None, help="FireworksCredentials block")
    parser.add_argument("--run-date", type=date.fromisoformat, default=None, help="YYYY-MM-DD")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Script entry point: the emulator stands in for Fireworks unless FIREWORKS_BASE_URL is set."""
    args = _arguments(argv)
    kwargs: dict[str, Any] = {
        "source": args.source,
        "destination": args.destination,
        "credentials_block": args.credentials_block,
        "run_date": args.run_date,
    }
    if os.environ.get("FIREWORKS_BASE_URL") or args.credentials_block:
        report = nightly_batch(**kwargs)
    else:
        from flux_flows.emulator import Emulator

        with Emulator() as emulator:
            print(
                f"FIREWORKS_BASE_URL is not set: using a local Fireworks emulator at "
                f"{emulator.base_url} (no key needed, nothing is billed). Set "
                "FIREWORKS_BASE_URL=https://api.fireworks.ai/inference/v1 and FIREWORKS_API_KEY "
                "to use the real API.",
                file=sys.stderr,
            )
            # A placeholder key, never the user's real one: the emulator accepts any key.
            os.environ["FIREWORKS_BASE_URL"] = emulator.base_url
            os.environ["FIREWORKS_API_KEY"] = "emulator-accepts-any-key"
            report = nightly_batch(**kwargs)
    print(f"{report.counts} -> manifest: {report.manifest_uri}")
    return 0 if not report.failed else 1


if __name__ == "__main__":
    sys.exit(main())
