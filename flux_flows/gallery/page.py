"""A whole contact sheet page: header with the summary, filters, search and the cards."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from flux_flows.gallery.assets import CSP, CSS, FALLBACK_JS, FILTER_JS
from flux_flows.gallery.cards import card_html, card_of, esc
from flux_flows.gallery.links import Href
from flux_flows.reporting import count_outcomes
from flux_flows.results import ImageRecord

HTML_CONTENT_TYPE = "text/html; charset=utf-8"


def _filters(records: Sequence[ImageRecord]) -> str:
    counts = count_outcomes(records)
    boxes = "".join(
        f'<label><input type="checkbox" name="reason" value="{esc(reason)}" checked> '
        f"{esc(reason)} ({count})</label>"
        for reason, count in counts.items()
        if count
    )
    return f"<fieldset><legend>Finish reason</legend>{boxes}</fieldset>"


def contact_sheet_html(
    records: Sequence[ImageRecord],
    *,
    href: Href,
    summary: Iterable[tuple[str, str]],
    title: str,
    subtitle: str = "",
    notes: Iterable[str] = (),
    manifest_href: str | None = None,
) -> str:
    """The whole page as one string: cards in manifest order, summary, filters, search.

    `href` turns an object key into a link; it decides whether the page links relatively,
    to local files or through signed URLs.
    """
    cards = "".join(card_html(card_of(record, href)) for record in records)
    summary_items = "".join(f"<li><b>{esc(k)}:</b> {esc(v)}</li>" for k, v in summary)
    note_items = "".join(f'<p class="note">{esc(note)}</p>' for note in notes)
    manifest = (
        f' · <a href="{esc(manifest_href)}">manifest.jsonl</a>' if manifest_href is not None else ""
    )
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    total = len(records)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">'
        '<meta name="referrer" content="no-referrer">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="generator" content="flux-flows">'
        f"<title>{esc(title)}</title><style>{CSS}</style><script>{FALLBACK_JS}</script>"
        "</head><body>"
        f'<header><h1>{esc(title)}</h1><p class="where">{esc(subtitle)}{manifest} · made {made}</p>'
        f'<ul class="summary">{summary_items}</ul>{note_items}</header>'
        f'<div class="controls">{_filters(records)}'
        '<input type="search" id="search" placeholder="Search prompt, seed, model, error…" '
        'aria-label="Search" autocomplete="off">'
        f'<span class="count">showing <span id="shown">{total}</span> of {total}</span></div>'
        f'<main id="cards">{cards}</main>'
        '<p id="empty" class="empty" hidden>No image matches the filters.</p>'
        f"<script>{FILTER_JS}</script></body></html>\n"
    )
