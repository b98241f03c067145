"""One HTML page: the document frame every page shares, and a page of cards with filters.

A page of cards is either a whole small run (index and page in one) or one page of a paged sheet,
which also carries a `PageNav` back to the index and to its neighbours. Filters and search work
within the page they are on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from flux_flows.gallery.assets import CSP, CSS, FALLBACK_JS, FILTER_JS
from flux_flows.gallery.cards import card_html, card_of, esc
from flux_flows.gallery.links import Href
from flux_flows.records.reports import count_outcomes
from flux_flows.results import ImageRecord

HTML_CONTENT_TYPE = "text/html; charset=utf-8"


@dataclass(frozen=True)
class Link:
    """A link and what it says, so the page escapes both in one place."""

    href: str
    label: str


@dataclass(frozen=True)
class PageNav:
    """How one page of a paged sheet reaches the index and the pages beside it."""

    index: Link
    position: str
    previous: Link | None = None
    next: Link | None = None

    def html(self) -> str:
        links = [f'<a href="{esc(self.index.href)}">{esc(self.index.label)}</a>']
        if self.previous:
            links.append(f'<a href="{esc(self.previous.href)}">‹ {esc(self.previous.label)}</a>')
        links.append(f'<span class="here">{esc(self.position)}</span>')
        if self.next:
            links.append(f'<a href="{esc(self.next.href)}">{esc(self.next.label)} ›</a>')
        return f'<nav class="pager">{"".join(links)}</nav>'


def document(*, title: str, csp: str, body: str, head_script: str | None = None) -> str:
    """The frame of every page: the CSP first, then the page's one stylesheet."""
    script = f"<script>{head_script}</script>" if head_script is not None else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(csp)}">'
        '<meta name="referrer" content="no-referrer">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="generator" content="flux-flows">'
        f"<title>{esc(title)}</title><style>{CSS}</style>{script}"
        f"</head><body>{body}</body></html>\n"
    )


def header(
    *,
    title: str,
    subtitle: str,
    summary: Iterable[tuple[str, str]] = (),
    notes: Iterable[str] = (),
    manifest_href: str | None = None,
    nav: PageNav | None = None,
) -> str:
    """The top of every page, index or cards: what run this is, where it is, how to move on."""
    summary_items = "".join(f"<li><b>{esc(k)}:</b> {esc(v)}</li>" for k, v in summary)
    summary_list = f'<ul class="summary">{summary_items}</ul>' if summary_items else ""
    note_items = "".join(f'<p class="note">{esc(note)}</p>' for note in notes)
    manifest = (
        f' · <a href="{esc(manifest_href)}">manifest.jsonl</a>' if manifest_href is not None else ""
    )
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f'<header><h1>{esc(title)}</h1><p class="where">{esc(subtitle)}{manifest} · made {made}</p>'
        f"{nav.html() if nav else ''}{summary_list}{note_items}</header>"
    )


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
    nav: PageNav | None = None,
) -> str:
    """A page of cards as one string, cards in the order given, with filters and search.

    `href` turns an object key into a link; it decides whether the page links relatively,
    to local files or through signed URLs. Callers keep `records` to one page (`PAGE_SIZE`).
    """
    cards = "".join(card_html(card_of(record, href)) for record in records)
    total = len(records)
    body = (
        header(
            title=title,
            subtitle=subtitle,
            summary=summary,
            notes=notes,
            manifest_href=manifest_href,
            nav=nav,
        )
        + f'<div class="controls">{_filters(records)}'
        '<input type="search" id="search" placeholder="Search prompt, seed, model, error…" '
        'aria-label="Search" autocomplete="off">'
        f'<span class="count">showing <span id="shown">{total}</span> of {total}</span></div>'
        f'<main id="cards">{cards}</main>'
        '<p id="empty" class="empty" hidden>No image matches the filters.</p>'
        f"<script>{FILTER_JS}</script>"
    )
    return document(title=title, csp=CSP, body=body, head_script=FALLBACK_JS)
