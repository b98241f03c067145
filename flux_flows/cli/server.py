"""`flux-flows server status|start|stop|env`: the background Prefect server the CLI starts for itself.

A user should be able to see what the CLI left running and stop it; `status` also says when the
CLI uses a Prefect API the user configured instead, and how to log in to the server's UI (it
admits only its user: Prefect's API auth, with a secret kept under PREFECT_HOME). `env` points
Prefect's own CLI and workers at it: `eval "$(flux-flows server env)"`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from flux_flows.cli._common import ExitCode, console, fail, out

server_app = typer.Typer(
    help="The local Prefect server the CLI starts on first use (when no PREFECT_API_URL is set).",
    no_args_is_help=True,
    rich_markup_mode=None,  # plain help, as the main app: nothing cut at 80 columns
)


def _login_hint(home: Path) -> str:
    from flux_flows.cli import local_server

    return (
        "It admits only you: its UI asks for a password, paste the auth string kept in "
        f"{local_server.secret_path(home)} (`flux-flows server env` prints it too). "
        'Point Prefect\'s CLI and workers at it with: eval "$(flux-flows server env)"'
    )


def _no_configured_api(command: str) -> None:
    from flux_flows.cli import local_server

    if local_server.configured_api_url() is not None:
        fail(
            f"PREFECT_API_URL is set: the CLI uses that API, not a server of its own "
            f"(`flux-flows server {command}` is only for the CLI's own server)",
            ExitCode.BAD_INPUT,
        )


def _ensure(label: str) -> object:
    from flux_flows.cli import local_server

    try:
        return local_server.ensure_server(
            local_server.prefect_home(),
            timeout=local_server.start_timeout(),
            waiting=lambda: console.status(label),
        )
    except (local_server.ServerStartError, ValueError, OSError) as exc:
        fail(str(exc), ExitCode.API_FAILURE)


@server_app.command(short_help="Which Prefect API the CLI uses, and how to log in.")
def status() -> None:
    """Say which Prefect API the CLI uses, whether its own server is running, and how to log in."""
    from flux_flows.cli import local_server

    configured = local_server.configured_api_url()
    if configured is not None:
        out.print(f"Prefect API configured by you: {configured}", highlight=False)
        return
    home = local_server.prefect_home()
    server = local_server.read_state(home)
    if server is None:
        out.print("No local Prefect server is running; the next run starts one.")
        return
    try:
        secret = local_server.auth_secret(home, create=False)
    except local_server.InsecureSecretError as exc:
        fail(str(exc), ExitCode.API_FAILURE)
    verdict = local_server.probe(server, secret) if secret else None
    state = "" if verdict is local_server.Verdict.READY else " - not answering yet"
    out.print(
        f"Local Prefect server: {server.url} (pid {server.pid}, log {server.log_path}){state}",
        highlight=False,
        soft_wrap=True,
    )
    out.print(_login_hint(home), highlight=False, soft_wrap=True)


@server_app.command(short_help="Start the local Prefect server now.")
def start() -> None:
    """Start the local Prefect server now (runs start it on first use anyway)."""
    from flux_flows.cli import local_server

    _no_configured_api("start")
    server = _ensure("Starting a local Prefect server...")
    assert isinstance(server, local_server.LocalServer)
    out.print(f"Local Prefect server: {server.url} (pid {server.pid})", highlight=False)
    out.print(_login_hint(server.home), highlight=False, soft_wrap=True)


@server_app.command(short_help="Stop the local Prefect server (its database stays).")
def stop() -> None:
    """Stop the local Prefect server; its database (runs, logs, artifacts) stays."""
    from flux_flows.cli import local_server

    server = local_server.stop_server(local_server.prefect_home())
    if server is None:
        out.print("No local Prefect server was running.")
    else:
        out.print(f"Stopped the local Prefect server at {server.url} (pid {server.pid}).")


@server_app.command(short_help="Print export lines for Prefect's CLI and workers.")
def env() -> None:
    """Print `export` lines for Prefect's CLI and workers: eval "$(flux-flows server env)".

    Starts the local server if it is not running. The output holds the server's secret.
    """
    from flux_flows.cli import local_server

    _no_configured_api("env")
    server = _ensure("Starting a local Prefect server...")
    assert isinstance(server, local_server.LocalServer)
    secret = local_server.auth_secret(server.home)
    assert secret is not None
    sys.stdout.write(local_server.shell_env(server, secret))  # no markup, no wrapping
