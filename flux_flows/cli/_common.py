"""What every command shares: exit codes, one-line errors, and the options `run` and `plan` both take.

User mistakes end with a one-line message and a documented exit code, never a traceback, so the
commands can be scripted: 0 done, 1 some images failed, 2 bad input, 3 credentials, 4 API or
network failure, 5 the image was content-filtered, 6 the destination (or its `claims/` folder)
cannot be read or written. Nothing here imports Prefect: `--help` and
argument errors answer at once.
"""

from __future__ import annotations

import re
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import unquote, urlparse

import typer
from pydantic import ValidationError
from rich.console import Console

from flux_flows.errors import (
    AuthenticationError,
    InvalidRequestError,
    MissingCredentialsError,
    PromptSourceError,
    StorageError,
)
from flux_flows.models import ALL_MODELS, KONTEXT_MODELS, describe_validation_error

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class ExitCode(IntEnum):
    OK = 0
    SOME_FAILED = 1
    BAD_INPUT = 2
    CREDENTIALS = 3
    API_FAILURE = 4
    FILTERED = 5
    STORAGE = 6


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
    if isinstance(error, StorageError):
        return ExitCode.STORAGE
    return ExitCode.API_FAILURE


# The library's own message names Python arguments (`api_key=...`); a shell user sets a variable.
MISSING_KEY_MESSAGE = (
    "No Fireworks API key: export FIREWORKS_API_KEY=fw-... and run the command again. To try "
    "it offline: `flux-flows demo`, or start `flux-flows emulator` and export "
    "FIREWORKS_API_KEY=emulator FIREWORKS_BASE_URL=http://127.0.0.1:8737/inference/v1"
)


def fail_with(error: Exception) -> NoReturn:
    if isinstance(error, MissingCredentialsError):
        fail(MISSING_KEY_MESSAGE, ExitCode.CREDENTIALS)
    message = describe_validation_error(error) if isinstance(error, ValidationError) else str(error)
    fail(message, exit_code_for(error))


ModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help=f"One of: {', '.join(ALL_MODELS)}.", show_default=True),
]
AspectOpt = Annotated[str, typer.Option("--aspect-ratio", "-a", help="e.g. 1:1, 16:9, 9:16.")]
SeedOpt = Annotated[
    int | None,
    typer.Option(
        "--seed",
        "-s",
        help="Seed sent to the API as is (1..2^32-1); variants take seed+1, seed+2, ...; "
        "default: derived from the prompt.",
    ),
]
BaseSeedOpt = Annotated[
    int | None,
    typer.Option(
        "--base-seed",
        help="Derive each image's seed from (this base, prompt, variant) instead (what --seed "
        "used to do). Not with --seed.",
        show_default=False,
    ),
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
DestOpt = Annotated[str, typer.Option("--to", "-t", help="s3://bucket/prefix or a local folder.")]
VariantsOpt = Annotated[int, typer.Option("--variants", "-n", help="Images per prompt.")]
ConcurrencyOpt = Annotated[int, typer.Option("--concurrency", "-c", help="Requests in flight.")]
RpmOpt = Annotated[
    float | None, typer.Option("--rpm", help="Stay under this many requests per minute.")
]
BudgetOpt = Annotated[
    float | None, typer.Option("--budget", help="Stop submitting once this many USD would pass.")
]
ThumbnailsOpt = Annotated[
    bool,
    typer.Option(
        "--thumbnails/--no-thumbnails",
        help="Make a 256 px thumbnail per image for the contact sheet (~4 ms CPU each).",
    ),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's run logs.")]
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


# Short option names the commands use, and the setting or request field each one is.
_FIELD_OF_OPTION = {
    "steps": "num_inference_steps",
    "guidance": "guidance_scale",
    "edit": "input_images",
    "concurrency": "max_concurrency",
    "rpm": "requests_per_minute",
    "budget": "budget_usd",
}


def as_fields(options: dict[str, Any], *, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """A command's options under the names of `settings.py` and `ImageRequest`."""
    return {_FIELD_OF_OPTION.get(k, k): v for k, v in options.items() if k not in drop}


def check_destination(destination: str) -> None:
    """A local destination that is a file (or lies under one) is a typo, not a network failure.

    Found here, before any Prefect server starts: otherwise the run's storage check fails with
    "could not write", which exits 4 ("API or network failure"), and `plan` says nothing at all.
    S3 and other schemes are left to the storage layer.
    """
    text = destination.strip()
    scheme = _SCHEME_RE.match(text)
    if scheme and scheme.group(1).lower() != "file":
        return
    path = Path(unquote(urlparse(text).path) if scheme else text).expanduser().absolute()
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            return
        if candidate.exists() or candidate.is_symlink():
            where = "is" if candidate == path else f"lies under {candidate}, which is"
            fail(
                f"destination {destination!r} {where} a file, not a folder: choose a folder "
                "(it is created if missing) or s3://BUCKET/PREFIX",
                ExitCode.BAD_INPUT,
            )


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


EventsOpt = Annotated[
    bool,
    typer.Option(
        "--events/--no-events",
        help="When the batch ends, send a flux-flows.batch.* Prefect event and record the "
        "manifest as an asset (deployments/README.md).",
    ),
]
