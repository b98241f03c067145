"""The `flux-flows` command line: one-off generations, batches, the emulator and the demo.

User mistakes end with a one-line message and a documented exit code, never a traceback, so the
commands can be scripted: 0 done, 1 some images failed, 2 bad input, 3 credentials, 4 API or
network failure, 5 the image was content-filtered.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console

from flux_flows.errors import (
    AuthenticationError,
    FluxError,
    InvalidRequestError,
    MissingCredentialsError,
    PromptSourceError,
    StorageError,
)
from flux_flows.models import (
    ALL_MODELS,
    KONTEXT_MODELS,
    MODELS,
    BatchReport,
    FinishReason,
    ImageRequest,
    describe_validation_error,
)


class ExitCode(IntEnum):
    OK = 0
    SOME_FAILED = 1
    BAD_INPUT = 2
    CREDENTIALS = 3
    API_FAILURE = 4
    FILTERED = 5


app = typer.Typer(
    name="flux-flows",
    help="Generate images with FLUX.1 on Fireworks AI, from one prompt or thousands.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()


def fail(message: str, code: ExitCode) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(int(code))


def exit_code_for(error: Exception) -> ExitCode:
    if isinstance(error, ValidationError | PromptSourceError | InvalidRequestError | ValueError):
        return ExitCode.BAD_INPUT
    if isinstance(error, MissingCredentialsError | AuthenticationError):
        return ExitCode.CREDENTIALS
    return ExitCode.API_FAILURE


def fail_with(error: Exception) -> NoReturn:
    message = describe_validation_error(error) if isinstance(error, ValidationError) else str(error)
    fail(message, exit_code_for(error))


ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help=f"One of: {', '.join(ALL_MODELS)}.", show_default=True),
]
AspectOpt = Annotated[str, typer.Option("--aspect-ratio", "-a", help="e.g. 1:1, 16:9, 9:16.")]
SeedOpt = Annotated[
    int | None,
    typer.Option("--seed", "-s", help="Fixed seed (1..2^32-1); default: from the prompt."),
]
StepsOpt = Annotated[
    int | None, typer.Option("--steps", help="Inference steps; default 4 (schnell) / 28 (dev).")
]
GuidanceOpt = Annotated[float, typer.Option("--guidance", help="Guidance scale, 0 < g <= 20.")]
SafetyOpt = Annotated[
    bool,
    typer.Option("--safety-check/--no-safety-check", help="Ask the API to filter unsafe images."),
]
BaseUrlOpt = Annotated[
    str | None,
    typer.Option("--base-url", help="API base URL (default: FIREWORKS_BASE_URL or Fireworks)."),
]


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Image file to write (.jpg/.png).")
    ],
    model: ModelOpt = MODELS[0],
    aspect_ratio: AspectOpt = "1:1",
    seed: SeedOpt = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = 3.5,
    safety_check: SafetyOpt = False,
    input_image: Annotated[
        str | None,
        typer.Option(
            "--input-image",
            "-i",
            help="Kontext only: the image to edit (path, s3://, http(s):// URL).",
            show_default=False,
        ),
    ] = None,
    safety_tolerance: SafetyToleranceOpt = None,
    base_url: BaseUrlOpt = None,
    keep_filtered: Annotated[
        bool, typer.Option(help="Write the image even when the API filtered it.")
    ] = False,
) -> None:
    """Generate one image and write it to a file (format from the file's extension)."""
    from flux_flows.client import FluxClient

    suffix = output.suffix.lower()
    formats = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png"}
    if suffix not in formats:
        fail(f"--output must end in .jpg, .jpeg or .png, got {output.name!r}", ExitCode.BAD_INPUT)
    if not output.parent.exists():
        fail(f"the folder {str(output.parent)!r} does not exist", ExitCode.BAD_INPUT)
    try:
        request = ImageRequest(
            prompt=prompt,
            model=model,
            aspect_ratio=aspect_ratio,
            seed=seed,
            num_inference_steps=steps,
            guidance_scale=guidance,
            safety_check=safety_check,
            output_format=formats[suffix],
            input_image=input_image,
            safety_tolerance=safety_tolerance,
        )
        if request.needs_input_hash and request.input_image is not None:
            from flux_flows.images_in import hash_input_images

            digest = hash_input_images([request.input_image])[request.input_image]
            request = request.model_copy(update={"input_image_sha256": digest})
        with FluxClient(base_url=base_url) as client:
            image = client.generate(request)
    except (ValidationError, FluxError, ValueError) as exc:
        fail_with(exc)
    if image.finish_reason is FinishReason.CONTENT_FILTERED and not image.data:
        fail(
            f"the Kontext task was moderated (seed {image.seed}); there is no image to write.",
            ExitCode.FILTERED,
        )
    if image.finish_reason is FinishReason.CONTENT_FILTERED and not keep_filtered:
        fail(
            f"the image was content-filtered (seed {image.seed}); nothing written. "
            "Use --keep-filtered to write it anyway.",
            ExitCode.FILTERED,
        )
    output.write_bytes(image.data)
    out.print(
        f"{output} {image.width}x{image.height} seed={image.seed} "
        f"finish={image.finish_reason} {image.latency_s:.2f}s",
        highlight=False,
    )


@app.command()
def emulator(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8787,
    api_key: Annotated[
        str | None,
        typer.Option(help="Accept only this key (default: any key).", show_default=False),
    ] = None,
    latency: Annotated[float, typer.Option(help="Seconds added to each generation.")] = 0.0,
    jitter: Annotated[float, typer.Option(help="Up to this many random extra seconds.")] = 0.0,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute before 429s.")] = None,
    rate_429: Annotated[float, typer.Option(help="Share of requests answered 429.")] = 0.0,
    rate_5xx: Annotated[float, typer.Option(help="Share of requests answered 503.")] = 0.0,
    kontext_pending: Annotated[
        float, typer.Option(help="Seconds a FLUX Kontext task stays Pending.")
    ] = 0.3,
) -> None:
    """Run the local Fireworks-compatible emulator (loopback only) until interrupted."""
    from flux_flows.emulator import EmulatorConfig, serve

    config = EmulatorConfig(
        api_key=api_key,
        latency_s=latency,
        jitter_s=jitter,
        rpm_limit=rpm,
        rate_429=rate_429,
        rate_5xx=rate_5xx,
        kontext_pending_s=kontext_pending,
    )
    if api_key is None:
        console.print("Any API key is accepted: export FIREWORKS_API_KEY=emulator")
    try:
        serve(port=port, config=config)
    except OSError as exc:
        fail(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}", ExitCode.BAD_INPUT)
    except KeyboardInterrupt:
        pass


# --- batches ---------------------------------------------------------------------------------

DestOpt = Annotated[str, typer.Option("--to", "-t", help="s3://bucket/prefix or a local folder.")]
VariantsOpt = Annotated[int, typer.Option("--variants", "-n", help="Images per prompt.")]
ConcurrencyOpt = Annotated[int, typer.Option("--concurrency", "-c", help="Requests in flight.")]
RpmOpt = Annotated[
    float | None, typer.Option("--rpm", help="Stay under this many requests per minute.")
]
BudgetOpt = Annotated[
    float | None, typer.Option("--budget", help="Stop submitting once this many USD would pass.")
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's run logs.")]


@contextlib.contextmanager
def quiet_prefect(verbose: bool) -> Iterator[None]:
    """A CLI user wants a progress bar, not a log line per task run or the server's chatter."""
    from prefect.settings import PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    if not verbose:
        # Left quiet until the process exits: the temporary server logs its shutdown at exit.
        for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", "docket", "uvicorn"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with temporary_settings({PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        yield


@contextlib.contextmanager
def progress_bar(label: str) -> Iterator[None]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from flux_flows.progress import listening

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task_id = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task_id, completed=done, total=total)

        with listening(update):
            yield


def print_summary(report: BatchReport, title: str) -> None:
    from rich.table import Table

    from flux_flows.reporting import summary_lines

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for name, value in summary_lines(report):
        table.add_row(name, value)
    out.print(table)
    errors = [r for r in report.records if r.finish_reason is FinishReason.ERROR]
    for record in errors[:5]:
        console.print(f"[red]failed[/] prompt {record.index}: {record.error}", highlight=False)
    if len(errors) > 5:
        console.print(f"... and {len(errors) - 5} more failures: see the manifest")


def run_flow(flow_call: Callable[[], BatchReport], *, verbose: bool, label: str) -> BatchReport:
    """Run a flow under a progress bar, turning user mistakes into one-line errors."""
    try:
        with quiet_prefect(verbose), progress_bar(label):
            return flow_call()
    except (ValidationError, FluxError, PromptSourceError, ValueError) as exc:
        fail_with(exc)


def print_contact_sheet(report: BatchReport) -> None:
    """Say where the run's contact sheet is; an S3 page needs a static site or `gallery`."""
    if not report.contact_sheet_uri:
        return
    out.print(f"Contact sheet: {report.contact_sheet_uri}", highlight=False, soft_wrap=True)
    if report.contact_sheet_uri.startswith("s3://") and report.manifest_uri:
        out.print(
            f"  view it locally: flux-flows gallery {report.manifest_uri}",
            highlight=False,
            soft_wrap=True,
        )


def finish(report: BatchReport) -> None:
    if report.failed:
        raise typer.Exit(int(ExitCode.SOME_FAILED))


SafetyToleranceOpt = Annotated[
    int | None,
    typer.Option(
        "--safety-tolerance", help="Kontext only: 0 (strict) .. 6 (permissive); API default 2."
    ),
]
UpsamplingOpt = Annotated[
    bool,
    typer.Option(
        "--prompt-upsampling/--no-prompt-upsampling",
        help="Kontext only: let the API elaborate the prompt.",
    ),
]


PromptFileArg = Annotated[
    str | None,
    typer.Argument(
        help="Prompt file (.txt/.csv/.jsonl), path or s3://; or give --prompt instead.",
        show_default=False,
    ),
]
PromptOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--prompt",
        "-p",
        help="A prompt, instead of a prompt file (repeat for more).",
        show_default=False,
    ),
]
EditOpt = Annotated[
    str | None,
    typer.Option(
        "--edit",
        help="Edit images with FLUX Kontext: a folder, s3://bucket/prefix/ or one image; "
        "every prompt is applied to every .jpg/.jpeg/.png/.webp in it.",
        show_default=False,
    ),
]


