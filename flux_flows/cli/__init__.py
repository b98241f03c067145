"""The `flux-flows` command line: one-off generations, batches, the emulator and the demo.

Each command lives in the module of its kind (`tools`, `batch`, `server`); this one only assembles
them. Nothing imported here imports Prefect, so `--help`, `--version` and argument errors answer
in a fraction of a second.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from flux_flows._version import __version__
from flux_flows.cli import batch, tools
from flux_flows.cli._common import ExitCode, console, exit_code_for
from flux_flows.cli.server import server_app
from flux_flows.errors import PromptSourceError, StorageError

__all__ = ["ExitCode", "app", "main"]

app = typer.Typer(
    name="flux-flows",
    help="Generate images with FLUX.1 on Fireworks AI, from one prompt or thousands.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _show_version(value: bool) -> None:
    if value:
        print(f"flux-flows {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            callback=_show_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Generate images with FLUX.1 on Fireworks AI, from one prompt or thousands."""


# What `flux-flows --help` lists: short enough that 80 columns show each whole (Click would cut
# a longer first sentence with "...").
_SHORT_HELP: dict[Callable[..., Any], str] = {
    tools.generate: "Generate one image and write it to a file.",
    tools.emulator: "Run the local Fireworks-compatible emulator.",
    batch.run: "Generate an image per prompt into a bucket or folder.",
    batch.plan: "Say what `run` would do and cost, generating nothing.",
    batch.replay: "Re-submit only the failed images of an earlier run.",
    batch.demo: "Run a small batch on the built-in emulator, offline.",
    tools.gallery: "Write a contact sheet page for an earlier run.",
}
for command, short_help in _SHORT_HELP.items():
    app.command(short_help=short_help)(command)
app.add_typer(
    server_app, name="server", short_help="The local Prefect server the CLI starts and uses."
)


def main() -> None:
    """Console-script entry point."""
    from flux_flows.rendering import interrupts

    interrupts.ABORT_EXIT_CODE = 130  # a second Ctrl-C ends a batch at once (README)
    try:
        app()
    except (StorageError, PromptSourceError) as exc:  # raised outside a command's own handling
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(int(exit_code_for(exc)))
