"""`flux-flows server status|stop`: the background Prefect server the CLI starts for itself.

A user should be able to see what the CLI left running and stop it; `status` also says when the
CLI uses a Prefect API the user configured instead.
"""

from __future__ import annotations

import typer

from flux_flows.cli._common import ExitCode, console, fail, out

server_app = typer.Typer(
    help="The local Prefect server the CLI starts on first use (when no PREFECT_API_URL is set).",
    no_args_is_help=True,
)


@server_app.command()
def status() -> None:
    """Say which Prefect API the CLI uses, and whether its own server is running."""
    from flux_flows import local_server

    configured = local_server.configured_api_url()
    if configured is not None:
        out.print(f"Prefect API configured by you: {configured}", highlight=False)
        return
    server = local_server.read_state(local_server.prefect_home())
    if server is None:
        out.print("No local Prefect server is running; the next run starts one.")
        return
    out.print(
        f"Local Prefect server: {server.url} (pid {server.pid}, log {server.log_path})",
        highlight=False,
        soft_wrap=True,
    )


@server_app.command()
def start() -> None:
    """Start the local Prefect server now (runs start it on first use anyway)."""
    from flux_flows import local_server

    if local_server.configured_api_url() is not None:
        fail(
            "PREFECT_API_URL is set: the CLI uses that API, not a server of its own",
            ExitCode.BAD_INPUT,
        )
    try:
        server = local_server.ensure_server(
            local_server.prefect_home(),
            timeout=local_server.start_timeout(),
            waiting=lambda: console.status("Starting a local Prefect server..."),
        )
    except (local_server.ServerStartError, ValueError, OSError) as exc:
        fail(str(exc), ExitCode.API_FAILURE)
    out.print(f"Local Prefect server: {server.url} (pid {server.pid})", highlight=False)


@server_app.command()
def stop() -> None:
    """Stop the local Prefect server; its database (runs, logs, artifacts) stays."""
    from flux_flows import local_server

    server = local_server.stop_server(local_server.prefect_home())
    if server is None:
        out.print("No local Prefect server was running.")
    else:
        out.print(f"Stopped the local Prefect server at {server.url} (pid {server.pid}).")
