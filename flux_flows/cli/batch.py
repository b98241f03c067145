"""`run`, `plan`, `replay` and `demo`: the batch commands, and how they report a run."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError

from flux_flows.cli._common import (
    AspectOpt,
    BaseSeedOpt,
    BaseUrlOpt,
    BudgetOpt,
    ConcurrencyOpt,
    DestOpt,
    EditOpt,
    EventsOpt,
    ExitCode,
    GuidanceOpt,
    ModelOpt,
    PromptFileArg,
    PromptOpt,
    RpmOpt,
    SafetyOpt,
    SafetyToleranceOpt,
    SeedOpt,
    StepsOpt,
    ThumbnailsOpt,
    UpsamplingOpt,
    VariantsOpt,
    VerboseOpt,
    as_fields,
    check_destination,
    check_prompt_source,
    console,
    fail,
    fail_with,
    out,
)
from flux_flows.cli._session import print_ui_page, run_flow
from flux_flows.cli._tables import (
    KeepColumnsOpt,
    TemplateDefaultOpt,
    TemplateOpt,
    checked_table,
    table_options,
)
from flux_flows.errors import AuthenticationError, FluxError, PromptSourceError
from flux_flows.results import BatchReport
from flux_flows.settings import BATCH_DEFAULTS as D
from flux_flows.settings import DEFAULT_DESTINATION, BatchSettings

if TYPE_CHECKING:
    from flux_flows.planning.plan import PlanSummary
    from flux_flows.planning.sources import PromptRow
    from flux_flows.planning.templates import TableSpec

# On a terminal, `run` shows the plan and asks before a batch this big or this dear; batches of
# up to PLAN_FIRST_ABOVE images (at most $4 at list prices) start without even planning twice.
CONFIRM_ABOVE_IMAGES = 1000
CONFIRM_ABOVE_USD = 5.0
PLAN_FIRST_ABOVE = 50
YesOpt = Annotated[
    bool,
    typer.Option(
        "--yes",
        "-y",
        help=f"Do not ask before generating over {CONFIRM_ABOVE_IMAGES} images or "
        f"${CONFIRM_ABOVE_USD:g} (asked on a terminal only).",
    ),
]


# A Prefect global concurrency limit with slot decay, shared by every run on the account.
RateLimitOpt = Annotated[
    str | None,
    typer.Option(
        "--rate-limit",
        metavar="NAME",
        help="Share the account's requests per minute with other runs through this Prefect "
        "limit (prefect gcl create NAME --limit 10 --slot-decay-per-second 9).",
    ),
]


def print_summary(report: BatchReport, title: str) -> None:
    from rich.table import Table

    from flux_flows.records.reports import summary_lines

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for name, value in summary_lines(report):
        table.add_row(name, value)
    out.print(table)
    for record in report.first_errors[:5]:
        console.print(f"[red]failed[/] prompt {record.index}: {record.error}", highlight=False)
    if report.failed > 5:
        console.print(f"... and {report.failed - 5} more failures: see the manifest")
    for problem in report.problems:
        console.print(f"[bold red]not recorded:[/] {problem}", highlight=False, soft_wrap=True)


def print_contact_sheet(report: BatchReport) -> None:
    """Say where the run's contact sheet is; an S3 page needs a static site or `gallery`."""
    if not report.contact_sheet_uri:
        return
    out.print(f"Contact sheet: {report.contact_sheet_uri}", highlight=False, soft_wrap=True)
    if report.contact_sheet_uri.startswith("s3://") and report.manifest_uri:
        out.print(
            f"  view it locally: flux-flows gallery {shlex.quote(report.manifest_uri)}",
            highlight=False,
            soft_wrap=True,
        )


