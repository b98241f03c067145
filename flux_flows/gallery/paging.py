"""Cutting a run's records into pages of at most 1,000 cards, in one pass.

A 20,000-image run on one page was 17.5 MB, too much for a browser to open comfortably. Pages
hold one finish reason each, in `OUTCOME_ORDER`: failures first, because a person opening a big
run's sheet is usually looking for what went wrong; the images keep manifest order.

The plan comes from the counts alone, so every page's name, neighbours and "page 3 of 23" are
known before a record is read. The records are then read once, as a stream, holding at most one
page of records per finish reason: a manifest can be streamed from a file into pages.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from flux_flows.models import FinishReason
from flux_flows.records.reports import OUTCOME_ORDER
from flux_flows.results import ImageRecord

PAGE_SIZE = 1_000
PAGES_FOLDER = "contact-sheet"

# File names and headings of each finish reason's pages; the file names read well in a listing.
PAGE_NAMES: dict[FinishReason, str] = {
    FinishReason.ERROR: "failed",
    FinishReason.CONTENT_FILTERED: "filtered",
    FinishReason.SKIPPED_BUDGET: "skipped",
    FinishReason.PLANNED: "planned",
    FinishReason.SUCCESS: "images",
}
GROUP_TITLES: dict[FinishReason, str] = {
    FinishReason.ERROR: "Failed (ERROR)",
    FinishReason.CONTENT_FILTERED: "Content filtered",
    FinishReason.SKIPPED_BUDGET: "Skipped: over budget",
    FinishReason.PLANNED: "Planned",
    FinishReason.SUCCESS: "Images",
}


@dataclass(frozen=True)
class PagePlan:
    """One page: where it is stored and which of its finish reason's records it holds."""

    key: str
    reason: FinishReason
    number: int  # among the pages of its finish reason, from 1
    first: int  # position of its first record among the records of its finish reason, from 1
    last: int

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    @property
    def label(self) -> str:
        """What the page holds, e.g. "Images 1,001–2,000", as the index and neighbours say it."""
        title = GROUP_TITLES[self.reason]
        if self.first == self.last:
            return f"{title} {self.first:,}"
        return f"{title} {self.first:,}–{self.last:,}"


def pages_folder(index_key: str) -> str:
    """The folder beside the index that holds its pages: runs/<id>/contact-sheet/."""
    return posixpath.join(posixpath.dirname(index_key), PAGES_FOLDER) + "/"


def plan_pages(
    counts: Mapping[str, int], index_key: str, page_size: int = PAGE_SIZE
) -> list[PagePlan]:
    """Every page of a sheet in reading order, from the counts by finish reason alone."""
    if page_size < 1:
        raise ValueError(f"page_size must be at least 1, got {page_size}")
    folder = pages_folder(index_key)
    plans = []
    for reason in OUTCOME_ORDER:
        count = counts.get(reason.value, 0)
        for number, first in enumerate(range(1, count + 1, page_size), start=1):
            plans.append(
                PagePlan(
                    key=f"{folder}{PAGE_NAMES[reason]}-{number}.html",
                    reason=reason,
                    number=number,
                    first=first,
                    last=min(first + page_size - 1, count),
                )
            )
    return plans


def paginate(
    records: Iterable[ImageRecord], plans: Iterable[PagePlan]
) -> Iterator[tuple[PagePlan, list[ImageRecord]]]:
    """Each planned page with its records, as soon as it is full.

    Pages come out in the order they fill, not in reading order. Records that disagree with the
    counts the plan was made from raise ValueError rather than make a sheet that hides some.
    """
    waiting: dict[FinishReason, list[PagePlan]] = {}
    for plan in plans:
        waiting.setdefault(plan.reason, []).append(plan)
    filling: dict[FinishReason, list[ImageRecord]] = {}
    for record in records:
        reason = record.finish_reason
        queue = waiting.get(reason)
        if not queue:
            raise ValueError(f"more {reason.value} records than the counts said")
        page = filling.setdefault(reason, [])
        page.append(record)
        if len(page) == queue[0].size:
            yield queue.pop(0), page
            filling[reason] = []
    short = [plan.reason.value for queue in waiting.values() for plan in queue[:1]]
    if short:
        raise ValueError(f"fewer {', '.join(short)} records than the counts said")
