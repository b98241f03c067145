"""The CLI's own Prefect server trusts nothing on loopback (issue 28).

A stale state file whose pid now names another process gets that process neither reported nor
signalled; a server someone else put on the chosen port gets no request carrying a prompt or the
secret; the real server refuses a request without the secret; the secret is private; and
`flux-flows server env` points Prefect's own CLI at the server.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from flux_flows.cli import local_server
from helpers.common import PREFECT_START_TIMEOUT_S, TEST_API_KEY

PROMPT = "a secret heron at dawn, do not leak"


def _env(home: Path, **extra: str) -> dict[str, str]:
    """A CLI environment with no Prefect API configured: the CLI uses its own server."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING")
    }
    env.update(PREFECT_HOME=str(home), COLUMNS="200", **extra)
    return env


def cli(*args: str, env: dict[str, str], patch: str = "") -> subprocess.CompletedProcess[str]:
    """`flux-flows ARGS` in a fresh interpreter; `patch` runs first (to force a port choice)."""
    script = f"import sys\n{patch}\nfrom flux_flows.cli import main\nsys.argv = {['flux-flows', *args]!r}\nmain()\n"
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=PREFECT_START_TIMEOUT_S + 120,
    )


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


# --- A stale state file: the pid now names someone else's "prefect server" -------------------


@pytest.fixture
def decoy() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process whose command line says "prefect server", leading its own group
    (as a shell job does), so a group signal would reach it."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", "prefect", "server", "start"],
        start_new_session=True,
    )
    yield process
    process.kill()
    process.wait(timeout=10)


@pytest.mark.parametrize("recorded", ["pid and port only", "another start time", "no token"])
def test_a_stale_state_file_never_names_nor_stops_a_foreign_process(
    tmp_path: Path, decoy: subprocess.Popen[bytes], recorded: str
) -> None:
    state: dict[str, object] = {"pid": decoy.pid, "port": 4200}
    if recorded == "another start time":
        state |= {"started": "1", "token": "f" * 32}
    elif recorded == "no token":  # the decoy's own start time: only the token tells it apart
        state |= {"started": local_server._start_time(decoy.pid), "token": "f" * 32}
    home = tmp_path / "home"
    home.mkdir()
    (home / local_server.STATE_FILE).write_text(json.dumps(state))
    env = _env(home)

    status = cli("server", "status", env=env)
    assert status.returncode == 0, status.stderr
    assert "No local Prefect server is running" in status.stdout, status.stdout

    stop = cli("server", "stop", env=env)
    assert stop.returncode == 0, stop.stderr
    assert "No local Prefect server was running" in stop.stdout, stop.stdout
    assert decoy.poll() is None and running(decoy.pid)
    assert not (home / local_server.STATE_FILE).exists()  # stale: removed, its pid left alone


# --- The secret's file ---------------------------------------------------------------------


def test_the_secret_is_made_once_in_a_private_folder(tmp_path: Path) -> None:
    (tmp_path / local_server.SECRET_DIR).mkdir(mode=0o755)  # loose already: tightened
    os.chmod(tmp_path / local_server.SECRET_DIR, 0o755)
    secret = local_server.auth_secret(tmp_path)
    path = local_server.secret_path(tmp_path)
    assert secret and len(secret) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert local_server.auth_secret(tmp_path) == secret  # per home, kept
    assert local_server.auth_secret(tmp_path / "other") != secret


def test_a_secret_others_could_read_is_refused(tmp_path: Path) -> None:
    local_server.auth_secret(tmp_path)
    path = local_server.secret_path(tmp_path)
    os.chmod(path, 0o644)
    with pytest.raises(local_server.InsecureSecretError, match="readable by other users"):
        local_server.auth_secret(tmp_path)
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(local_server.InsecureSecretError, match="not a plain file"):
        local_server.auth_secret(tmp_path)


# --- A squatter on the chosen port, then the real server ------------------------------------


@dataclass
class Squatter:
    """A local server answering everything 200 without asking for any secret; it keeps what
    it receives."""

    received: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    port: int = 0
    # Just enough of Prefect for a client to go on to create a flow run (and send its prompt).
    answers: dict[str, bytes] = field(
        default_factory=lambda: {
            "/api/admin/version": b'"3.9.1"',
            "/api/csrf-token": json.dumps(
                {"token": "t", "client": "c", "expiration": "2100-01-01T00:00:00Z"}
            ).encode(),
            "/api/flows/": json.dumps(
                {"id": "6f1b0d84-47a4-4c4e-9c8b-3f3c2f9a1a11", "name": "generate-images"}
            ).encode(),
        }
    )

    def handler(self) -> type[BaseHTTPRequestHandler]:
        squatter = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                squatter.received.append((self.command, self.path, dict(self.headers), body))
                payload = squatter.answers.get(self.path.split("?")[0], b"{}")
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _answer

            def log_message(self, *args: object) -> None:
                pass

        return Handler


