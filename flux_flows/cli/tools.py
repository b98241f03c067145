"""`generate`, `emulator` and `gallery`: the commands that need no Prefect API."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError

from flux_flows.cli._common import (
    AspectOpt,
    BaseUrlOpt,
    ExitCode,
    GuidanceOpt,
    ModelOpt,
    SafetyOpt,
    SafetyToleranceOpt,
    SeedOpt,
    StepsOpt,
    as_fields,
    console,
    fail,
    fail_with,
    out,
)
from flux_flows.errors import FluxError, StorageError
from flux_flows.models import MODELS, FinishReason, ImageRequest

if TYPE_CHECKING:
    from flux_flows.results import GeneratedImage


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
    fields = as_fields(locals(), drop=("output", "base_url", "keep_filtered"))
    from flux_flows.client import FluxClient

    output_format = _output_format(output)
    try:
        request = _request_of({**fields, "output_format": output_format})
        with FluxClient(base_url=base_url) as client:
            image = client.generate(request)
    except (ValidationError, FluxError, ValueError) as exc:
        fail_with(exc)
    if image.finish_reason is FinishReason.CONTENT_FILTERED:
        _check_filtered(image, keep_filtered)
    output.write_bytes(image.data)
    out.print(
        f"{output} {image.width}x{image.height} seed={image.seed} "
        f"finish={image.finish_reason} {image.latency_s:.2f}s",
        highlight=False,
    )


def _output_format(output: Path) -> str:
    """The API's output format for the file's extension; the CLI exits if it cannot write there."""
    formats = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png"}
    suffix = output.suffix.lower()
    if suffix not in formats:
        fail(f"--output must end in .jpg, .jpeg or .png, got {output.name!r}", ExitCode.BAD_INPUT)
    if not output.parent.exists():
        fail(f"the folder {str(output.parent)!r} does not exist", ExitCode.BAD_INPUT)
    return formats[suffix]


def _request_of(fields: dict[str, object]) -> ImageRequest:
    """The request, with the hash of an S3 or URL input image filled in (its cache key is
    content-based, so it is unknown until the image is read)."""
    request = ImageRequest.model_validate(fields)
    if request.needs_input_hash and request.input_image is not None:
        from flux_flows.inputs.images import hash_input_images

        digest = hash_input_images([request.input_image])[request.input_image]
        request = request.model_copy(update={"input_image_sha256": digest})
    return request


def _check_filtered(image: GeneratedImage, keep_filtered: bool) -> None:
    """A filtered image is written only on request, and a moderated Kontext task has none."""
    if not image.data:
        fail(
            f"the Kontext task was moderated (seed {image.seed}); there is no image to write.",
            ExitCode.FILTERED,
        )
    if not keep_filtered:
        fail(
            f"the image was content-filtered (seed {image.seed}); nothing written. "
            "Use --keep-filtered to write it anyway.",
            ExitCode.FILTERED,
        )


def emulator(
    # flux_flows.emulator.DEFAULT_PORT, spelled out so `--help` needs no emulator import
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8737,
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
    control_token: Annotated[
        str | None,
        typer.Option(
            envvar="FLUX_FLOWS_EMULATOR_TOKEN",
            help="Token that /_emulator/config and /_emulator/reset require in the "
            "X-Emulator-Token header (default: a new one, printed at start).",
            show_default=False,
        ),
    ] = None,
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
        serve(port=port, config=config, control_token=control_token)
    except OSError as exc:
        fail(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}", ExitCode.BAD_INPUT)
    except KeyboardInterrupt:
        pass


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
