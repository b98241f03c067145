"""Writing one contact sheet into a store: a single page for a small run, else index and pages.

A run of up to `PAGE_SIZE` images keeps one page (index and cards together), which reads best
and is what links to a small run have always opened. A bigger run gets an index at the same
place and pages in a folder beside it (`contact-sheet/failed-1.html`, `images-1.html`, ...);
pages are rendered and stored one at a time, so at most one page's HTML is in memory.

Every page's links to images are made for where that page is stored (`href_for(page_key)`), so
the same code serves relative links in a destination, local file links and signed URLs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from flux_flows.gallery.index import PageEntry, SheetText, index_html
from flux_flows.gallery.links import Href, relative_link
from flux_flows.gallery.page import HTML_CONTENT_TYPE, Link, PageNav, contact_sheet_html
from flux_flows.gallery.paging import PAGE_SIZE, PagePlan, paginate, plan_pages
from flux_flows.results import ImageRecord
from flux_flows.storage import Storage


@dataclass(frozen=True)
class WrittenSheet:
    """Where each index copy went (in the order asked for) and how many pages of cards it has."""

    uris: list[str]
    pages: int


def write_sheet(
    store: Storage,
    index_keys: Sequence[str],
    records: Iterable[ImageRecord],
    counts: Mapping[str, int],
    *,
    href_for: Callable[[str], Href],
    text: SheetText,
    page_size: int = PAGE_SIZE,
) -> WrittenSheet:
    """Store a sheet of `records` with its index at each of `index_keys`.

    `counts` (by finish reason, as `count_outcomes` gives) must describe `records`: the pages
    are planned from them before the records are read, once. The pages of a paged sheet are
    stored once, beside the first index key; every index copy links to them.
    """
    if not index_keys:
        raise ValueError("a sheet needs at least one index key")
    if sum(counts.values()) <= page_size:
        return _write_single_page(store, index_keys, list(records), href_for=href_for, text=text)
    plans = plan_pages(counts, index_keys[0], page_size)
    entries: dict[str, PageEntry] = {}
    for plan, page in paginate(records, plans):
        body = contact_sheet_html(
            page,
            href=href_for(plan.key),
            summary=(),
            title=f"{text.title} · {plan.label}",
            subtitle=text.subtitle,
            notes=text.notes,
            nav=_nav(plans, plan, index_keys[0]),
        )
        _put(store, plan.key, body)
        entries[plan.key] = PageEntry.of(plan, page)
    in_order = [entries[plan.key] for plan in plans]
    uris = [
        _put(store, key, index_html(in_order, link=_links_from(key), text=text))
        for key in index_keys
    ]
    return WrittenSheet(uris, len(plans))


def _write_single_page(
    store: Storage,
    index_keys: Sequence[str],
    records: Sequence[ImageRecord],
    *,
    href_for: Callable[[str], Href],
    text: SheetText,
) -> WrittenSheet:
    """Today's one page, in manifest order, stored at every index key."""
    uris = [
        _put(
            store,
            key,
            contact_sheet_html(
                records,
                href=href_for(key),
                summary=text.summary,
                title=text.title,
                subtitle=text.subtitle,
                notes=text.notes,
                manifest_href=text.manifest_href,
            ),
        )
        for key in index_keys
    ]
    return WrittenSheet(uris, 1)


def _nav(plans: Sequence[PagePlan], plan: PagePlan, index_key: str) -> PageNav:
    """Back to the run's own index (not the latest-run copy, which a later run replaces)."""
    at = plans.index(plan)

    def link(other: PagePlan) -> Link:
        return Link(relative_link(plan.key, other.key), other.label)

    return PageNav(
        index=Link(relative_link(plan.key, index_key), "All pages"),
        position=f"page {at + 1:,} of {len(plans):,}",
        previous=link(plans[at - 1]) if at > 0 else None,
        next=link(plans[at + 1]) if at + 1 < len(plans) else None,
    )


def _links_from(index_key: str) -> Callable[[str], str]:
    return lambda key: relative_link(index_key, key)


def _put(store: Storage, key: str, page: str) -> str:
    return store.put(key, page.encode("utf-8"), content_type=HTML_CONTENT_TYPE)
