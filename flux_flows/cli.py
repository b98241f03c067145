"""The `flux-flows` command line: one-off generations, batches, the emulator and the demo.

User mistakes end with a one-line message and a documented exit code, never a traceback, so the
commands can be scripted: 0 done, 1 some images failed, 2 bad input, 3 credentials, 4 API or
network failure, 5 the image was content-filtered.
"""

from __future__ import annotations

import sys
from enum import IntEnum
from pathlib import Path
from typing import Annotated, NoReturn

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
from flux_flows.models import MODELS, FinishReason, ImageRequest, describe_validation_error


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
    str, typer.Option("--model", "-m", help=f"One of: {', '.join(MODELS)}.", show_default=True)
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
        )
        with FluxClient(base_url=base_url) as client:
            image = client.generate(request)
    except (ValidationError, FluxError, ValueError) as exc:
        fail_with(exc)
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
    )
    base = f"http://127.0.0.1:{port}/inference/v1"
    console.print(f"Fireworks emulator on {base}\n  export FIREWORKS_BASE_URL={base}")
    if api_key is None:
        console.print("  export FIREWORKS_API_KEY=emulator   # any key is accepted")
    try:
        serve(port=port, config=config)
    except OSError as exc:
        fail(f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}", ExitCode.BAD_INPUT)
    except KeyboardInterrupt:
        pass


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except (StorageError, PromptSourceError) as exc:  # raised outside a command's own handling
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(int(exit_code_for(exc)))
