"""The contact sheet a run writes beside its manifest, in its destination."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from flux_flows.gallery.index import SheetText
from flux_flows.gallery.links import relative_href
from flux_flows.gallery.sheets import write_sheet
from flux_flows.planning import layout
from flux_flows.records.reports import summary_lines
from flux_flows.results import BatchReport, ImageRecord
from flux_flows.storage import Storage


def write_contact_sheets(
    storage: Storage,
    run_id: str,
    report: BatchReport,
    latest: tuple[Iterable[ImageRecord], Mapping[str, int]] | None = None,
) -> str:
    """The run's sheet under runs/<id>/ and the latest-run index at the root (for a replay,
    `latest` is the merged manifest the root shows); returns the run's."""
    return write_run_sheet(
        storage,
        run_id,
        report.iter_records(),
        report.counts,
        summary=summary_lines(report),
        destination=report.destination,
        latest=latest,
    )


def write_run_sheet(
    storage: Storage,
    run_id: str,
    records: Iterable[ImageRecord],
    counts: Mapping[str, int],
    *,
    summary: Sequence[tuple[str, str]],
    destination: str,
    latest: tuple[Iterable[ImageRecord], Mapping[str, int]] | None = None,
) -> str:
    """The same from a stream of records and their counts by finish reason.

    Links are relative to where each page is stored, so the sheet works on disk and in a bucket
    served as a static site. The root copy of a paged sheet is an index whose links go into
    runs/<id>/contact-sheet/, so the latest run's pages are stored only once.
    """
    text = SheetText(
        title=f"flux-flows run {run_id}",
        subtitle=destination,
        summary=summary,
        manifest_href=layout.MANIFEST,  # each index sits beside its manifest
    )
    keys = [layout.run_contact_sheet_key(run_id)]
    if latest is None:  # the root copy shows this run
        keys.append(layout.CONTACT_SHEET)
    written = write_sheet(storage, keys, records, counts, href_for=relative_href, text=text)
    if latest is not None:  # a replay: the root shows the whole merged manifest
        merged, merged_counts = latest
        root = SheetText(
            title="flux-flows: latest images",
            subtitle=destination,
            summary=(),
            manifest_href=layout.MANIFEST,
        )
        write_sheet(
            storage,
            [layout.CONTACT_SHEET],
            merged,
            merged_counts,
            href_for=relative_href,
            text=root,
        )
    return written.uris[0]
