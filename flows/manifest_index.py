"""Downstream of a batch: its manifest becomes `index.csv` beside it, started by the batch's event.

The next step of a pipeline (captions, a dbt model, a publish job) should not poll
`manifest.jsonl`. A batch sends `flux-flows.batch.completed` when it has stored its manifest,
and `deployments/prefect.yaml` deploys this flow with a trigger on that event from the nightly
deployment, passing the event's `manifest_uri` as the parameter. This flow is the smallest such
step: one CSV row per image that exists (`index,variant,item_id,finish_reason,uri,prompt`),
written next to the manifest, in the same folder or S3 prefix.

Run it by hand on any manifest: `python flows/manifest_index.py path/or/s3/manifest.jsonl`.
`python flows/manifest_index.py --serve` serves it with the same trigger, for any batch (or,
with `--after NAME`, only for batches started from the deployment NAME), without a work pool.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from typing import Any

from prefect import flow, get_run_logger

from flux_flows.models import FinishReason
from flux_flows.records.manifests import destination_of_manifest, iter_manifest
from flux_flows.storage import open_storage

INDEX = "index.csv"
COLUMNS = ("index", "variant", "item_id", "finish_reason", "uri", "prompt")
COMPLETED = "flux-flows.batch.completed"


def local_or_s3(uri: str) -> str:
    """The manifest URI as flux-flows reads it: a `file://` asset key becomes its path."""
    return uri.removeprefix("file://")


def index_csv(manifest_uri: str, aws_credentials: Any = None) -> tuple[bytes, int]:
    """The index's bytes and its number of rows, streamed from the manifest."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    rows = 0
    for record in iter_manifest(manifest_uri, aws_credentials=aws_credentials):
        if record.finish_reason is not FinishReason.SUCCESS or not record.uri:
            continue
        writer.writerow(
            [
                record.index,
                record.variant,
                record.item_id or "",
                "SUCCESS",
                record.uri,
                record.prompt,
            ]
        )
        rows += 1
    return out.getvalue().encode("utf-8"), rows


@flow(name="manifest-index", log_prints=True, persist_result=False)
def manifest_index(manifest_uri: str) -> str:
    """Write `index.csv` beside the batch manifest at `manifest_uri`; returns the index's URI."""
    manifest = local_or_s3(manifest_uri)
    body, rows = index_csv(manifest)
    storage = open_storage(destination_of_manifest(manifest))
    uri = storage.put(INDEX, body, content_type="text/csv")
    get_run_logger().info("%d images indexed from %s into %s", rows, manifest, uri)
    return uri


def batch_trigger(after_deployment: str | None = None) -> Any:
    """The trigger `prefect.yaml` declares, as a Python object for `serve`."""
    from prefect.events import DeploymentEventTrigger

    match = {"prefect.resource.id": "flux-flows.batch.*", "flux-flows.dry-run": "false"}
    if after_deployment:
        match["flux-flows.deployment"] = after_deployment
    return DeploymentEventTrigger(
        name="after a flux-flows batch",
        match=match,
        expect={COMPLETED},
        parameters={"manifest_uri": "{{ event.payload.manifest_uri }}"},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("manifest", nargs="?", help="a manifest.jsonl: path or s3:// URI")
    parser.add_argument("--serve", action="store_true", help="serve with the batch trigger")
    parser.add_argument("--after", default=None, help="only batches from this deployment")
    args = parser.parse_args(argv)
    if args.serve:
        manifest_index.serve(name="index-after-batch", triggers=[batch_trigger(args.after)])
        return 0
    if not args.manifest:
        parser.error("give a manifest, or --serve")
    print(manifest_index(args.manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
