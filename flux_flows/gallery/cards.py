"""One card per record: its picture (thumbnail, full image or a placeholder), prompt and facts.

Every prompt, error and id is untrusted user text: everything goes through `esc`, and the JS
reads only `data-` attributes and text. Thumbnails (~5 KB) with `loading="lazy"` stand in for
images so a page of 1,000 cards loads fast.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

from flux_flows.gallery.links import Href, object_key_of
from flux_flows.models import FinishReason
from flux_flows.rendering.thumbnails import thumbnail_size
from flux_flows.results import ImageRecord

PLACEHOLDER_LABELS = {
    FinishReason.CONTENT_FILTERED: "Content filtered",
    FinishReason.ERROR: "Failed",
    FinishReason.SKIPPED_BUDGET: "Skipped: over budget",
    FinishReason.PLANNED: "Planned",
}


_BIDI_CONTROLS = re.compile(r"[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def esc(value: object) -> str:
    """Escape for text and for double-quoted attribute values alike.

    Bidi controls are shown as `<U+202E>`, not obeyed: a right-to-left override in a prompt would
    otherwise make the page display text the prompt does not contain ("gpj.exe" as "exe.jpg").
    """
    text = _BIDI_CONTROLS.sub(lambda m: f"<U+{ord(m.group()):04X}>", str(value))
    return html.escape(text, quote=True)


@dataclass(frozen=True)
class Card:
    """A record and the links its picture uses, decided once so the HTML is plain formatting."""

    record: ImageRecord
    src: str | None
    full: str | None


def card_of(record: ImageRecord, href: Href) -> Card:
    """Where a card's picture comes from: the thumbnail, else the full image, else nothing.

    Only SUCCESS records are ever shown as pictures; everything else is a placeholder.
    """
    if record.finish_reason is not FinishReason.SUCCESS:
        return Card(record, None, None)
    image_key = object_key_of(record.uri)
    thumb_key = object_key_of(record.thumbnail_uri)
    full = href(image_key) if image_key else None
    thumb = href(thumb_key) if thumb_key else None
    return Card(record, thumb or full, full)


def _picture(card: Card) -> str:
    record = card.record
    if card.src is None:
        return _placeholder(record)
    width, height = thumbnail_size(record.width or 1024, record.height or 1024)
    fallback = f' data-full="{esc(card.full)}"' if card.full and card.full != card.src else ""
    image = (
        f'<img src="{esc(card.src)}"{fallback} alt="{esc(_alt(record.prompt))}" '
        f'width="{width}" height="{height}" loading="lazy" decoding="async">'
    )
    if card.full:
        return f'<a class="thumb" href="{esc(card.full)}">{image}</a>'
    return f'<div class="thumb">{image}</div>'


def _placeholder(record: ImageRecord) -> str:
    label = PLACEHOLDER_LABELS.get(record.finish_reason)
    if label is None:  # a SUCCESS without a stored image: the upload failed, bytes kept locally
        label = "Not uploaded" if record.spill_path else "No preview"
    why = record.error or ""
    if record.spill_path:
        why = f"{why} ({record.spill_path})".strip()
    detail = f'<span class="why">{esc(why)}</span>' if why else ""
    return f'<div class="thumb placeholder"><span class="label">{esc(label)}</span>{detail}</div>'


def _alt(prompt: str, limit: int = 120) -> str:
    text = " ".join(prompt.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _facts(record: ImageRecord) -> str:
    facts = [
        ("seed", record.seed),
        ("model", record.model),
        ("aspect", record.aspect_ratio),
        ("finish", record.finish_reason.value),
    ]
    if record.item_id is not None:
        facts.append(("id", record.item_id))
    if record.input_image:
        facts.append(("edits", _input_name(record.input_image)))
    return "".join(f"<dt>{esc(name)}</dt><dd>{esc(value)}</dd>" for name, value in facts)


def _input_name(reference: str) -> str:
    """What a person recognises of a Kontext edit's input: its file name, not a whole data URI."""
    if reference.startswith("data:"):
        return "an inline image (data URI)"
    return reference.rstrip("/").rsplit("/", 1)[-1] or reference


def _badges(record: ImageRecord) -> str:
    reason = record.finish_reason.value
    badges = [(f"b-{reason}", reason)]
    if record.finish_reason in (FinishReason.SUCCESS, FinishReason.CONTENT_FILTERED):
        badges.append(("b-cached", "cached") if record.cached else ("b-new", "new"))
    return "".join(f'<span class="badge {esc(cls)}">{esc(text)}</span>' for cls, text in badges)


def card_html(card: Card) -> str:
    record = card.record
    reason = record.finish_reason.value
    stored = record.finish_reason is not FinishReason.SUCCESS or card.src is not None
    classes = f"card r-{reason}" + ("" if stored else " nostore")
    return (
        f'<article class="{esc(classes)}" data-reason="{esc(reason)}" '
        f'data-cached="{"true" if record.cached else "false"}" data-cache-key="{esc(record.cache_key)}">'
        f"{_picture(card)}"
        f'<div class="body"><p class="prompt">{esc(record.prompt)}</p>'
        f'<dl class="facts">{_facts(record)}</dl>'
        f'<div class="badges">{_badges(record)}</div></div></article>'
    )
