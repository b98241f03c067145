"""The CLI's own Prefect server: started once in the background, reused by every later command.

Prefect's temporary server creates and migrates a fresh database on every process start and gives
up after 20 s, which a 2-core machine does not always meet (issue 13). A command-line tool owns its
process, so when the user has configured no Prefect API it runs `prefect server start` (Prefect's
own server, not a home-made one) detached, on loopback, under the user's PREFECT_HOME, and later
commands find it through a small state file and pay nothing for start-up. The user sees and stops
it with `flux-flows server status|stop`.

Loopback is shared by every local user, so nothing is taken on trust (issue 28): what proves
a server and its process are ours, and the secret it admits, are in `server_identity`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from flux_flows.cli.server_identity import (
    HOST,
    LOG_FILE,
    SECRET_DIR,
    TOKEN_ENV,
    InsecureSecretError,
    LocalServer,
    ServerStartError,
    Verdict,
    auth_headers,
    auth_secret,
    is_ours,
    probe,
    process_start_time,
    secret_path,
)

# The identity's names stay importable from here, where the CLI and tests find them.
__all__ = [
    "HOST",
    "LOG_FILE",
    "SECRET_DIR",
    "STATE_FILE",
    "InsecureSecretError",
    "LocalServer",
    "ServerStartError",
    "Verdict",
    "auth_headers",
    "auth_secret",
    "configured_api_url",
    "ensure_server",
    "is_ours",
    "prefect_home",
    "probe",
    "read_state",
    "secret_path",
    "shell_env",
    "start_timeout",
    "stop_server",
]
_start_time = process_start_time  # its name before the split, which tests still use

PREFERRED_PORT = 4200  # Prefect's own default, so the UI is where Prefect users look for it
STATE_FILE = "flux-flows-server.json"
LOCK_FILE = "flux-flows-server.lock"
TIMEOUT_ENV = "FLUX_FLOWS_SERVER_TIMEOUT"
# A fresh database takes ~30 s to migrate on 2 busy cores; leave room for a slower machine.
DEFAULT_TIMEOUT_S = 180.0
LAUNCH_ATTEMPTS = 3  # a port taken by someone else between our choice and Prefect's bind
_POLL_S = 0.25


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


# --- State, lock, launch, stop -----------------------------------------------------------------


def _load_state(home: Path) -> LocalServer | None:
    try:
        data = json.loads((home / STATE_FILE).read_text())
        return LocalServer(
            pid=int(data["pid"]),
            port=int(data["port"]),
            home=home,
            started=str(data.get("started") or ""),
            token=str(data.get("token") or ""),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def read_state(home: Path) -> LocalServer | None:
    """The server a previous command started, if that very process is still alive."""
    server = _load_state(home)
    return server if server is not None and is_ours(server) else None


def _write_state(server: LocalServer) -> None:
    path = server.home / STATE_FILE
    draft = path.with_name(f".{STATE_FILE}.{os.getpid()}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        state = {"pid": server.pid, "port": server.port, "started": server.started}
        handle.write(json.dumps({**state, "token": server.token}))
    os.replace(draft, path)


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


def _keep_private(home: Path) -> None:
    """The server's database and log (every prompt, destination and parameter) are the user's
    alone: a home folder of ours is made 0700 and the files already in it 0600."""
    with contextlib.suppress(OSError):
        if os.lstat(home).st_uid != os.getuid():
            return
        os.chmod(home, 0o700)
        for name in ("prefect.db", "prefect.db-wal", "prefect.db-shm", LOG_FILE):
            path = home / name
            if path.is_file() and not path.is_symlink():
                os.chmod(path, 0o600)


def _launch(home: Path, secret: str) -> LocalServer:
    port = _free_port()
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_API_HOST=HOST,
        PREFECT_SERVER_API_AUTH_STRING=secret,  # the environment: argv is readable by anyone
        PREFECT_API_AUTH_STRING=secret,
        **{TOKEN_ENV: token},
    )
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST]
    command += ["--port", str(port)]
    _keep_private(home)
    log_fd = os.open(home / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(log_fd, "ab") as log:
        process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command and ignores its Ctrl-C
            cwd=home,
            umask=0o077,  # its database holds every prompt and destination: the user's only
        )
    started = process_start_time(process.pid) or ""  # fork time: set before Popen returns
    server = LocalServer(pid=process.pid, port=port, home=home, started=started, token=token)
    _write_state(server)
    return server


def _anyone_listens(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2.0)
        return sock.connect_ex((HOST, port)) == 0


class _PortTaken(Exception):
    """Someone else listens on the port chosen for our server: start it on another one."""


def _wait(server: LocalServer, secret: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        verdict = probe(server, secret)
        if verdict is Verdict.READY:
            return
        if verdict is Verdict.FOREIGN:
            raise _PortTaken
        if verdict is Verdict.WRONG_SECRET:
            raise ServerStartError(
                f"the local Prefect server (pid {server.pid}) refuses the secret in "
                f"{secret_path(server.home)}; run `flux-flows server stop` and retry"
            )
        if not is_ours(server):
            if _anyone_listens(server.port):  # it could not bind: someone was there first
                raise _PortTaken
            raise ServerStartError(
                f"the local Prefect server exited while starting; see its log: {server.log_path}"
            )
        time.sleep(_POLL_S)  # a poll interval: the loop's deadline bounds the wait
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

    The server returned has proven it is ours (see `probe`): only then may the caller send it
    the secret (`auth_secret`) and anything else. `waiting` wraps only a wait, so the CLI can
    show why it pauses (a status line).
    """
    with _locked(home):
        secret = auth_secret(home)
        assert secret is not None
        server = read_state(home)
        if server is not None:
            verdict = probe(server, secret)
            if verdict is Verdict.READY:
                return server
            if verdict is not Verdict.STARTING:  # its port is someone else's, or its secret old
                _stop(server)
                server = None
        deadline = time.monotonic() + timeout
        with waiting():
            for _ in range(LAUNCH_ATTEMPTS):
                if server is None:
                    server = _launch(home, secret)
                try:
                    _wait(server, secret, max(deadline - time.monotonic(), _POLL_S))
                    return server
                except _PortTaken:
                    _stop(server)
                    server = None
        raise ServerStartError(
            f"someone else kept taking the port chosen for the local Prefect server "
            f"({LAUNCH_ATTEMPTS} tries); point PREFECT_API_URL at a Prefect server of your own"
        )


