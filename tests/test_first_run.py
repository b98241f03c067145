"""A newcomer's first commands (issue 13): a Prefect API that always starts, a quick `--help`,
a quiet terminal with a full record in the Prefect UI, and a start-up timeout explained."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers.common import TEST_API_KEY, cli

UI_PAGE_RE = re.compile(r"(http://127\.0\.0\.1:\d+)/runs/flow-run/([0-9a-f-]{36})")


def prefect_modules_after(argv: list[str]) -> list[str]:
    """Run the CLI's entry point in a fresh interpreter and list the Prefect modules it loaded."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.argv = {["flux-flows", *argv]!r}
        from flux_flows.cli import main
        try:
            main()
        except SystemExit:
            pass
        print("LOADED " + ",".join(m for m in sys.modules if m.split(".")[0] == "prefect"))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    line = [x for x in done.stdout.splitlines() if x.startswith("LOADED ")]
    assert line, done.stdout + done.stderr
    return [m for m in line[0].removeprefix("LOADED ").split(",") if m]


@pytest.mark.parametrize(
    "argv", [["--help"], ["--version"], ["run", "--help"], ["run", "--variants", "many"]]
)
def test_help_version_and_argument_errors_do_not_import_prefect(argv: list[str]) -> None:
    assert prefect_modules_after(argv) == []


def test_version_prints_the_package_version() -> None:
    from flux_flows import __version__

    done = cli("--version", env=dict(os.environ))
    assert done.returncode == 0 and done.stdout.strip() == f"flux-flows {__version__}"


def test_quiet_terminal_but_every_log_reaches_the_prefect_api(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    done = cli("run", "-p", "a quiet fox", "--to", str(tmp_path / "out"), env=cli_env)
    assert done.returncode == 0, done.stderr
    assert "Beginning flow run" not in done.stderr + done.stdout  # Prefect's chatter stays off
    page = UI_PAGE_RE.search(done.stdout)
    assert page, done.stdout
    flow_run_id = page.group(2)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    messages = [log.message for log in logs]
    assert any("Beginning flow run" in m for m in messages), messages
    assert any("1 images requested" in m for m in messages), messages


def test_verbose_shows_prefect_logs_on_the_terminal(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    done = cli("run", "-p", "a loud fox", "--to", str(tmp_path / "out"), "-v", env=cli_env)
    assert done.returncode == 0, done.stderr
    assert "Beginning flow run" in done.stderr


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit may wait for a reaper that never comes)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _no_api_env(home: Path, fireworks: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(home),
        FIREWORKS_API_KEY=TEST_API_KEY,
        FIREWORKS_BASE_URL=fireworks.base_url,
        FLUX_FLOWS_SPILL_DIR=str(home / "spill"),
        COLUMNS="200",
    )
    return env


def test_without_an_api_the_cli_starts_one_local_server_and_reuses_it(
    tmp_path: Path, fireworks_env: Any
) -> None:
    home = tmp_path / "new-prefect-home"
    env = _no_api_env(home, fireworks_env)
    out = str(tmp_path / "out")
    try:
        first = cli("run", "-p", "first fox", "--to", out, env=env)
        assert first.returncode == 0, first.stderr
        assert "Prefect server ready at http://127.0.0.1:" in first.stderr
        page = UI_PAGE_RE.search(first.stdout)
        assert page, first.stdout
        state = json.loads((home / "flux-flows-server.json").read_text())
        assert page.group(1) == f"http://127.0.0.1:{state['port']}"

        second = cli("run", "-p", "first fox", "--to", out, env=env)
        assert second.returncode == 0, second.stderr
        assert "Prefect server ready" not in second.stderr  # reused, not started again
        assert json.loads((home / "flux-flows-server.json").read_text()) == state
        assert fireworks_env.stats.generations == 1  # the second run was a cache hit

        # The run is recorded on that server, with its logs, for the UI link printed; the
        # server admits only its user (issue 28), so we ask with the CLI's secret.
        from flux_flows.cli.local_server import auth_headers, auth_secret

        auth = auth_headers(auth_secret(home) or "")
        run_id = UI_PAGE_RE.search(second.stdout).group(2)  # type: ignore[union-attr]
        api = f"{page.group(1)}/api"
        run = httpx.get(f"{api}/flow_runs/{run_id}", headers=auth).json()
        assert run["state_type"] == "COMPLETED"
        logs = httpx.post(
            f"{api}/logs/filter",
            json={"logs": {"flow_run_id": {"any_": [run_id]}}},
            headers=auth,
        ).json()
        assert logs, "no logs reached the local server"

        status = cli("server", "status", env=env)
        assert f"pid {state['pid']}" in status.stdout
    finally:
        stopped = cli("server", "stop", env=env)
    assert stopped.returncode == 0 and "Stopped" in stopped.stdout, stopped.stdout
    assert not running(state["pid"])
    assert "No local Prefect server is running" in cli("server", "status", env=env).stdout


def test_server_status_names_a_configured_api(cli_env: dict[str, str]) -> None:
    done = cli("server", "status", env=cli_env)
    assert done.returncode == 0 and cli_env["PREFECT_API_URL"] in done.stdout


def test_python_api_explains_a_prefect_start_up_timeout(tmp_path: Path) -> None:
    """Prefect's temporary server cannot start in 1 s: the user reads what to do, in our words."""
    script = textwrap.dedent(
        f"""
        from flux_flows import PrefectStartupError, generate_images
        try:
            generate_images(["a fox"], {str(tmp_path / "out")!r})
        except PrefectStartupError as exc:
            print("EXPLAINED " + str(exc))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert "EXPLAINED " in done.stdout, done.stderr[-3000:]
    assert "PREFECT_API_URL" in done.stdout and "prefect server start" in done.stdout
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in done.stdout


def test_with_options_keeps_the_explanation() -> None:
    from prefect.task_runners import ThreadPoolTaskRunner

    from flux_flows import generate_images
    from flux_flows.rendering.flow_class import FluxFlow

    assert isinstance(generate_images.with_options(task_runner=ThreadPoolTaskRunner()), FluxFlow)


def test_a_bad_server_timeout_setting_is_named(tmp_path: Path, fireworks_env: Any) -> None:
    env = _no_api_env(tmp_path / "home", fireworks_env)
    env["FLUX_FLOWS_SERVER_TIMEOUT"] = "soon"
    done = cli("run", "-p", "a fox", "--to", str(tmp_path / "out"), env=env)
    assert done.returncode == 4 and "FLUX_FLOWS_SERVER_TIMEOUT" in done.stderr
    assert not (tmp_path / "home" / "flux-flows-server.json").exists()
