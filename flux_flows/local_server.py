"""The CLI's own Prefect server: started once in the background, reused by every later command.

Prefect's temporary server creates and migrates a fresh database on every process start and gives
up after 20 s, which a 2-core machine does not always meet (issue 13). A command-line tool owns its
process, so when the user has configured no Prefect API it runs `prefect server start` (Prefect's
own server, not a home-made one) detached, on loopback, under the user's PREFECT_HOME, and later
commands find it through a small state file and pay nothing for start-up. The user sees and stops
it with `flux-flows server status|stop`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

HOST = "127.0.0.1"
PREFERRED_PORT = 4200  # Prefect's own default, so the UI is where Prefect users look for it
STATE_FILE = "flux-flows-server.json"
LOG_FILE = "flux-flows-server.log"
LOCK_FILE = "flux-flows-server.lock"
TIMEOUT_ENV = "FLUX_FLOWS_SERVER_TIMEOUT"
# A fresh database takes ~30 s to migrate on 2 busy cores; leave room for a slower machine.
DEFAULT_TIMEOUT_S = 180.0
_POLL_S = 0.25


class ServerStartError(RuntimeError):
    """The local Prefect server did not answer in time; the message says where its log is."""


@dataclass(frozen=True)
class LocalServer:
    """Where the background server listens, and the process to stop."""

    pid: int
    port: int
    home: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @property
    def log_path(self) -> Path:
        return self.home / LOG_FILE


def prefect_home() -> Path:
    """The user's PREFECT_HOME, as Prefect itself resolves it (env, profile or ~/.prefect)."""
    from prefect.settings import get_current_settings

    return Path(get_current_settings().home).expanduser()


def configured_api_url() -> str | None:
    """The API the user chose (env var or active profile), or None for Prefect's temporary one."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


def start_timeout() -> float:
    """Seconds to wait for a starting server: FLUX_FLOWS_SERVER_TIMEOUT, else 180."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def _pid_alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):  # our own child: reap it, or it lingers
        os.waitpid(pid, os.WNOHANG)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's: not ours to reuse
        return False
    return _is_prefect_server(pid)


def _is_prefect_server(pid: int) -> bool:
    """After a reboot the recorded pid may belong to anything: check what it runs, where we can."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): the health check still guards reuse
    return b"prefect" in cmdline and b"server" in cmdline


def _healthy(server: LocalServer, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(f"{server.api_url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def read_state(home: Path) -> LocalServer | None:
    """The server a previous command started, if its process is still alive."""
    try:
        data = json.loads((home / STATE_FILE).read_text())
        server = LocalServer(pid=int(data["pid"]), port=int(data["port"]), home=home)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return server if _pid_alive(server.pid) else None


def _free_port() -> int:
    """Prefect's usual 4200 when it is free, else any free loopback port."""
    for port in (PREFERRED_PORT, 0):
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise OSError("no free port on 127.0.0.1")  # pragma: no cover - port 0 always binds


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """One starter at a time: two commands launched together share one server."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _launch(home: Path) -> LocalServer:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_API_HOST=HOST,
    )
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST]
    command += ["--port", str(port)]
    with open(home / LOG_FILE, "ab") as log:
        process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command and ignores its Ctrl-C
            cwd=home,
        )
    server = LocalServer(pid=process.pid, port=port, home=home)
    (home / STATE_FILE).write_text(json.dumps({"pid": server.pid, "port": server.port}))
    return server


def _wait(server: LocalServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _healthy(server):
            return
        if not _pid_alive(server.pid):
            raise ServerStartError(
                f"the local Prefect server exited while starting; see its log: {server.log_path}"
            )
        time.sleep(_POLL_S)
    raise ServerStartError(
        f"the local Prefect server did not answer within {timeout:.0f} s (log: "
        f"{server.log_path}). Wait for it and try again, raise {TIMEOUT_ENV}, or point "
        "PREFECT_API_URL at a Prefect server of your own."
    )


def ensure_server(
    home: Path,
    *,
    timeout: float,
    waiting: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext,
) -> LocalServer:
    """The running server under `home`, started (and waited for) if there is none.

    `waiting` wraps only a wait, so the CLI can show why it pauses (a status line).
    """
    with _locked(home):
        server = read_state(home)
        if server is not None and _healthy(server):
            return server
        with waiting():
            if server is None:
                server = _launch(home)
            _wait(server, timeout)
        return server


def stop_server(home: Path, *, timeout: float = 15.0) -> LocalServer | None:
    """Stop the background server under `home`; None when none was running."""
    with _locked(home):
        server = read_state(home)
        (home / STATE_FILE).unlink(missing_ok=True)
        if server is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(server.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _pid_alive(server.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
        return server