def check_prompt_source(
    prompts: str | None, prompt: list[str] | None, edit: str | None, model: str
) -> None:
    """`run` and `plan` take prompts the same way; both refuse the same mistakes."""
    if (prompts is None) == (not prompt):
        fail("give either a prompt file or --prompt TEXT (exactly one of them)", ExitCode.BAD_INPUT)
    if edit is not None and prompt and model not in KONTEXT_MODELS:
        fail(
            f"--edit needs a FLUX Kontext model: --model {' or --model '.join(KONTEXT_MODELS)}",
            ExitCode.BAD_INPUT,
        )


@app.command()
def run(
    prompts: PromptFileArg = None,
    to: DestOpt = "./flux-flows-output",
    prompt: PromptOpt = None,
    edit: EditOpt = None,
    model: ModelOpt = MODELS[0],
    aspect_ratio: AspectOpt = "1:1",
    seed: SeedOpt = None,
    variants: VariantsOpt = 1,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = 3.5,
    safety_check: SafetyOpt = False,
    safety_tolerance: SafetyToleranceOpt = None,
    prompt_upsampling: UpsamplingOpt = False,
    concurrency: ConcurrencyOpt = 8,
    rpm: RpmOpt = None,
    budget: BudgetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Generate an image per prompt (x variants) into a bucket or folder, never paying twice.

    With --edit and a Kontext model, edit every image of a folder or S3 prefix with every prompt.
    """
    check_prompt_source(prompts, prompt, edit, model)
    settings: dict[str, Any] = {
        "model": model,
        "aspect_ratio": aspect_ratio,
        "seed": seed,
        "variants": variants,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "safety_check": safety_check,
        "safety_tolerance": safety_tolerance,
        "prompt_upsampling": prompt_upsampling,
        "input_images": edit,
        "max_concurrency": concurrency,
        "requests_per_minute": rpm,
        "budget_usd": budget,
    }

    def start() -> BatchReport:
        from flux_flows.flows import generate_images, generate_images_from_file

        if prompt:  # inline prompts: a list of strings, no per-row overrides
            return generate_images(list(prompt), to, **settings)
        return generate_images_from_file(str(prompts), to, **settings)

    report = run_flow(start, verbose=verbose, label="generating")
    print_summary(report, f"flux-flows run -> {report.destination}")
    print_contact_sheet(report)
    finish(report)


@app.command()
def plan(
    prompts: PromptFileArg = None,
    to: DestOpt = "./flux-flows-output",
    prompt: PromptOpt = None,
    edit: EditOpt = None,
    model: ModelOpt = MODELS[0],
    aspect_ratio: AspectOpt = "1:1",
    seed: SeedOpt = None,
    variants: VariantsOpt = 1,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = 3.5,
    safety_check: SafetyOpt = False,
    safety_tolerance: SafetyToleranceOpt = None,
    prompt_upsampling: UpsamplingOpt = False,
    budget: BudgetOpt = None,
) -> None:
    """Say what `run` would do and cost, without generating anything (no API key needed)."""
    from rich.table import Table

    from flux_flows.batch import expand, find_stored, plan_batch
    from flux_flows.images_in import list_input_images
    from flux_flows.pricing import price_table
    from flux_flows.prompts import normalize_prompts, read_prompts
    from flux_flows.storage import open_storage

    check_prompt_source(prompts, prompt, edit, model)
    defaults = {
        "model": model,
        "aspect_ratio": aspect_ratio,
        "guidance_scale": guidance,
        "num_inference_steps": steps,
        "safety_check": safety_check,
        "safety_tolerance": safety_tolerance,
        "prompt_upsampling": prompt_upsampling,
    }
    try:
        rows = normalize_prompts(list(prompt)) if prompt else read_prompts(str(prompts))
        images = expand(
            rows,
            defaults=defaults,
            base_seed=seed,
            variants=variants,
            input_images=None if edit is None else list_input_images(edit),
        )
        storage = open_storage(to)
        the_plan = plan_batch(images, find_stored(storage), prices=price_table(), budget_usd=budget)
    except (ValidationError, FluxError, PromptSourceError, ValueError) as exc:
        fail_with(exc)
    stored = sum(1 for key in the_plan.unique if key in the_plan.stored)
    source = prompts or f"{len(rows)} prompt(s)"
    table = Table(title=f"plan: {source} -> {storage.root_uri}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for name, value in (
        ("images requested", len(images)),
        ("distinct images", len(the_plan.unique)),
        ("already stored (cache hits)", stored),
        ("to generate", len(the_plan.to_generate)),
        ("skipped for budget", len(the_plan.skipped_for_budget)),
        ("estimated cost", f"${the_plan.estimated_cost_usd:.4f}"),
        ("saved by the cache", f"${the_plan.saved_usd:.4f}"),
    ):
        table.add_row(name, str(value))
    out.print(table)


@app.command()
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
    concurrency: ConcurrencyOpt = 8,
    rpm: RpmOpt = None,
    budget: BudgetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Re-submit only the failed images of an earlier run, with their original seeds."""
    from flux_flows.flows import replay_failed

    report = run_flow(
        lambda: replay_failed(
            manifest,
            to,
            include_skipped=include_skipped,
            max_concurrency=concurrency,
            requests_per_minute=rpm,
            budget_usd=budget,
        ),
        verbose=verbose,
        label="replaying",
    )
    print_summary(report, f"flux-flows replay -> {report.destination}")
    finish(report)


@app.command()
def demo(
    to: DestOpt = "./flux-flows-demo",
    verbose: VerboseOpt = False,
) -> None:
    """Run a small batch on the built-in emulator into a local folder: no key, no network."""
    from flux_flows.emulator import Emulator, EmulatorConfig
    from flux_flows.flows import generate_images
    from flux_flows.prompts import read_prompts

    source = Path(__file__).parent / "examples" / "demo_prompts.txt"
    prompts = [row.fields for row in read_prompts(source)]
    console.print(f"Starting the Fireworks emulator and generating {len(prompts)} images...")
    with Emulator(EmulatorConfig(latency_s=0.2, jitter_s=0.3)) as emulator:
        os.environ["FIREWORKS_BASE_URL"] = emulator.base_url
        os.environ["FIREWORKS_API_KEY"] = "emulator-demo-key"
        report = run_flow(
            lambda: generate_images(prompts, to, safety_check=True, seed=2026),
            verbose=verbose,
            label="generating",
        )
    print_summary(report, f"flux-flows demo -> {report.destination}")
    out.print(f"\nImages:   {Path(report.destination) / 'images'}")
    out.print(f"Manifest: {Path(report.destination) / 'manifest.jsonl'}")
    print_contact_sheet(report)
    out.print("Run it again: every image is already stored, so nothing is generated twice.")
    finish(report)


@app.command()
def gallery(
    manifest: Annotated[
        str, typer.Argument(help="manifest.jsonl of an earlier run (path or s3://).")
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Folder for the page (index.html). Default: beside a local manifest, "
            "./flux-flows-gallery for an S3 one.",
            show_default=False,
        ),
    ] = None,
    download: Annotated[
        bool,
        typer.Option(
            "--download", help="Copy the thumbnails beside the page and link them relatively."
        ),
    ] = False,
    expires: Annotated[
        int, typer.Option("--expires", help="Seconds the signed S3 links stay valid.")
    ] = 24 * 3600,
) -> None:
    """Write a contact sheet (one offline HTML page) for the images of an earlier run."""
    from flux_flows.gallery import build_gallery

    try:
        page = build_gallery(manifest, out_dir=output, download=download, expires_s=expires)
    except (ValueError, StorageError, OSError) as exc:
        fail_with(exc)
    if download:
        missing = f", {page.missing} missing (full images shown)" if page.missing else ""
        console.print(f"{page.downloaded} thumbnails copied{missing}", highlight=False)
    out.print(f"Contact sheet: {page.path}", highlight=False, soft_wrap=True)
    out.print(f"Open: {page.path.as_uri()}", highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except (StorageError, PromptSourceError) as exc:  # raised outside a command's own handling
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(int(exit_code_for(exc)))


if __name__ == "__main__":
    main()
