"""The contact sheets a run writes beside its manifest, in its destination."""

from __future__ import annotations

from flux_flows import layout
from flux_flows.gallery.links import relative_href
from flux_flows.gallery.page import HTML_CONTENT_TYPE, contact_sheet_html
from flux_flows.reporting import summary_lines
from flux_flows.results import BatchReport
from flux_flows.storage import Storage


def write_contact_sheets(storage: Storage, run_id: str, report: BatchReport) -> str:
    """The run's page under runs/<id>/ and the latest-run copy at the root; returns the first.

    Each copy gets links relative to where it is stored, so both work on disk and in a bucket
    served as a static site.
    """
    summary = summary_lines(report)
    uris = []
    for page_key in (layout.run_contact_sheet_key(run_id), layout.CONTACT_SHEET):
        page = contact_sheet_html(
            report.records,
            href=relative_href(page_key),
            summary=summary,
            title=f"flux-flows run {run_id}",
            subtitle=report.destination,
            manifest_href=layout.MANIFEST,  # each page sits beside its manifest
        )
        uris.append(storage.put(page_key, page.encode("utf-8"), content_type=HTML_CONTENT_TYPE))
    return uris[0]
