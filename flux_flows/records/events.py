"""A batch's end as a Prefect event, so the next job starts on a trigger instead of polling.

Exactly one event per batch, sent from the batch's own flow run (chunk runs on a work pool or
Dask never send one): `flux-flows.batch.completed` when every image was attempted and the
manifest stored, `flux-flows.batch.failed` when the flow failed (an exception, or
`fail_on_error` with failed images), was interrupted, or could not store its manifest.

Prefect triggers filter on the event name and the resource's labels, not on the payload, so
what a trigger needs is a label (`LABELS`); the payload is a small versioned summary whose
documented keys (`PAYLOAD_KEYS`) are always present, `None` when empty, because a trigger's
parameter template that names a missing field fails the automation. It never holds the records:
the manifest does. deployments/README.md documents both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from prefect.events import emit_event
from prefect.states import State

from flux_flows.planning.layout import MANIFEST
from flux_flows.records.assets import materialize_manifest
from flux_flows.results import BatchReport
from flux_flows.settings import BatchOptions

SCHEMA_VERSION = 1
COMPLETED = "flux-flows.batch.completed"
FAILED = "flux-flows.batch.failed"
RESOURCE_PREFIX = "flux-flows.batch."
LABELS = (
    "flux-flows.destination",
    "flux-flows.outcome",  # ok | partial | failed
    "flux-flows.dry-run",  # "true" | "false"
    "flux-flows.flow",  # generate-images, generate-images-from-file, replay-failed
    "flux-flows.deployment",  # the deployment a run (or its parent) was started from, or ""
)
PAYLOAD_KEYS = (
    "schema_version",
    "outcome",
    "run_id",
    "flow_run_id",
    "destination",
    "manifest_uri",
    "manifest_asset_key",
    "run_manifest_uri",
    "contact_sheet_uri",
    "source_uri",
    "dry_run",
    "requested",
    "counts",
    "api_calls",
    "cache_hits",
    "estimated_cost_usd",
    "saved_usd",
    "wall_time_s",
    "problems",
)
MAX_PROBLEMS = 5
MAX_PROBLEM_CHARS = 300
MAX_NESTING = 5  # parent flow runs walked up to find the deployment


def beside(root: str, name: str) -> str:
    """`name` in the folder or prefix `root` (a destination's root URI)."""
    if "://" in root:
        return f"{root.rstrip('/')}/{name}"
    return os.path.join(root, name)


def outcome_of(report: BatchReport | None, failed: bool) -> str:
    """ok: every image is there; partial: some failed, were filtered or skipped; failed."""
    if failed or report is None:
        return "failed"
    counts = report.counts
    missing = sum(counts.get(k, 0) for k in ("ERROR", "CONTENT_FILTERED", "SKIPPED_BUDGET"))
    return "partial" if missing or report.problems else "ok"


def problems_of(report: BatchReport | None, error: BaseException | None) -> list[str] | None:
    """The first few things that went wrong, each one line and short; None when nothing did."""
    found: list[str] = []
    if error is not None:
        found.append(f"{type(error).__name__}: {error}")
    if report is not None:
        found += report.problems
        for record in report.first_errors:
            which = f"image {record.index} variant {record.variant}"
            if record.item_id is not None:
                which += f" (id {record.item_id})"
            found.append(f"{which}: {record.error}")
    shortened = [" ".join(p.split())[:MAX_PROBLEM_CHARS] for p in found[:MAX_PROBLEMS]]
    return shortened or None


def payload_of(
    report: BatchReport | None,
    *,
    outcome: str,
    run_id: str | None,
    flow_run_id: str | None,
    destination: str,
    source_uri: str | None,
    asset_key: str | None = None,
    error: BaseException | None = None,
) -> dict[str, Any]:
    """The documented summary: every key of `PAYLOAD_KEYS`, in that order, `None` when empty."""
    stored = report is not None and report.manifest_uri is not None and not report.dry_run
    return {
        "schema_version": SCHEMA_VERSION,
        "outcome": outcome,
        "run_id": run_id,
        "flow_run_id": flow_run_id,
        "destination": destination,
        "manifest_uri": beside(destination, MANIFEST) if stored else None,
        "manifest_asset_key": asset_key,
        "run_manifest_uri": report.manifest_uri if stored and report else None,
        "contact_sheet_uri": report.contact_sheet_uri if report else None,
        "source_uri": source_uri,
        "dry_run": report.dry_run if report else None,
        "requested": report.requested if report else None,
        "counts": dict(report.counts) if report else None,
        "api_calls": report.api_calls if report else None,
        "cache_hits": report.cache_hits if report else None,
        "estimated_cost_usd": round(report.estimated_cost_usd, 6) if report else None,
        "saved_usd": round(report.saved_usd, 6) if report else None,
        "wall_time_s": round(report.wall_time_s, 3) if report else None,
        "problems": problems_of(report, error),
    }


def payload_size(payload: Mapping[str, Any]) -> int:
    return len(json.dumps(payload).encode("utf-8"))


def _report_of(state: State) -> BatchReport | None:
    """The report a batch's final state carries (a Failed one inside its BatchFailedError)."""
    data = state.data
    report = getattr(data, "report", data)
    return report if isinstance(report, BatchReport) else None


def _deployment_name(context: Any) -> str:
    """The deployment this run, or the flow run it is nested in, was started from; "" if none.

    Read with the run's own sync client, walking up parent flow runs: `prefect.runtime.deployment`
    goes through Prefect's global loop thread, which made a flow run take about 1 s longer to
    end (measured with bench_events.py's runs while this was being written: a scratch figure).
    """
    from prefect.client.orchestration import SyncPrefectClient

    try:
        client = getattr(context, "client", None)
        flow_run = getattr(context, "flow_run", None)
        if not isinstance(client, SyncPrefectClient) or flow_run is None:
            return _runtime_deployment_name()
        for _ in range(MAX_NESTING):
            if flow_run.deployment_id is not None:
                return str(client.read_deployment(flow_run.deployment_id).name or "")
            if flow_run.parent_task_run_id is None:
                return ""
            parent = client.read_task_run(flow_run.parent_task_run_id).flow_run_id
            if parent is None:
                return ""
            flow_run = client.read_flow_run(parent)
        return ""
    except Exception:  # a label is never worth failing the batch
        return ""


def _runtime_deployment_name() -> str:
    """Prefect's own answer, for a run without a sync client (an async engine)."""
    try:
        from prefect.runtime import deployment

        return str(deployment.name or "")
    except Exception:
        return ""


class BatchAnnouncer:
    """Sends the batch's one event (and its manifest's asset events) when it ends, however it
    ends: `ended(state)` on a return, `__exit__` on an exception. Never fails the batch."""

    def __init__(self, options: BatchOptions, source: str | None = None) -> None:
        self.options = options
        self.source = source if source is not None else options.merge_into
        self.run_id: str | None = None  # set by the batch once it has one
        self.sent: Any = None  # the event sent, once sent (None also when events are off)
        self._done = False

    def __enter__(self) -> BatchAnnouncer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            self._send(None, failed=True, error=exc)

    def ended(self, state: State) -> State:
        report = _report_of(state)
        failed = (
            state.is_failed()
            or report is None
            or report.interrupted
            or (not report.dry_run and report.manifest_uri is None)
        )
        self._send(report, failed=failed)
        return state

    def _send(
        self, report: BatchReport | None, *, failed: bool, error: BaseException | None = None
    ) -> None:
        if self._done or not self.options.events:
            return
        self._done = True
        from prefect.context import FlowRunContext
        from prefect.logging import get_run_logger

        logger = get_run_logger()
        try:
            context = FlowRunContext.get()
            flow_run = context.flow_run if context else None
            flow_run_id = str(flow_run.id) if flow_run else None
            destination = report.destination if report else self.options.destination
            summary = payload_of(
                report,
                outcome=outcome_of(report, failed),
                run_id=self.run_id,
                flow_run_id=flow_run_id,
                destination=destination,
                source_uri=self.source,
                error=error,
            )
            if summary["manifest_uri"]:
                summary["manifest_asset_key"] = materialize_manifest(
                    summary["manifest_uri"], self.source, _asset_metadata(summary), logger
                )
            self.sent = emit_event(
                event=FAILED if failed else COMPLETED,
                resource=_resource(summary, flow_run, context),
                related=_related(summary),
                payload=summary,
            )
        except Exception as exc:  # the images are stored; only the notice is lost
            logger.warning("could not send the batch's Prefect event: %s", exc)


def _resource(summary: Mapping[str, Any], flow_run: Any, context: Any) -> dict[str, str]:
    flow = getattr(context, "flow", None)
    return {
        "prefect.resource.id": RESOURCE_PREFIX + str(summary["flow_run_id"] or summary["run_id"]),
        "prefect.resource.name": str(summary["run_id"] or getattr(flow_run, "name", "") or ""),
        "flux-flows.destination": summary["destination"],
        "flux-flows.outcome": summary["outcome"],
        "flux-flows.dry-run": "true" if summary["dry_run"] else "false",
        "flux-flows.flow": str(getattr(flow, "name", "") or ""),
        "flux-flows.deployment": _deployment_name(context),
    }


def _related(summary: Mapping[str, Any]) -> list[dict[str, str]]:
    """The manifest's asset, so the event links to the lineage; Prefect adds the flow run's."""
    key = summary["manifest_asset_key"]
    return [{"prefect.resource.id": key, "prefect.resource.role": "manifest"}] if key else []


def _asset_metadata(summary: Mapping[str, Any]) -> dict[str, Any]:
    names = ("requested", "counts", "estimated_cost_usd", "saved_usd", "api_calls")
    return {
        **{name: summary[name] for name in names},
        "run_manifest_uri": summary["run_manifest_uri"],
        "flow_run_id": summary["flow_run_id"],
    }
