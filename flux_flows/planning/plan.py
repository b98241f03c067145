"""Planning a batch before any money is spent: expand prompts into requests, find what is done.

Everything here is pure or read-only, so `dry_run=True` and `flux-flows plan` share it with the
real run: the plan a user sees is the plan that runs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from flux_flows.inputs.images import (
    describe_reference,
    hash_input_images,
    list_input_images,
    normalize_reference,
)
from flux_flows.models import (
    SCHNELL,
    FinishReason,
    ImageRequest,
    describe_validation_error,
    is_kontext,
    request_for,
)
from flux_flows.planning import layout
from flux_flows.planning.cost import estimate_cost, price_table
from flux_flows.planning.sources import PromptRow
from flux_flows.settings import BatchSettings
from flux_flows.storage import Storage

MAX_LISTED_PROBLEMS = 20


_REQUEST_FIELDS = tuple(ImageRequest.model_fields)
_FIELDS_SETS: dict[frozenset[str], frozenset[str]] = {}  # a handful of distinct ones, shared


@dataclass(frozen=True, slots=True)
class PlannedImage:
    """One requested image: which prompt row, which variant, the exact request.

    A run holds one per image from planning to its manifest, so it keeps the validated
    request's field values in a tuple and its cache key, computed once: ~0.3 KB instead of a
    pydantic model's ~1.4 KB (`benchmarks/bench_sizes.py`, benchmarks/RESULTS.md). `request`
    rebuilds the model, without validating again, in ~5 us.
    """

    index: int
    variant: int
    cache_key: str
    item_id: str | None
    values: tuple[Any, ...] = field(repr=False)
    fields_set: frozenset[str] = field(repr=False)
    # The row's kept columns (`planning.templates`), one dict shared by its variants.
    columns: dict[str, str] | None = field(default=None, compare=False)

    @classmethod
    def of(
        cls,
        index: int,
        variant: int,
        request: ImageRequest,
        item_id: str | None = None,
        columns: dict[str, str] | None = None,
    ) -> PlannedImage:
        given = frozenset(request.model_fields_set)
        return cls(
            index,
            variant,
            request.cache_key,
            item_id,
            tuple(getattr(request, name) for name in _REQUEST_FIELDS),
            _FIELDS_SETS.setdefault(given, given),
            columns,
        )

    @property
    def request(self) -> ImageRequest:
        fields = dict(zip(_REQUEST_FIELDS, self.values, strict=True))
        return ImageRequest.model_construct(set(self.fields_set), **fields)


@dataclass(frozen=True)
class StoredImage:
    object_key: str
    finish_reason: FinishReason


@dataclass
class BatchPlan:
    """What a run will do: every image, which are stored already, which to generate, at what cost."""

    images: list[PlannedImage]
    unique: dict[str, PlannedImage]  # each distinct request's first planned image
    stored: dict[str, StoredImage]
    to_generate: list[str]
    skipped_for_budget: list[str] = field(default_factory=list)
    cost_by_key: dict[str, float] = field(default_factory=dict)
    prompt_template: str | None = None  # recorded beside each rendered prompt

    @property
    def estimated_cost_usd(self) -> float:
        return sum(self.cost_by_key[k] for k in self.to_generate)

    @property
    def saved_usd(self) -> float:
        """What the cache saves: stored images plus duplicates inside the batch, at list price."""
        return sum(self.cost_by_key[p.cache_key] for p in self.images) - sum(
            self.cost_by_key[k] for k in self.to_generate + self.skipped_for_budget
        )


_Pair = tuple[int, int, str, dict[str, str] | None, dict[str, Any]]


def _edit_pairs(rows: Iterable[PromptRow], input_images: Sequence[str] | None) -> list[_Pair]:
    """(prompt index, first variant, where, kept columns, fields): one per prompt, or one per
    (prompt, image) in an edit batch. A replayed record keeps its index and variant (its seed is
    explicit).

    A row that names its own `input_image` keeps it and is not crossed with the batch's images.
    """
    pairs: list[_Pair] = []
    for position, row in enumerate(rows):
        index = position if row.index is None else row.index
        variant = row.variant or 0
        if input_images and row.fields.get("input_image") is None:
            for ref in input_images:
                where = f"{row.where} with input image {describe_reference(ref)}"
                pairs.append(
                    (index, variant, where, row.columns, {**row.fields, "input_image": ref})
                )
        else:
            pairs.append((index, variant, row.where, row.columns, dict(row.fields)))
    return pairs


def _fill_input_hashes(
    pairs: list[_Pair],
    defaults: Mapping[str, Any],
    aws_credentials: Any,
) -> None:
    """Hash each distinct input image once (S3, URL, file or data URI) and put the digest in the
    fields, so the cache key depends on the image's content and no file is read per request.

    Only Kontext requests are hashed: any other request with an input image is refused by
    validation anyway, and reading a thousand photos to say so would waste minutes.
    """
    wanted: dict[str, str] = {}
    for *_, fields in pairs:
        ref = fields.get("input_image")
        model = fields.get("model") or defaults.get("model") or SCHNELL
        if not isinstance(ref, str) or fields.get("input_image_sha256") or not is_kontext(model):
            continue
        try:
            wanted[ref] = normalize_reference(ref)
        except ValueError:
            continue  # validation names the bad reference, with where it came from
    hashes = hash_input_images(dict.fromkeys(wanted.values()), aws_credentials)
    for *_, fields in pairs:
        ref = fields.get("input_image")
        if isinstance(ref, str) and ref in wanted and not fields.get("input_image_sha256"):
            fields["input_image_sha256"] = hashes[wanted[ref]]


def expand(
    rows: Iterable[PromptRow],
    *,
    defaults: Mapping[str, Any],
    variants: int,
    seed: int | None = None,
    base_seed: int | None = None,
    input_images: Sequence[str] | None = None,
    aws_credentials: Any = None,
) -> list[PlannedImage]:
    """Validate every row x variant up front; all problems are reported at once, with where.

    Seeds follow the one rule of `flux_flows.seeds`: a row's own seed, else `seed`, is sent as
    is for variant 0 and steps by one per variant; without one, seeds are derived from
    (`base_seed`, prompt, variant).
    With `input_images` (a FLUX Kontext edit batch) every prompt is paired with every image.
    Input images are read here, once each, to hash their content (`aws_credentials` for S3).
    """
    if variants < 1:
        raise ValueError(f"variants must be at least 1, got {variants}")
    pairs = _edit_pairs(rows, input_images)
    _fill_input_hashes(pairs, defaults, aws_credentials)
    images: list[PlannedImage] = []
    problems: list[str] = []
    for index, first_variant, where, columns, fields in pairs:
        item_id = fields.get("id")
        for variant in range(variants):
            try:
                request = request_for(
                    fields, defaults=defaults, seed=seed, base_seed=base_seed, variant=variant
                )
            except ValidationError as exc:
                problems.append(f"{where}: {describe_validation_error(exc)}")
                break
            label = variant + first_variant
            item = None if item_id is None else str(item_id)
            images.append(PlannedImage.of(index, label, request, item, columns))
    if problems:
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(shown)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise ValueError(
            f"{len(problems)} invalid prompt(s), nothing was generated:\n  "
            + "\n  ".join(shown)
            + tail
        )
    if not images:
        raise ValueError("no prompts to generate: the prompt list is empty")
    return images


def find_stored(storage: Storage) -> dict[str, StoredImage]:
    """What the destination already holds, by cache key: two listings, not one HEAD per image."""
    stored: dict[str, StoredImage] = {}
    for prefix, finish in (
        (layout.FILTERED, FinishReason.CONTENT_FILTERED),
        (layout.IMAGES, FinishReason.SUCCESS),
    ):
        for cache_key, object_key in layout.keys_by_cache_key(storage.list_keys(prefix)).items():
            stored[cache_key] = StoredImage(object_key, finish)
    return stored


class BudgetGate:
    """The budget rule, one distinct missing image at a time, in plan order: generate while the
    estimate stays within budget; after the first image that would pass it, skip the rest, so a
    re-run with a bigger budget carries on where this one stopped."""

    def __init__(self, budget_usd: float | None) -> None:
        if budget_usd is not None and budget_usd < 0:
            raise ValueError(f"budget_usd must not be negative, got {budget_usd}")
        self.budget_usd = budget_usd
        self.spent = 0.0
        self.closed = False

    def admit(self, cost: float) -> bool:
        if self.budget_usd is None or (
            not self.closed and self.spent + cost <= self.budget_usd + 1e-12
        ):
            self.spent += cost
            return True
        self.closed = True
        return False


def plan_batch(
    images: list[PlannedImage],
    stored: Mapping[str, StoredImage],
    *,
    prices: Mapping[str, float],
    budget_usd: float | None = None,
) -> BatchPlan:
    """Decide what to generate: each distinct missing request once, in order, within budget."""
    unique: dict[str, PlannedImage] = {}
    for planned in images:
        unique.setdefault(planned.cache_key, planned)
    cost = {key: estimate_cost(planned.request, prices) for key, planned in unique.items()}
    gate = BudgetGate(budget_usd)
    to_generate: list[str] = []
    skipped: list[str] = []
    for key in (key for key in unique if key not in stored):
        (to_generate if gate.admit(cost[key]) else skipped).append(key)
    return BatchPlan(
        images=images,
        unique=unique,
        stored=dict(stored),
        to_generate=to_generate,
        skipped_for_budget=skipped,
        cost_by_key=cost,
    )


def plan_images(
    rows: Iterable[PromptRow], settings: BatchSettings, aws_credentials: Any = None
) -> list[PlannedImage]:
    """`expand` with a batch's settings: request defaults, seed, variants, input images."""
    return expand(
        rows,
        defaults=settings.as_defaults(),
        seed=settings.seed,
        base_seed=settings.base_seed,
        variants=settings.variants,
        input_images=None
        if settings.input_images is None
        else list_input_images(settings.input_images, aws_credentials=aws_credentials),
        aws_credentials=aws_credentials,
    )