def finish(report: BatchReport) -> None:
    """Exit non-zero when an image failed or a record was lost (the summary said which).

    A batch the API stopped for its credentials exits 3, as `generate` does: the flow stops
    submitting at the first AuthenticationError and records the rest as "not attempted: an
    earlier request failed with AuthenticationError ...", and "1: some images failed" would send
    the user hunting through prompts. The first errors (kept in the report, however big the run)
    are enough to tell.
    """
    if report.interrupted:
        where = report.manifest_uri or "the spill folder (see above)"
        console.print(
            f"[bold yellow]interrupted:[/] what was in flight was stored; the images not "
            f"attempted are ERROR records in {where}: run the same command again (or "
            "`flux-flows replay` on that manifest) to finish them.",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(130)
    refused = AuthenticationError.__name__
    if any(
        (record.error or "").startswith(refused) or f"failed with {refused}" in (record.error or "")
        for record in report.first_errors
    ):
        fail(
            "the API refused the credentials, so the batch stopped: check FIREWORKS_API_KEY "
            "or the credentials block; the same command then finishes the batch",
            ExitCode.CREDENTIALS,
        )
    if report.failed and report.manifest_uri:
        console.print(
            f"{report.failed} image(s) failed: `flux-flows replay "
            f"{shlex.quote(report.manifest_uri)}` re-submits only those, with their seeds "
            "(running the same command again does too).",
            highlight=False,
            soft_wrap=True,
        )
    if report.failed or report.problems:
        raise typer.Exit(int(ExitCode.SOME_FAILED))


def print_plan(title: str, the_plan: PlanSummary) -> None:
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for name, value in (
        ("images requested", the_plan.requested),
        ("distinct images", the_plan.distinct),
        ("already stored (cache hits)", the_plan.stored),
        ("to generate", the_plan.to_generate),
        ("skipped for budget", the_plan.skipped_for_budget),
        ("estimated cost", f"${the_plan.estimated_cost_usd:.4f}"),
        ("saved by the cache", f"${the_plan.saved_usd:.4f}"),
    ):
        table.add_row(name, str(value))
    out.print(table)


def _read_rows(
    prompts: str | None, prompt: list[str] | None, table: TableSpec | None = None
) -> list[PromptRow]:
    from flux_flows.planning.sources import normalize_prompts, read_prompts

    return (
        normalize_prompts(list(prompt), table)
        if prompt
        else read_prompts(str(prompts), table=table)
    )


def confirm_large_batch(
    prompts: str | None, prompt: list[str] | None, settings: BatchSettings, to: str
) -> None:
    """On a terminal, show the plan and ask before a big or costly batch starts spending.

    `--variants 100000` is one keystroke from $140. Only a person at a terminal is asked
    (scripts and schedulers have no TTY on stdin, and `--yes` skips it); the plan is the same
    read-only one `plan` prints, so what is shown is what will run.
    """
    from flux_flows.planning.plan import summarize_plan
    from flux_flows.storage import open_storage

    try:
        table = checked_table(
            settings.prompt_template, settings.template_defaults, settings.keep_columns
        )
        rows = _read_rows(prompts, prompt, table)
        if settings.input_images is None and len(rows) * settings.variants <= PLAN_FIRST_ABOVE:
            return
        storage = open_storage(to)
        the_plan = summarize_plan(rows, settings, storage)
    except (ValidationError, FluxError, PromptSourceError, ValueError) as exc:
        fail_with(exc)
    count, cost = the_plan.to_generate, the_plan.estimated_cost_usd
    if count <= CONFIRM_ABOVE_IMAGES and cost <= CONFIRM_ABOVE_USD:
        return
    print_plan(f"run: {prompts or f'{len(rows)} prompt(s)'} -> {storage.root_uri}", the_plan)
    question = f"Generate {count} image(s) for about ${cost:.2f}?"
    try:
        go_ahead = typer.confirm(question, default=False)
    except typer.Abort:
        go_ahead = False
    if not go_ahead:
        fail("aborted: nothing was generated (--yes skips this question)", ExitCode.SOME_FAILED)


def use_base_url(base_url: str | None) -> None:
    """`--base-url` for a batch: the flow runs in this process and builds its client from
    FIREWORKS_BASE_URL, so the option wins over the variable as it does for `generate`."""
    if base_url is None:
        return
    from flux_flows.client import BASE_URL_ENV, resolve_base_url

    try:
        os.environ[BASE_URL_ENV] = resolve_base_url(base_url)
    except ValueError as exc:
        fail_with(exc)


def _settings(options: dict[str, Any], drop: tuple[str, ...]) -> BatchSettings:
    """`run` and `plan` read their options the same way: as the one list of settings."""
    try:
        return BatchSettings.model_validate(as_fields(options, drop=drop))
    except ValidationError as exc:
        fail_with(exc)


def run(
    prompts: PromptFileArg = None,
    to: DestOpt = DEFAULT_DESTINATION,
    prompt: PromptOpt = None,
    edit: EditOpt = None,
    model: ModelOpt = D.model,
    aspect_ratio: AspectOpt = D.aspect_ratio,
    seed: SeedOpt = D.seed,
    base_seed: BaseSeedOpt = D.base_seed,
    variants: VariantsOpt = D.variants,
    steps: StepsOpt = D.num_inference_steps,
    guidance: GuidanceOpt = D.guidance_scale,
    safety_check: SafetyOpt = D.safety_check,
    safety_tolerance: SafetyToleranceOpt = D.safety_tolerance,
    prompt_upsampling: UpsamplingOpt = False,
    prompt_template: TemplateOpt = None,
    template_defaults: TemplateDefaultOpt = None,
    keep_columns: KeepColumnsOpt = None,
    concurrency: ConcurrencyOpt = D.max_concurrency,
    rpm: RpmOpt = D.requests_per_minute,
    rate_limit: RateLimitOpt = D.rate_limit,
    budget: BudgetOpt = D.budget_usd,
    thumbnails: ThumbnailsOpt = D.thumbnails,
    events: EventsOpt = D.events,
    base_url: BaseUrlOpt = None,
    verbose: VerboseOpt = False,
    yes: YesOpt = False,
) -> None:
    """Generate an image per prompt (x variants) into a bucket or folder, never paying twice.

    With --edit and a Kontext model, edit every image of a folder or S3 prefix with every prompt.
    On a terminal, a batch of over 1000 images or $5 shows its plan and asks first.
    """
    check_prompt_source(prompts, prompt, edit, model)
    check_destination(to)
    batch = _settings(
        table_options(locals()), drop=("prompts", "to", "prompt", "base_url", "verbose", "yes")
    )
    use_base_url(base_url)
    if not yes and sys.stdin.isatty():
        confirm_large_batch(prompts, prompt, batch, to)
    settings = batch.model_dump(exclude_defaults=True)

    def start() -> BatchReport:
        from flux_flows.flows import generate_images, generate_images_from_file

        if prompt:  # inline prompts: a list of strings, no per-row overrides
            return generate_images(list(prompt), to, **settings)
        return generate_images_from_file(str(prompts), to, **settings)

    report, page = run_flow(start, verbose=verbose, label="generating")
    print_summary(report, f"flux-flows run -> {report.destination}")
    print_contact_sheet(report)
    print_ui_page(page)
    finish(report)


def plan(
    prompts: PromptFileArg = None,
    to: DestOpt = DEFAULT_DESTINATION,
    prompt: PromptOpt = None,
    edit: EditOpt = None,
    model: ModelOpt = D.model,
    aspect_ratio: AspectOpt = D.aspect_ratio,
    seed: SeedOpt = D.seed,
    base_seed: BaseSeedOpt = D.base_seed,
    variants: VariantsOpt = D.variants,
    steps: StepsOpt = D.num_inference_steps,
    guidance: GuidanceOpt = D.guidance_scale,
    safety_check: SafetyOpt = D.safety_check,
    safety_tolerance: SafetyToleranceOpt = D.safety_tolerance,
    prompt_upsampling: UpsamplingOpt = False,
    prompt_template: TemplateOpt = None,
    template_defaults: TemplateDefaultOpt = None,
    keep_columns: KeepColumnsOpt = None,
    budget: BudgetOpt = D.budget_usd,
) -> None:
    """Say what `run` would do and cost, without generating anything (no API key needed)."""
    from flux_flows.planning.plan import summarize_plan
    from flux_flows.storage import open_storage

    check_prompt_source(prompts, prompt, edit, model)
    check_destination(to)
    settings = _settings(table_options(locals()), drop=("prompts", "to", "prompt"))
    table = checked_table(
        settings.prompt_template, settings.template_defaults, settings.keep_columns
    )
    from flux_flows.planning.sources import iter_prompts, normalize_prompts

    try:
        # A file is read as a stream: planning a million rows holds their keys, not the rows.
        rows = (
            normalize_prompts(list(prompt), table)
            if prompt
            else iter_prompts(str(prompts), table=table)
        )
        storage = open_storage(to)
        the_plan = summarize_plan(rows, settings, storage)
    except (ValidationError, FluxError, PromptSourceError, ValueError) as exc:
        fail_with(exc)
    print_plan(
        f"plan: {prompts or f'{len(prompt or [])} prompt(s)'} -> {storage.root_uri}", the_plan
    )


def replay(
    manifest: Annotated[
        str, typer.Argument(help="manifest.jsonl of an earlier run (path or s3://).")
    ],
    to: Annotated[
        str | None, typer.Option("--to", "-t", help="Default: where the manifest was written.")
    ] = None,
    include_skipped: Annotated[
        bool, typer.Option(help="Also re-submit images skipped for budget.")
    ] = False,
    concurrency: ConcurrencyOpt = D.max_concurrency,
    rpm: RpmOpt = D.requests_per_minute,
    budget: BudgetOpt = D.budget_usd,
    events: EventsOpt = D.events,
    base_url: BaseUrlOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Re-submit only the failed images of an earlier run, with their original seeds."""
    from flux_flows.flows import replay_failed

    if to is not None:
        check_destination(to)
    use_base_url(base_url)

    report, page = run_flow(
        lambda: replay_failed(
            manifest,
            to,
            include_skipped=include_skipped,
            max_concurrency=concurrency,
            requests_per_minute=rpm,
            budget_usd=budget,
            events=events,
        ),
        verbose=verbose,
        label="replaying",
    )
    if not report.requested:  # the flow found nothing to re-submit and ran nothing
        which = "ERROR or SKIPPED_BUDGET" if include_skipped else "ERROR"
        out.print(f"nothing to replay: the manifest has no {which} records", highlight=False)
        return
    print_summary(report, f"flux-flows replay -> {report.destination}")
    print_contact_sheet(report)
    print_ui_page(page)
    finish(report)


def demo(
    to: DestOpt = "./flux-flows-demo",
    verbose: VerboseOpt = False,
) -> None:
    """Run a small batch on the built-in emulator into a local folder: no key, no network."""
    from flux_flows.emulator import Emulator, EmulatorConfig
    from flux_flows.flows import generate_images
    from flux_flows.planning.plan import summarize_plan
    from flux_flows.planning.sources import read_prompts
    from flux_flows.storage import open_storage

    check_destination(to)
    source = Path(__file__).parent.parent / "examples" / "demo_prompts.txt"
    rows = read_prompts(source)
    prompts = [row.fields for row in rows]
    options: dict[str, Any] = {"safety_check": True, "seed": 2026}
    try:  # what is already there: a second demo generates nothing, and says so
        the_plan = summarize_plan(rows, BatchSettings(**options), open_storage(to))
    except (ValidationError, FluxError, ValueError) as exc:
        fail_with(exc)
    if the_plan.to_generate:
        stored = f" ({the_plan.stored} already stored)" if the_plan.stored else ""
        doing = f"generating {the_plan.to_generate} images{stored}"
    else:
        doing = f"{the_plan.stored} images already stored: nothing to generate"
    console.print(f"Starting the Fireworks emulator; {doing}...", highlight=False)
    with Emulator(EmulatorConfig(latency_s=0.2, jitter_s=0.3)) as emulator:
        os.environ["FIREWORKS_BASE_URL"] = emulator.base_url
        os.environ["FIREWORKS_API_KEY"] = "emulator-demo-key"
        report, page = run_flow(
            lambda: generate_images(prompts, to, **options),
            verbose=verbose,
            label="generating",
        )
    print_summary(report, f"flux-flows demo -> {report.destination}")
    out.print(f"\nImages:   {Path(report.destination) / 'images'}")
    out.print(f"Manifest: {Path(report.destination) / 'manifest.jsonl'}")
    print_contact_sheet(report)
    print_ui_page(page)
    out.print("Run it again: every image is already stored, so nothing is generated twice.")
    finish(report)