def _signal(server: LocalServer, signum: int) -> bool:
    """Signal the process only if it is still the one we started; False when it is not."""
    pidfd = None
    with contextlib.suppress(AttributeError, OSError):  # Linux 5.3+: a handle on that process
        pidfd = os.pidfd_open(server.pid)
    try:
        if not is_ours(server):  # checked after taking the handle: the pid cannot move on
            return False
        with contextlib.suppress(ProcessLookupError):
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, signum)
            else:
                os.kill(server.pid, signum)
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _stop(server: LocalServer, timeout: float = 15.0) -> bool:
    """Stop our server process; False (and nothing signalled) when it is not ours."""
    if not _signal(server, signal.SIGTERM):
        return False
    deadline = time.monotonic() + timeout
    while is_ours(server) and time.monotonic() < deadline:
        time.sleep(0.1)  # a poll interval: the deadline bounds the wait
    _signal(server, signal.SIGKILL)
    return True


def stop_server(home: Path, *, timeout: float = 15.0) -> LocalServer | None:
    """Stop the background server under `home`; None when none of ours was running.

    Only the process we started is signalled: a state file whose pid now names another
    process (after a reboot or a crash) is removed, and that process left alone.
    """
    with _locked(home):
        server = _load_state(home)
        (home / STATE_FILE).unlink(missing_ok=True)
        if server is None or not _stop(server, timeout):
            return None
        return server


def shell_env(server: LocalServer, secret: str) -> str:
    """`export` lines pointing Prefect's own CLI and workers at `server`, for `eval`."""
    import shlex

    return (
        f"export PREFECT_API_URL={shlex.quote(server.api_url)}\n"
        f"export PREFECT_API_AUTH_STRING={shlex.quote(secret)}\n"
    )