def plan_run(
    rows: Iterable[PromptRow],
    settings: BatchSettings,
    storage: Storage,
    *,
    aws_credentials: Any = None,
    preflight: Callable[[], None] | None = None,
) -> BatchPlan:
    """The plan a run makes and `flux-flows plan` shows: the same function, so they agree.

    Prompts are validated first (bad input costs nothing to find); `preflight` runs on the
    opened destination before its listing, for the checks only a real run needs.
    """
    images = plan_images(rows, settings, aws_credentials)
    if preflight is not None:
        preflight()
    plan = plan_batch(
        images,
        find_stored(storage),
        prices=price_table(settings.prices),
        budget_usd=settings.budget_usd,
    )
    plan.prompt_template = settings.prompt_template
    return plan


@dataclass
class PlanSummary:
    """What `flux-flows plan` shows: the figures of `plan_run`, without holding the plan."""

    requested: int = 0
    distinct: int = 0
    stored: int = 0
    to_generate: int = 0
    skipped_for_budget: int = 0
    estimated_cost_usd: float = 0.0
    saved_usd: float = 0.0


def summarize_plan(
    rows: Iterable[PromptRow],
    settings: BatchSettings,
    storage: Storage,
    *,
    aws_credentials: Any = None,
    batch_rows: int = 10_000,
) -> PlanSummary:
    """The plan of a prompt file of any length, in slices of `batch_rows`: each slice is
    expanded (validated, seeded) as a run would, folded into the figures and let go, so a
    million rows need the memory of their distinct keys, not of a million requests."""
    if isinstance(settings.input_images, str):  # a folder or prefix: list it once, not per slice
        listed = list_input_images(settings.input_images, aws_credentials=aws_credentials)
        settings = settings.model_copy(update={"input_images": listed})
    stored = find_stored(storage)
    prices = price_table(settings.prices)
    gate = BudgetGate(settings.budget_usd)
    summary, seen, list_price = PlanSummary(), set[str](), 0.0
    remaining = iter(rows)
    while chunk := list(itertools.islice(remaining, batch_rows)):
        for planned in plan_images(chunk, settings, aws_credentials):
            key, cost = planned.cache_key, estimate_cost(planned.request, prices)
            summary.requested += 1
            list_price += cost
            if key in seen:
                continue
            seen.add(key)
            if key in stored:
                summary.stored += 1
            elif gate.admit(cost):
                summary.to_generate += 1
            else:
                summary.skipped_for_budget += 1
                list_price -= cost  # not generated, so not saved either
    if not summary.requested:
        raise ValueError("no prompts to generate: the prompt list is empty")
    summary.distinct = len(seen)
    summary.estimated_cost_usd = gate.spent
    summary.saved_usd = list_price - gate.spent
    return summary
