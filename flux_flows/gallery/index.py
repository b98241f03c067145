"""The index of a paged contact sheet: the run's summary and a link to every page.

It is the page people are sent to (the CLI and the summary artifact print its location), so it
says what a run holds at a glance: counts by finish reason, failures first, and for each page
what it holds and which manifest indexes, so a failure reported by index is one click away.
It has no cards, images or scripts, and its CSP allows none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import groupby

from flux_flows.gallery.assets import INDEX_CSP
from flux_flows.gallery.cards import esc
from flux_flows.gallery.page import document, header
from flux_flows.gallery.paging import GROUP_TITLES, PagePlan
from flux_flows.results import ImageRecord


@dataclass(frozen=True)
class SheetText:
    """What the header of a sheet says; every page of a paged sheet repeats title and notes."""

    title: str
    subtitle: str = ""
    summary: Sequence[tuple[str, str]] = ()
    notes: Sequence[str] = ()
    manifest_href: str | None = None  # from the index (or single page), None for no link


@dataclass(frozen=True)
class PageEntry:
    """A written page as the index lists it."""

    plan: PagePlan
    lowest_index: int
    highest_index: int

    @classmethod
    def of(cls, plan: PagePlan, records: Sequence[ImageRecord]) -> PageEntry:
        indexes = [record.index for record in records]
        return cls(plan, min(indexes), max(indexes))

    @property
    def holds(self) -> str:
        cards = f"{self.plan.size:,} card{'s' if self.plan.size != 1 else ''}"
        if self.lowest_index == self.highest_index:
            return f"{cards} · manifest index {self.lowest_index:,}"
        return f"{cards} · manifest index {self.lowest_index:,}–{self.highest_index:,}"


@dataclass(frozen=True)
class _Group:
    title: str
    reason: str
    entries: list[PageEntry] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(entry.plan.size for entry in self.entries)


def _groups(entries: Iterable[PageEntry]) -> list[_Group]:
    """Pages by finish reason, in reading order (the order of the entries)."""
    return [
        _Group(GROUP_TITLES[reason], reason.value, list(pages))
        for reason, pages in groupby(entries, key=lambda entry: entry.plan.reason)
    ]


def index_html(entries: Sequence[PageEntry], *, link: Callable[[str], str], text: SheetText) -> str:
    """The index page; `link` turns a page's key into a link from where the index is stored."""
    groups = _groups(entries)
    total = sum(group.count for group in groups)
    where = ", ".join(f"{group.reason} {group.count:,}" for group in groups)
    sections = "".join(
        f'<section class="g-{esc(group.reason)}">'
        f"<h2>{esc(group.title)}: {group.count:,}</h2><ol>"
        + "".join(
            f'<li><a href="{esc(link(entry.plan.key))}">{esc(entry.plan.label)}</a> '
            f'<span class="meta">{esc(entry.holds)}</span></li>'
            for entry in group.entries
        )
        + "</ol></section>"
        for group in groups
    )
    lead = (
        f"{total:,} images on {len(entries):,} pages of at most {_largest(entries):,} cards "
        f"({where}). Failures and filtered images come first; filters and search work "
        "within a page."
    )
    body = (
        header(
            title=text.title,
            subtitle=text.subtitle,
            summary=text.summary,
            notes=text.notes,
            manifest_href=text.manifest_href,
        )
        + f'<main class="index"><p class="meta">{esc(lead)}</p>{sections}</main>'
    )
    return document(title=text.title, csp=INDEX_CSP, body=body)


def _largest(entries: Sequence[PageEntry]) -> int:
    return max((entry.plan.size for entry in entries), default=0)
