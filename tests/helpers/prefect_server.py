"""A real `prefect server start` for a test module, and the commands an operator runs against
it (`prefect ...` from the project root, a client, a worker's environment, one worker poll).

Every subprocess has a timeout and is stopped by its own pid (its process group) in a
`finally`, so a hang fails the test instead of the CI job.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers.common import PREFECT_START_TIMEOUT_S, TEST_API_KEY, free_port

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PREFECT_FILE = PROJECT_ROOT / "deployments" / "prefect.yaml"
PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL = "flux-flows-pool"
NIGHTLY = "nightly-batch/nightly-product-images"
SHOTS = "product-shots/product-shots"
SERVER_START_TIMEOUT_S = float(PREFECT_START_TIMEOUT_S)
CLI_TIMEOUT_S = 60.0
WORKER_TIMEOUT_S = 150.0


@dataclass
class PrefectServer:
    api_url: str
    env: dict[str, str]
    log: Path


def log_tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def stop(proc: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    """SIGTERM the process group we started (server workers, flow-run children), then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def base_env(home: Path) -> dict[str, str]:
    """The test's environment without any ambient Prefect settings, plus a private Prefect home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_CLI_COLORS="false",
        COLUMNS="200",
    )
    return env


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """`prefect server start` on a free loopback port with its own SQLite database."""
    root = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = base_env(root / "home")
    env.update(
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{root / 'prefect.db'}",
        PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(root / "results"),
    )
    log = root / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=root,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        with httpx.Client(timeout=2.0) as http:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"prefect server exited with {proc.returncode}:\n{log_tail(log)}")
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(f"{api_url}/health").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    pytest.fail(f"prefect server not healthy in time:\n{log_tail(log)}")
                # Wait on the process, not a bare sleep: returns early if it dies.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.25)
        env["PREFECT_API_URL"] = api_url
        yield PrefectServer(api_url=api_url, env=env, log=log)
    finally:
        stop(proc)


def prefect_cli(server: PrefectServer, *args: str, env: dict[str, str] | None = None) -> str:
    """Run a `prefect` command from the project root; fail with its output if it fails."""
    done = subprocess.run(
        [PREFECT, *args],
        env=env or server.env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{output}"
    return output


@contextlib.contextmanager
def prefect_client(server: PrefectServer) -> Iterator[Any]:
    """A sync client of the test server, whatever API this process was pointed at before."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as c:
        yield c


def worker_env(server: PrefectServer, emulator: Any, tmp_path: Path) -> dict[str, str]:
    """What a worker host provides: the Prefect API, Fireworks env vars, AWS env (moto)."""
    env = dict(server.env)
    env.update(
        FIREWORKS_API_KEY=TEST_API_KEY,
        FIREWORKS_BASE_URL=emulator.base_url,
        FLUX_FLOWS_SPILL_DIR=str(tmp_path / "spill"),
    )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        env[name] = os.environ[name]
    env["AWS_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL"]
    return env


def run_worker_once(env: dict[str, str], log: Path) -> int:
    """One poll of the pool; returns when the runs it picked up have finished (or times out)."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", POOL, "--type", "process", "--run-once"],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        return proc.wait(timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"worker did not finish in {WORKER_TIMEOUT_S}s:\n{log_tail(log)}")
    finally:
        stop(proc)