@dataclass
class Started:
    home: Path
    env: dict[str, str]
    run: subprocess.CompletedProcess[str]
    squatter: Squatter
    state: dict[str, object]

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.state['port']}/api"


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Started]:
    """A first run whose chosen port someone else bound before Prefect could: the CLI must give
    that squatter nothing and start its server elsewhere. The server then serves the tests below."""
    from flux_flows.emulator import Emulator, EmulatorConfig

    home = tmp_path_factory.mktemp("home")
    squatter = Squatter()
    http = ThreadingHTTPServer(("127.0.0.1", 0), squatter.handler())
    squatter.port = http.server_address[1]
    threading.Thread(target=http.serve_forever, daemon=True).start()
    # The port choice is forced to the squatter's on the first launch only: the race, won by it.
    patch = textwrap.dedent(
        f"""
        import flux_flows.cli.local_server as ls
        _chosen, _real = [{squatter.port}], ls._free_port
        ls._free_port = lambda: _chosen.pop() if _chosen else _real()
        """
    )
    with Emulator(EmulatorConfig(api_key=TEST_API_KEY)) as emulator:
        env = _env(
            home,
            FIREWORKS_API_KEY=TEST_API_KEY,
            FIREWORKS_BASE_URL=emulator.base_url,
            FLUX_FLOWS_SPILL_DIR=str(home / "spill"),
        )
        out = str(home / "out")
        run = cli("run", "-p", PROMPT, "--to", out, env=env, patch=patch)
        state_path = home / local_server.STATE_FILE
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        try:
            yield Started(home=home, env=env, run=run, squatter=squatter, state=state)
        finally:
            stopped = cli("server", "stop", env=env)
            http.shutdown()
            http.server_close()
    assert stopped.returncode == 0 and "Stopped" in stopped.stdout, stopped.stdout
    assert not state or not running(int(state["pid"]))  # type: ignore[call-overload]


def test_a_squatter_on_the_chosen_port_gets_nothing(started: Started) -> None:
    for method, path, headers, body in started.squatter.received:
        assert PROMPT.encode() not in body, (method, path, body[:200])
        assert not any(k.lower() == "authorization" for k in headers), (method, path)
    # Where /proc shows who holds the port (here), the squatter is not even asked anything.
    assert started.squatter.received == []
    assert started.run.returncode == 0, started.run.stderr[-3000:]
    assert started.state["port"] != started.squatter.port  # started on another port
    assert f"127.0.0.1:{started.state['port']}/runs/flow-run/" in started.run.stdout


def test_the_server_refuses_requests_without_its_secret(started: Started) -> None:
    secret = local_server.auth_secret(started.home)
    assert secret
    url = f"{started.api}/flow_runs/filter"
    bare = httpx.post(url, json={"limit": 1}, timeout=30)
    assert bare.status_code in (401, 403), bare.text
    wrong = base64.b64encode(b"not-the-secret").decode()
    guess = httpx.post(url, json={"limit": 1}, headers={"Authorization": f"Basic {wrong}"})
    assert guess.status_code in (401, 403), guess.text
    token = base64.b64encode(secret.encode()).decode()
    signed = httpx.post(
        url, json={"limit": 5}, headers={"Authorization": f"Basic {token}"}, timeout=30
    )
    assert signed.status_code == 200, signed.text
    assert len(signed.json()) == 1  # the run above, recorded on this server


def test_the_secret_stays_private(started: Started) -> None:
    path = local_server.secret_path(started.home)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    secret = path.read_text().strip()
    # Not in the server's command line (anyone may read that), nor in the state file.
    argv = Path(f"/proc/{started.state['pid']}/cmdline").read_bytes()
    assert secret.encode() not in argv
    assert secret not in (started.home / local_server.STATE_FILE).read_text()
    # The database and the log hold every prompt and destination: the user's alone.
    assert stat.S_IMODE(started.home.stat().st_mode) == 0o700
    for name in ("prefect.db", local_server.LOG_FILE):
        assert stat.S_IMODE((started.home / name).stat().st_mode) == 0o600, name


def test_status_says_how_to_log_in_to_the_ui(started: Started) -> None:
    done = cli("server", "status", env=started.env)
    assert done.returncode == 0, done.stderr
    assert f"pid {started.state['pid']}" in done.stdout
    assert "not answering" not in done.stdout
    assert "password" in done.stdout
    assert str(local_server.secret_path(started.home)) in done.stdout.replace("\n", "")
    assert local_server.auth_secret(started.home) not in done.stdout  # named, not shown


def test_server_env_points_prefects_own_cli_at_the_server(started: Started) -> None:
    done = cli("server", "env", env=started.env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"export PREFECT_API_URL={started.api}"
    flux_flows = [sys.executable, "-m", "flux_flows.cli"]
    command = (
        f'eval "$({" ".join(flux_flows)} server env)" && {sys.executable} -m prefect work-pool ls'
    )
    listed = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, env=started.env, timeout=120
    )
    assert listed.returncode == 0, listed.stdout + listed.stderr
