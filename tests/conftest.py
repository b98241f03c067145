"""Shared fixtures: real servers on loopback (emulator, moto S3) and one Prefect test API per session."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.common import PREFECT_START_TIMEOUT_S, TEST_API_KEY, free_port

# No telemetry from the test servers (there is no network to send it to anyway).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# A private PREFECT_HOME for the session: a command run without a Prefect API starts the CLI's
# background server there, never in the developer's own home, and the session stops it at the end.
TEST_PREFECT_HOME = tempfile.mkdtemp(prefix="flux-flows-tests-prefect-home-")
os.environ["PREFECT_HOME"] = TEST_PREFECT_HOME
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = str(PREFECT_START_TIMEOUT_S)
os.environ["FLUX_FLOWS_SERVER_TIMEOUT"] = str(PREFECT_START_TIMEOUT_S)


# CI promises these families run: with FLUX_FLOWS_REQUIRE_ALL=1 (set by .ci/run) a skip in any
# of them fails the session instead of letting it go green without them.
REQUIRED_FAMILIES = ("test_browser.py", "test_dask.py", "test_deployment.py", "dask")
_required_skips: list[str] = []


# The slow lane: end-to-end files (subprocess CLIs and workers, a real browser, Dask clusters,
# deployments, benchmark scripts, the fault matrix), named once here, and any test anywhere that
# runs flows against the session's Prefect API (it uses the `prefect_api` fixture, directly or
# through `flow_env`/`cli_env`). Everything else is the fast lane: `pytest -m "not slow"`.
SLOW_FILES = (
    "faults/",
    "test_bench_scale_smoke.py",
    "test_benchmark_smoke.py",
    "test_browser.py",
    "test_cli.py",
    "test_cli_outcomes.py",
    "test_dask.py",
    "test_deployment.py",
    "test_events_e2e.py",
    "test_first_run.py",
    "test_fleet.py",
    "test_fleet_workers.py",
    "test_local_server.py",
    "test_shared_limit.py",
)
SLOW_FIXTURES = {"prefect_api"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tests = Path(__file__).parent
    for item in items:
        where = item.path.relative_to(tests).as_posix()
        if where.startswith(SLOW_FILES) or SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


def _note_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if report.skipped and any(family in report.nodeid for family in REQUIRED_FAMILIES):
        _required_skips.append(report.nodeid)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note_skip(report)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note_skip(report)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop any background Prefect server a CLI test left in the session's PREFECT_HOME; under
    FLUX_FLOWS_REQUIRE_ALL=1, fail the session if a promised test family was skipped."""
    from flux_flows.cli.local_server import stop_server

    stop_server(Path(TEST_PREFECT_HOME))
    if os.environ.get("FLUX_FLOWS_REQUIRE_ALL") == "1" and _required_skips:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"FLUX_FLOWS_REQUIRE_ALL: {len(_required_skips)} required test(s) skipped:"]
        lines += [f"  {nodeid}" for nodeid in _required_skips[:20]]
        if reporter is not None:
            reporter.ensure_newline()
            for line in lines:
                reporter.write_line(line, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto server over real HTTP; boto3 reaches it through the standard AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("AWS_PROFILE", raising=False)
        yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: str, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket per test, named after the test so failures are easy to trace."""
    import re
    import uuid

    import boto3

    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture
def emulator() -> Iterator[object]:
    """A fresh Fireworks emulator on a free loopback port, checking the test key."""
    from flux_flows.emulator import Emulator, EmulatorConfig

    with Emulator(EmulatorConfig(api_key=TEST_API_KEY)) as emu:
        yield emu


@pytest.fixture
def fireworks_env(emulator: object, monkeypatch: pytest.MonkeyPatch) -> object:
    """Points the library's env-var configuration at the emulator."""
    monkeypatch.setenv("FIREWORKS_API_KEY", TEST_API_KEY)
    monkeypatch.setenv("FIREWORKS_BASE_URL", emulator.base_url)  # type: ignore[attr-defined]
    return emulator


@pytest.fixture(autouse=True)
def _no_real_services(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests must never reach the real Fireworks API: no ambient key or base URL leaks in."""
    if os.environ.get("FIREWORKS_BASE_URL", "").startswith("https://api.fireworks.ai"):
        monkeypatch.delenv("FIREWORKS_BASE_URL")
    monkeypatch.delenv("FIREWORKS_API_KEY", raising=False)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One real (ephemeral, SQLite) Prefect API for the whole session, with its own result store.

    Prefect keeps cached task results on disk (~/.prefect/storage by default); a private folder
    keeps one session's cache from answering for the next.
    """
    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        temporary_settings,
    )
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    # No heartbeat thread: joining it costs about a second at the end of every flow run.
    settings = {
        PREFECT_RESULTS_LOCAL_STORAGE_PATH: storage,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
    }
    with (
        temporary_settings(settings),
        prefect_test_harness(server_startup_timeout=PREFECT_START_TIMEOUT_S),
    ):
        yield


@pytest.fixture
def flow_env(
    prefect_api: None, fireworks_env: object, tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> object:
    """Prefect API + emulator via env vars + a private spill folder: what a flow test needs."""
    monkeypatch.setenv("FLUX_FLOWS_SPILL_DIR", str(tmp_path / "spill"))  # type: ignore[operator]
    return fireworks_env


@pytest.fixture
def cli_env(flow_env: object, tmp_path: object) -> dict[str, str]:
    """Environment for `flux-flows` subprocesses: the emulator, the session's Prefect API, AWS."""
    from prefect.settings import PREFECT_API_URL

    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),  # type: ignore[operator]
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "COLUMNS": "200",
    }
    return env
