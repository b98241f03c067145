"""Records of big runs without generating a single image: for paging and browser-load tests.

Each record points at real, tiny thumbnail and image files in the destination, so links resolve
and a browser decodes every picture; cards may share files, so 20,000 records need only a few.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from flux_flows.models import FinishReason, ImageRequest
from flux_flows.planning import layout
from flux_flows.records.reports import count_outcomes, summary_lines
from flux_flows.results import BatchReport, ImageRecord

ASPECTS = ["1:1", "16:9", "9:16", "3:2"]


def outcome(i: int) -> FinishReason:
    """A spread of outcomes across a run, every kind a few times in each thousand."""
    if i % 97 == 5:
        return FinishReason.ERROR
    if i % 89 == 7:
        return FinishReason.CONTENT_FILTERED
    if i % 211 == 13:
        return FinishReason.SKIPPED_BUDGET
    return FinishReason.SUCCESS


def _jpeg(size: tuple[int, int], i: int) -> bytes:
    out = io.BytesIO()
    colour = (i * 37 % 256, i * 91 % 256, i * 53 % 256)
    Image.new("RGB", size, colour).save(out, "JPEG", quality=80)
    return out.getvalue()


def synthetic_run(root: Path, count: int, *, files: int | None = None) -> list[ImageRecord]:
    """`count` records of a run into `root`; `files` distinct pictures (default: one per image).

    The prompts carry their position ("product photo 12:"), so a search finds one card.
    """
    (root / "thumbs").mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        request = ImageRequest(
            prompt=f"product photo {i}: a ceramic mug, walnut desk, morning light",
            seed=i + 1,
            aspect_ratio=ASPECTS[i % len(ASPECTS)],
        )
        reason = outcome(i)
        success = reason is FinishReason.SUCCESS
        name = request.cache_key if files is None else f"shared-{i % files}-{request.aspect_ratio}"
        name = name.replace(":", "x")
        thumb, image = root / "thumbs" / f"{name}.jpg", root / "images" / f"{name}.jpg"
        if success and not thumb.exists():
            width, height = request.size
            thumb.write_bytes(_jpeg((width // 4, height // 4), i))
            image.write_bytes(_jpeg((width // 16, height // 16), i))
        records.append(
            ImageRecord.for_request(
                request,
                index=i,
                variant=0,
                finish_reason=reason,
                uri=str(image) if success else None,
                thumbnail_uri=str(thumb) if success else None,
                error="InvalidRequestError: 400" if reason is FinishReason.ERROR else None,
                cached=i % 3 == 0,
                width=request.size[0],
                height=request.size[1],
            )
        )
    return records


def report_of(records: list[ImageRecord], destination: Path) -> BatchReport:
    return BatchReport(
        records=records,
        counts=count_outcomes(records),
        api_calls=len(records),
        cache_hits=sum(r.cached for r in records),
        manifest_uri=str(destination / layout.MANIFEST),
        destination=str(destination),
    )


def summary_of(records: list[ImageRecord], destination: Path) -> list[tuple[str, str]]:
    return summary_lines(report_of(records, destination))
