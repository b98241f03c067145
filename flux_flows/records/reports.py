"""What a run tells people: the summary, the counts and the Prefect artifacts.

Artifacts are written by the flow once (plus a throttled progress bar), never one per image:
Prefect stores each as a row, and a 10,000-image run must not make 10,000 API calls to say so.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from flux_flows.models import FinishReason
from flux_flows.planning import layout
from flux_flows.results import BatchReport, ImageRecord
from flux_flows.storage import (
    Storage,
)

# A table a person reads in the Prefect UI, not a copy of the manifest: the manifest has them all.
ARTIFACT_TABLE_ROWS = 500
PROMPT_CHARS_IN_TABLE = 200
THUMBNAILS_IN_SUMMARY = 12
# Artifacts outlive any link; 7 days is the longest S3 signs for.
ARTIFACT_LINK_EXPIRES_S = 7 * 24 * 3600
_NOT_ALT_TEXT = re.compile(r"[^\w ,.'-]+")


# What a person looking for problems wants first: the table artifact and the contact sheet's
# pages list records in this order.
OUTCOME_ORDER: tuple[FinishReason, ...] = (
    FinishReason.ERROR,
    FinishReason.CONTENT_FILTERED,
    FinishReason.SKIPPED_BUDGET,
    FinishReason.PLANNED,
    FinishReason.SUCCESS,
)


def count_outcomes(records: Iterable[ImageRecord]) -> dict[str, int]:
    counts = Counter(r.finish_reason.value for r in records)
    return {reason.value: counts.get(reason.value, 0) for reason in FinishReason}


def summary_lines(report: BatchReport) -> list[tuple[str, str]]:
    """The figures every summary shows (CLI table, markdown artifact, contact sheet)."""
    counts = report.counts
    lines = [
        ("images requested", str(report.requested)),
        ("generated (SUCCESS)", str(counts.get("SUCCESS", 0) - report.cached_successes)),
        ("already stored (cache hits)", str(report.cache_hits)),
        ("content filtered", str(counts.get("CONTENT_FILTERED", 0))),
        ("failed (ERROR)", str(counts.get("ERROR", 0))),
        ("skipped for budget", str(counts.get("SKIPPED_BUDGET", 0))),
        ("kept locally (upload failed)", str(report.spilled)),
        ("API calls", str(report.api_calls)),
        ("estimated cost", f"${report.estimated_cost_usd:.4f}"),
        ("saved by the cache", f"${report.saved_usd:.4f}"),
        ("wall time", f"{report.wall_time_s:.1f} s"),
    ]
    if report.spill_dir and report.spilled:
        lines.append(("spill folder", report.spill_dir))
    if report.manifest_uri:
        lines.append(("manifest", report.manifest_uri))
    return lines


def summary_markdown(
    report: BatchReport, *, title: str = "FLUX batch", storage: Storage | None = None
) -> str:
    rows = "\n".join(f"| {name} | {value} |" for name, value in summary_lines(report))
    text = f"# {title}\n\nDestination: `{report.destination}`\n\n| | |\n|---|---|\n{rows}\n"
    if storage is not None:
        text += thumbnails_markdown(report, storage)
    errors = report.first_errors
    if errors:
        text += "\n## First errors\n" + "".join(
            f"- prompt {r.index} ({_short(r.prompt, 60)}): {_short(r.error or '', 300)}\n"
            for r in errors
        )
    return text


def thumbnails_markdown(report: BatchReport, storage: Storage) -> str:
    """A strip of the first thumbnails and where the contact sheet is, for the summary artifact.

    The Prefect UI runs in a browser that may be on another machine: it can show signed S3 links
    but not local files, so a local destination gets paths and an honest sentence instead.
    """
    shown = _first_thumbnails(report.iter_records(), THUMBNAILS_IN_SUMMARY)
    if not shown and not report.contact_sheet_uri:
        return ""
    text = "\n## Thumbnails\n\n"
    links = [_linked_thumbnail(record, storage) for record in shown]
    if shown and all(links):
        text += " ".join(link for link in links if link) + "\n\n"
        text += f"_First {len(shown)} images; links are signed and valid for up to 7 days._\n"
    elif shown:
        folder = storage.uri_for(layout.THUMBS.rstrip("/"))
        text += (
            f"The thumbnails are local files in `{_code(folder)}`, which the Prefect UI cannot "
            "show from another machine: open the contact sheet below in a browser on the "
            "machine that ran the flow.\n"
        )
    if report.contact_sheet_uri:
        text += f"\nContact sheet: `{_code(report.contact_sheet_uri)}`"
        if report.contact_sheet_uri.startswith("s3://"):
            text += (
                " (open it where the bucket is served as a static site, or run `flux-flows "
                "gallery` on the manifest for a local page with signed links)"
            )
        text += "\n"
    return text


def _first_thumbnails(records: Iterable[ImageRecord], limit: int) -> list[ImageRecord]:
    chosen: dict[str, ImageRecord] = {}
    for record in records:
        if record.finish_reason is FinishReason.SUCCESS and record.thumbnail_uri:
            chosen.setdefault(record.cache_key, record)
            if len(chosen) == limit:
                break
    return list(chosen.values())


def _linked_thumbnail(record: ImageRecord, storage: Storage) -> str | None:
    """`[![prompt](thumbnail)](image)` with signed links, or None where links cannot be signed."""
    thumbnail = storage.presigned_url(
        layout.thumbnail_key(record.cache_key), ARTIFACT_LINK_EXPIRES_S
    )
    if thumbnail is None:
        return None
    alt = _short(_NOT_ALT_TEXT.sub(" ", record.prompt), 60)
    image = f"![{alt}]({thumbnail})"
    key = layout.image_key(record.to_request())
    full = storage.presigned_url(key, ARTIFACT_LINK_EXPIRES_S)
    return f"[{image}]({full})" if full else image


def _code(text: str) -> str:
    """Text safe inside a markdown code span."""
    return text.replace("`", "'")


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def table_rows(records: Sequence[ImageRecord]) -> list[dict[str, Any]]:
    return [
        {
            "index": r.index,
            "variant": r.variant,
            "prompt": _short(r.prompt, PROMPT_CHARS_IN_TABLE),
            "seed": r.seed,
            "finish_reason": r.finish_reason.value,
            "uri": r.uri or r.filtered_uri or r.spill_path or "",
            "cached": r.cached,
            "error": _short(r.error or "", 200),
        }
        for r in records
    ]


def problems_first(records: Iterable[ImageRecord], limit: int) -> tuple[list[ImageRecord], int]:
    """At most `limit` records in `OUTCOME_ORDER` (manifest order within a finish reason), and
    how many were left out; holds at most `limit` records per finish reason, so it can stream."""
    kept: dict[FinishReason, list[ImageRecord]] = {reason: [] for reason in OUTCOME_ORDER}
    total = 0
    for record in records:
        total += 1
        bucket = kept.setdefault(record.finish_reason, [])
        if len(bucket) < limit:
            bucket.append(record)
    chosen = [record for bucket in kept.values() for record in bucket][:limit]
    return chosen, total - len(chosen)


def left_out_markdown(
    shown: int, left_out: int, manifest_uri: str | None, link: str | None = None
) -> str:
    """What the capped table does not show, and where it is (with a signed `link` on S3)."""
    if not left_out:
        return ""
    where = f" `{_code(manifest_uri)}`" if manifest_uri else " (not stored: see the run's logs)"
    if manifest_uri and link:
        where += f" ([download]({link}), valid for up to 7 days)"
    return (
        f"The images table shows {shown:,} of {shown + left_out:,} records, failures first; "
        f"{left_out:,} more are left out. Every record is in the manifest{where}.\n"
    )


def publish_artifacts(
    report: BatchReport, *, key_prefix: str = "flux-flows", storage: Storage | None = None
) -> None:
    """A table of the records (failures first, capped) and a markdown summary on the flow run.

    The table is capped at `ARTIFACT_TABLE_ROWS`: Prefect stores it as one row of its database
    and the UI renders it whole, and a person scanning it wants the failures, not 20,000 rows.
    Both artifacts say how many records were left out and where the manifest is.
    With the run's `storage`, the summary also shows the first thumbnails (signed links on S3).
    """
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    shown, left_out = problems_first(report.iter_records(), ARTIFACT_TABLE_ROWS)
    link = _signed_link(report.manifest_uri, storage) if left_out else None
    note = left_out_markdown(len(shown), left_out, report.manifest_uri, link)
    create_table_artifact(
        table=table_rows(shown),
        key=f"{key_prefix}-images",
        description=f"Images, failures first. {note}" if note else "Images, failures first",
    )
    markdown = summary_markdown(report, storage=storage)
    if note:
        markdown += f"\n## Images table\n\n{note}"
    create_markdown_artifact(
        markdown=markdown,
        key=f"{key_prefix}-summary",
        description="Counts, API calls, cache hits and cost of this run",
    )


def _signed_link(uri: str | None, storage: Storage | None) -> str | None:
    """A signed link to an object of `storage` given by its URI; None where none can be signed."""
    if storage is None or not uri:
        return None
    prefix = f"{storage.root_uri.rstrip('/')}/"
    if not uri.startswith(prefix):
        return None
    return storage.presigned_url(uri.removeprefix(prefix), ARTIFACT_LINK_EXPIRES_S)
