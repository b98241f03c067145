"""The public batch flows: prompts in; images, a manifest and artifacts out; nothing paid for twice.

Each flow only turns its parameters into prompt rows and `BatchOptions`; the run itself is
`batch_run.run_batch`, shared by all three. What their parameters do beyond their names:

- **Outcome.** The run's state message says how many images failed; `fail_on_error=True` makes
  failures fail the run.
- **Big lists.** A prompt list too big for a Prefect parameter (over ~256 KB of JSON) is written
  to `<destination>/runs/<stamp>-staged-<id>/prompts.jsonl` before the run starts, and the run
  reads it from `staged_prompts`.
- **Where images run.** On local threads, recorded in the manifest and artifacts rather than as
  one Prefect task run each (a task run cost ~4-7 ms of client CPU and ~10-30 ms of
  Prefect-server CPU in benchmarks/RESULTS.md's historical runs, whose raw output was not kept).
  Under any other task runner (`with_options(task_runner=DaskTaskRunner(...))`) the plan is cut
  into chunks of up to `chunk_size` images, one task run each, rendered on threads in the worker
  with a share of the batch's limits. `per_image_tasks=True` makes one task run per image
  instead (visible in the UI, slower).
- **Seeds.** `seed` is sent as is for each prompt's first image, its variants step from it
  (seed + 1, ...); `base_seed` derives the seeds from (base_seed, prompt, variant) instead; a
  prompt's own seed wins (README "Seeds").
- **Thumbnails.** `thumbnails=False` skips the contact sheet's 256 px thumbnails (~4 ms of CPU
  and one more PUT per image: `bench_batch.py --repeat 3` in benchmarks/RESULTS.md); the sheet
  then shows the full images.
- **Events.** When the batch ends it sends one `flux-flows.batch.completed` or `.failed`
  Prefect event and records the manifest as an asset, for triggers downstream
  (deployments/README.md); `events=False` sends neither.
- **Kontext edits.** `model="flux-kontext-pro"` or `"flux-kontext-max"` (batch-wide or per
  prompt) takes `safety_tolerance` (0 strict .. 6 permissive) and `prompt_upsampling`.
  `input_images` makes it an edit batch: a list of references (paths, `s3://` objects, URLs,
  data URIs), or a folder or `s3://bucket/prefix/` whose .jpg/.jpeg/.png/.webp files are used;
  every prompt is applied to every image. Each image is read once to hash its content, so a
  renamed copy of a photo is not paid for twice. A moderated Kontext task is CONTENT_FILTERED.
- **Tables.** `prompt_template` fills each row's prompt from its columns (`template_defaults`
  for empty ones); `keep_columns` carries columns into the manifest and S3 metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect import get_run_logger
from prefect.states import Completed

from flux_flows.batch_run import run_batch
from flux_flows.blocks import FireworksCredentials
from flux_flows.models import FinishReason, ImageRequest
from flux_flows.planning.sources import PromptRow, iter_prompts, normalize_prompts
from flux_flows.planning.templates import table_spec
from flux_flows.records.manifests import (
    destination_of_manifest,
    load_manifest,
)
from flux_flows.records.reports import count_outcomes
from flux_flows.rendering.flow_class import flux_flow
from flux_flows.results import BatchReport, ImageRecord
from flux_flows.settings import BATCH_DEFAULTS, DEFAULT_DESTINATION, BatchOptions

__all__ = [
    "generate_images",
    "generate_images_from_file",
    "replay_failed",
    "replay_rows",
]

D = BATCH_DEFAULTS  # the signatures' defaults, written once in settings.py


@flux_flow(name="generate-images", persist_result=False, log_prints=True)
def generate_images(
    prompts: list[str | dict[str, Any] | ImageRequest],
    destination: str = DEFAULT_DESTINATION,
    *,
    model: str = D.model,
    aspect_ratio: str = D.aspect_ratio,
    seed: int | None = D.seed,
    base_seed: int | None = D.base_seed,
    variants: int = D.variants,
    guidance_scale: float = D.guidance_scale,
    num_inference_steps: int | None = D.num_inference_steps,
    output_format: str = D.output_format,
    safety_check: bool = D.safety_check,
    max_concurrency: int = D.max_concurrency,
    requests_per_minute: float | None = D.requests_per_minute,
    credentials: FireworksCredentials | None = None,
    aws_credentials: Any = None,
    dry_run: bool = D.dry_run,
    budget_usd: float | None = D.budget_usd,
    prices: dict[str, float] | None = D.prices,
    spill_dir: str | None = D.spill_dir,
    concurrency_limit: str | None = D.concurrency_limit,
    rate_limit: str | None = D.rate_limit,
    fail_on_error: bool = D.fail_on_error,
    per_image_tasks: bool = D.per_image_tasks,
    thumbnails: bool = D.thumbnails,
    chunk_size: int = D.chunk_size,
    chunk_deployment: str | None = D.chunk_deployment,
    input_images: list[str] | str | None = D.input_images,
    safety_tolerance: int | None = D.safety_tolerance,
    prompt_upsampling: bool | None = D.prompt_upsampling,
    prompt_template: str | None = D.prompt_template,
    template_defaults: dict[str, str] | None = D.template_defaults,
    keep_columns: list[str] | None = D.keep_columns,
    events: bool = D.events,
    staged_prompts: str | None = None,
) -> BatchReport:
    """Generate an image per prompt (x `variants`) into `destination`, never paying twice.

    `prompts` are strings or dicts with a "prompt" and per-prompt overrides (any ImageRequest
    field, plus an "id" carried into the manifest). `destination` is `s3://bucket/prefix` or a
    local folder. Images already there are not generated again; identical requests are made
    once. Returns a BatchReport. Where images run, seeds, thumbnails, events, Kontext edits and
    lists too big for a parameter: this module's docstring.

    Example:
        ```python
        report = generate_images(["a red fox", "a blue whale"], "s3://assets/animals/", variants=2)
        print(report.counts, report.manifest_uri)
        ```
    """
    options = BatchOptions.from_params(locals())
    table = table_spec(prompt_template, template_defaults, keep_columns)
    if staged_prompts:  # a list too big for a flow-run parameter, written there by the caller
        get_run_logger().info("reading the prompt list staged at %s", staged_prompts)
        rows = iter_prompts(staged_prompts, aws_credentials=aws_credentials, table=table)
    else:
        rows = iter(normalize_prompts(prompts, table))  # let go of each row once it is planned
    return run_batch(rows, options)  # type: ignore[return-value]


@flux_flow(name="generate-images-from-file", persist_result=False, log_prints=True)
def generate_images_from_file(
    source: str,
    destination: str = DEFAULT_DESTINATION,
    *,
    model: str = D.model,
    aspect_ratio: str = D.aspect_ratio,
    seed: int | None = D.seed,
    base_seed: int | None = D.base_seed,
    variants: int = D.variants,
    guidance_scale: float = D.guidance_scale,
    num_inference_steps: int | None = D.num_inference_steps,
    output_format: str = D.output_format,
    safety_check: bool = D.safety_check,
    max_concurrency: int = D.max_concurrency,
    requests_per_minute: float | None = D.requests_per_minute,
    credentials: FireworksCredentials | None = None,
    aws_credentials: Any = None,
    dry_run: bool = D.dry_run,
    budget_usd: float | None = D.budget_usd,
    prices: dict[str, float] | None = D.prices,
    spill_dir: str | None = D.spill_dir,
    concurrency_limit: str | None = D.concurrency_limit,
    rate_limit: str | None = D.rate_limit,
    fail_on_error: bool = D.fail_on_error,
    per_image_tasks: bool = D.per_image_tasks,
    thumbnails: bool = D.thumbnails,
    chunk_size: int = D.chunk_size,
    chunk_deployment: str | None = D.chunk_deployment,
    input_images: list[str] | str | None = D.input_images,
    safety_tolerance: int | None = D.safety_tolerance,
    prompt_upsampling: bool | None = D.prompt_upsampling,
    prompt_template: str | None = D.prompt_template,
    template_defaults: dict[str, str] | None = D.template_defaults,
    keep_columns: list[str] | None = D.keep_columns,
    events: bool = D.events,
) -> BatchReport:
    """The batch, reading prompts from a file: local path or `s3://bucket/key`.

    `.txt`: one prompt a line (blank lines and `#` comments skipped). `.csv`: a `prompt` column and
    optional per-row `model`, `aspect_ratio`, `seed`, `guidance_scale`, `num_inference_steps`,
    `safety_check`, `output_format`, `id` (and for Kontext `input_image`, `safety_tolerance`,
    `prompt_upsampling`). `.jsonl`: one object a line with the same keys. `.parquet` (with
    `pip install 'flux-flows[parquet]'`): the same columns. `input_images` makes it an edit batch,
    as in `generate_images`. `prompt_template="studio photo of a {name} in {colour}"` makes each
    row's prompt from its columns (`template_defaults={"colour": "white"}` fills gaps), and
    `keep_columns=["sku"]` carries those columns into the manifest and the S3 metadata.

    Example:
        ```python
        generate_images_from_file("s3://prompts/2026-11-24.jsonl", "s3://assets/products/")
        ```
    """
    options = BatchOptions.from_params(locals())
    table = table_spec(prompt_template, template_defaults, keep_columns)
    rows = iter_prompts(source, aws_credentials=aws_credentials, table=table)
    return run_batch(rows, options, source=source)  # type: ignore[return-value]


def replay_rows(
    records: Sequence[ImageRecord], manifest_uri: str, *, include_skipped: bool
) -> list[PromptRow]:
    """The exact requests (seed and all) of the records that did not finish, as prompt rows."""
    wanted = (
        {FinishReason.ERROR, FinishReason.SKIPPED_BUDGET}
        if include_skipped
        else {FinishReason.ERROR}
    )
    rows = []
    for number, record in enumerate(records, start=1):
        if record.finish_reason in wanted:
            fields: dict[str, Any] = record.to_request().model_dump()
            if record.item_id is not None:
                fields["id"] = record.item_id
            where = f"{manifest_uri} line {number}"
            rows.append(
                PromptRow(fields, where, record.index, record.variant, columns=record.columns)
            )
    return rows


@flux_flow(name="replay-failed", persist_result=False, log_prints=True)
def replay_failed(
    manifest_uri: str,
    destination: str | None = None,
    *,
    include_skipped: bool = False,
    max_concurrency: int = D.max_concurrency,
    requests_per_minute: float | None = D.requests_per_minute,
    credentials: FireworksCredentials | None = None,
    aws_credentials: Any = None,
    budget_usd: float | None = D.budget_usd,
    prices: dict[str, float] | None = D.prices,
    spill_dir: str | None = D.spill_dir,
    concurrency_limit: str | None = D.concurrency_limit,
    rate_limit: str | None = D.rate_limit,
    fail_on_error: bool = D.fail_on_error,
    events: bool = D.events,
) -> BatchReport:
    """Re-submit exactly the ERROR (and, if asked, SKIPPED_BUDGET) records of an earlier manifest.

    Each request goes out with its original seed and parameters, so a success lands where the
    first run would have put it; a new manifest records the replay. `destination` defaults to
    the one the manifest was written into.

    With nothing to re-submit, no run is made: the report has `requested == 0`, no API calls,
    and `manifest_uri` is the manifest it read (still the record of every image).

    Example:
        ```python
        replay_failed("s3://assets/products/manifest.jsonl")
        ```
    """
    records = load_manifest(manifest_uri, aws_credentials=aws_credentials)
    rows = replay_rows(records, manifest_uri, include_skipped=include_skipped)
    target = destination or destination_of_manifest(manifest_uri)
    if not rows:
        get_run_logger().info("nothing to replay: %s has no failed records", manifest_uri)
        empty = BatchReport(
            records=[],
            counts=count_outcomes([]),
            api_calls=0,
            cache_hits=0,
            manifest_uri=manifest_uri,
            destination=target,
            requested=0,
        )
        return Completed(message="nothing to replay", data=empty)  # type: ignore[return-value]
    # The rows carry every request field of the original records; the batch defaults do not apply.
    # The destination's manifest stays the whole of the replayed one, with the new outcomes in.
    options = BatchOptions.from_params(
        {
            **locals(),
            "destination": target,
            "merge_into": manifest_uri,
            "prompt_template": next(
                (r.prompt_template for r in records if r.prompt_template), None
            ),
        }
    )
    return run_batch(rows, options)  # type: ignore[return-value]
