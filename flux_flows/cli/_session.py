"""How a CLI command runs a flow: on a Prefect API that answers, quietly, under a progress bar.

Prefect is imported here, inside the functions, so commands that never run a flow (`--help`,
`generate`, `emulator`) start at once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from pydantic import ValidationError

from flux_flows.cli._common import ExitCode, console, fail, fail_with, out
from flux_flows.errors import FluxError, PromptSourceError

if TYPE_CHECKING:
    from flux_flows.results import BatchReport

# Our own loggers still reach the terminal (a spilled image, a missing thumbnail); Prefect's
# per-run chatter is for the UI, where it still goes: the console handler is filtered, not the
# loggers, so the API log handler keeps every record.
_TERMINAL_LOGGERS = ("flux_flows",)


class _OnlyOurs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith(_TERMINAL_LOGGERS)


def _console_handlers() -> Iterator[logging.Handler]:
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()  # the handlers exist only once Prefect has configured logging

    loggers = [logging.getLogger()]
    loggers += [
        x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler):
                yield handler


def quiet_console() -> None:
    """Keep the terminal for the progress bar and the summary until the process exits."""
    only_ours = _OnlyOurs()
    for handler in _console_handlers():
        handler.addFilter(only_ours)


@contextlib.contextmanager
def prefect_api(verbose: bool) -> Iterator[Callable[[str | None], str | None]]:
    """A Prefect API for this command; yields a function from a flow run id to its UI page.

    With no API configured (no PREFECT_API_URL, no profile naming one), the CLI's own background
    server is used, started on first use: Prefect's temporary server would migrate a database on
    every command and can time out on a small machine. That server admits only its user, so the
    CLI's calls carry its auth string (PREFECT_API_AUTH_STRING).
    """
    from prefect.settings import (
        PREFECT_API_AUTH_STRING,
        PREFECT_API_URL,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        get_current_settings,
        temporary_settings,
    )

    from flux_flows.cli import local_server

    if not verbose:
        quiet_console()
    overrides: dict[object, object] = {PREFECT_SERVER_ANALYTICS_ENABLED: False}
    if local_server.configured_api_url() is None:
        started = time.monotonic()
        try:
            server = local_server.ensure_server(
                local_server.prefect_home(),
                timeout=local_server.start_timeout(),
                waiting=lambda: console.status(
                    "Starting a local Prefect server in the background (the first time takes "
                    "up to a minute; `flux-flows server stop` stops it)..."
                ),
            )
            secret = local_server.auth_secret(server.home)
        except (local_server.ServerStartError, ValueError, OSError) as exc:
            fail(str(exc), ExitCode.API_FAILURE)
        if time.monotonic() - started > 1:
            console.print(
                f"Prefect server ready at {server.url} ({time.monotonic() - started:.0f} s)",
                highlight=False,
            )
        # The server has proven it is ours (local_server.probe): only now may it see the secret.
        overrides[PREFECT_API_URL] = server.api_url
        overrides[PREFECT_API_AUTH_STRING] = secret
    with temporary_settings(overrides):
        ui = get_current_settings().ui_url

        def page(flow_run_id: str | None) -> str | None:
            if not ui or not flow_run_id:
                return None
            return f"{str(ui).rstrip('/')}/runs/flow-run/{flow_run_id}"

        yield page


@contextlib.contextmanager
def progress_bar(label: str) -> Iterator[None]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from flux_flows.rendering.progress import listening, listening_status

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task_id = bar.add_task(label, total=None)
        shown = [""]

        def update(done: int, total: int) -> None:
            # Nothing to generate (every image stored): no empty 0/0 bar, the summary says so.
            bar.update(task_id, completed=done, total=total, visible=bool(total) or bool(shown[0]))

        def status(text: str) -> None:
            """A wait is said once where logs go too (a terminal also shows it on the bar)."""
            if text and not shown[0]:
                bar.console.print(text, highlight=False, soft_wrap=True)
            shown[0] = text
            described = text.split(" (", 1)[0][:60] if text else label
            bar.update(task_id, description=described, visible=True if text else None)

        with listening(update), listening_status(status):
            yield


def run_flow(
    flow_call: Callable[[], BatchReport], *, verbose: bool, label: str
) -> tuple[BatchReport, str | None]:
    """Run a flow under a progress bar, turning user mistakes into one-line errors.

    Returns the report and the run's page in the Prefect UI, for the command to print last.
    """
    try:
        with prefect_api(verbose) as ui_page:
            with progress_bar(label):
                report = flow_call()
            return report, ui_page(report.flow_run_id)
    except (ValidationError, FluxError, PromptSourceError, ValueError) as exc:
        fail_with(exc)
    except RuntimeError as exc:
        # Prefect's own words for a PREFECT_API_URL nobody answers at: a network failure (4),
        # not a traceback ending in exit 1 ("some images failed").
        if "Failed to reach API" not in str(exc):
            raise
        fail(
            f"{exc} (check PREFECT_API_URL, or unset it to use a local server)",
            ExitCode.API_FAILURE,
        )


def print_ui_page(page: str | None) -> None:
    if page:
        out.print(f"Logs and artifacts: {page}", highlight=False, soft_wrap=True)
