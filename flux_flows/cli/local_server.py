"""The CLI's own Prefect server: started once in the background, reused by every later command.

Prefect's temporary server creates and migrates a fresh database on every process start and gives
up after 20 s, which a 2-core machine does not always meet (issue 13). A command-line tool owns its
process, so when the user has configured no Prefect API it runs `prefect server start` (Prefect's
own server, not a home-made one) detached, on loopback, under the user's PREFECT_HOME, and later
commands find it through a small state file and pay nothing for start-up. The user sees and stops
it with `flux-flows server status|stop`.

Loopback is shared by every local user, so nothing is taken on trust (issue 28):

- The server admits only its user: it runs with Prefect's own API auth
  (`PREFECT_SERVER_API_AUTH_STRING`), the secret random per PREFECT_HOME and kept in a 0600 file
  in a 0700 folder; the CLI's calls carry it as `PREFECT_API_AUTH_STRING`.
- A process is ours only if its pid, its start time (so a reused pid is not) and, where /proc
  shows it, a per-start token in its environment all match what we recorded when we launched
  it. Nothing else is ever signalled, whatever its command line says.
- A port is ours only if our process holds the listening socket (/proc/net/tcp, or lsof), and
  Prefect there refuses a request without the secret and accepts it with it. The secret is sent
  only to a socket our process holds (where neither /proc nor lsof can tell, only to a server that
  first refused us without it); a server that answers a protected route without the secret is
  someone else's, and gets nothing: the CLI starts its own on another port.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import stat
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
SECRET_DIR = "flux-flows"  # 0700, under PREFECT_HOME
SECRET_FILE = "server-auth-string"  # 0600: the server's PREFECT_SERVER_API_AUTH_STRING
TOKEN_ENV = "FLUX_FLOWS_SERVER_TOKEN"  # per start, in the server's environment (never argv)
TIMEOUT_ENV = "FLUX_FLOWS_SERVER_TIMEOUT"
# A fresh database takes ~30 s to migrate on 2 busy cores; leave room for a slower machine.
DEFAULT_TIMEOUT_S = 180.0
LAUNCH_ATTEMPTS = 3  # a port taken by someone else between our choice and Prefect's bind
_POLL_S = 0.25
# Prefect's auth middleware guards every API route but /health and /ready: this one proves it.
_PROTECTED = "/flow_runs/filter"


class ServerStartError(RuntimeError):
    """The local Prefect server did not answer in time; the message says where its log is."""


class InsecureSecretError(ServerStartError):
    """The secret's file or folder is not private to this user; the message names it."""


@dataclass(frozen=True)
class LocalServer:
    """Where the background server listens, and what proves its process is the one we started."""

    pid: int
    port: int
    home: Path
    started: str = ""  # the process's start time (/proc/<pid>/stat field 22, or ps lstart)
    token: str = ""  # random per start, in the process's environment as FLUX_FLOWS_SERVER_TOKEN

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


# --- The secret -------------------------------------------------------------------------------


def secret_path(home: Path) -> Path:
    """Where the server's auth string is kept: <PREFECT_HOME>/flux-flows/server-auth-string."""
    return home / SECRET_DIR / SECRET_FILE


def _private_folder(folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise InsecureSecretError(f"{folder} is not a folder of yours; move it away and retry")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(folder, 0o700)


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


def _read_secret(path: Path) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a symbolic link (ELOOP) or worse
        raise InsecureSecretError(f"{path} is not a plain file of yours ({exc})") from exc
    with os.fdopen(fd) as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise InsecureSecretError(f"{path} is not a plain file of yours; delete it")
        if info.st_mode & 0o077:
            raise InsecureSecretError(
                f"{path} is readable by other users, so the local Prefect server's secret may be "
                "known: delete the file (a new secret is made) and run `flux-flows server stop`"
            )
        secret = handle.read().strip()
    if not secret:
        raise InsecureSecretError(f"{path} is empty; delete it (a new secret is made)")
    return secret


def auth_secret(home: Path, *, create: bool = True) -> str | None:
    """The local server's auth string: random, made on first use, private to this user.

    None only when `create` is False and there is none yet.
    """
    folder = home / SECRET_DIR
    _private_folder(folder)
    path = folder / SECRET_FILE
    secret = _read_secret(path)
    if secret is not None or not create:
        return secret
    draft = folder / f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
        with contextlib.suppress(FileExistsError):  # another command made one first: use it
            os.link(draft, path)  # atomic, never replaces
    finally:
        draft.unlink(missing_ok=True)
    return _read_secret(path)


def auth_headers(secret: str) -> dict[str, str]:
    """The header Prefect's client and UI send for an auth string (Basic, the string base64'd)."""
    return {"Authorization": "Basic " + base64.b64encode(secret.encode()).decode()}


# --- Is that process ours? ----------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """When `pid` started: field 22 of /proc/<pid>/stat (ticks since boot), else `ps -o lstart`.

    A pid can be reused; a pid together with its start time names one process.
    """
    if Path("/proc/self/stat").exists():
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except OSError:  # gone
            return None
        fields = raw.rsplit(")", 1)[1].split()  # the name (field 2) may hold spaces and ')'
        if fields[0] in ("Z", "X"):  # a zombie is no server
            return None
        return fields[19]  # fields[0] is field 3
    if shutil.which("ps") is None:  # pragma: no cover - neither /proc nor ps
        return None
    done = subprocess.run(
        ["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or None


def _has_token(pid: int, token: str) -> bool | None:
    """Whether the process was started with our per-start token; None where /proc cannot say."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except FileNotFoundError:
        return None if not Path("/proc/self/environ").exists() else False
    except OSError:  # not ours to read: someone else's process
        return False
    return f"{TOKEN_ENV}={token}".encode() in environ.split(b"\0")


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):  # our own child: reap it, or it lingers
        os.waitpid(pid, os.WNOHANG)


def is_ours(server: LocalServer) -> bool:
    """The recorded process is alive and is the very one we started: pid, start time, token."""
    _reap(server.pid)
    if not server.started or not server.token:
        return False  # a state file from before issue 28, or a damaged one: proves nothing
    if _start_time(server.pid) != server.started:
        return False
    return _has_token(server.pid, server.token) is not False


# --- Is that port ours? ------------------------------------------------------------------------


class Port(enum.Enum):
    OURS = "ours"  # our process holds the listening socket
    FOREIGN = "foreign"  # someone else listens there
    FREE = "free"  # nobody listens (yet); with lsof: our process does not listen (yet)
    UNKNOWN = "unknown"  # neither /proc nor lsof can tell


def _covers_host(hex_address: str) -> bool:
    """Whether a /proc/net/tcp{,6} local address receives connections to 127.0.0.1."""
    words = [int(hex_address[i : i + 8], 16) for i in range(0, len(hex_address), 8)]
    raw = b"".join(word.to_bytes(4, sys.byteorder) for word in words)
    address = ipaddress.ip_address(raw)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is None:
            return address == ipaddress.IPv6Address("::")  # dual-stack wildcard
        address = address.ipv4_mapped
    return str(address) in (HOST, "0.0.0.0")


def _listening_inodes(port: int) -> set[str] | None:
    """Inodes of the sockets listening where a connection to 127.0.0.1:port would land."""
    inodes: set[str] = set()
    found = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        found = True
        for line in lines:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port and _covers_host(address):
                inodes.add(fields[9])
    return inodes if found else None


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def _port_holder(server: LocalServer) -> Port:
    listening = _listening_inodes(server.port)
    if listening is not None:
        if not listening:
            return Port.FREE
        return Port.OURS if listening <= _socket_inodes(server.pid) else Port.FOREIGN
    lsof = shutil.which("lsof")  # macOS and other systems without /proc
    if lsof is None:
        return Port.UNKNOWN
    done = subprocess.run(
        [lsof, "-nP", "-a", "-p", str(server.pid), f"-iTCP:{server.port}", "-sTCP:LISTEN", "-t"],
        capture_output=True,
        text=True,
        check=False,
    )
    # Our process listening on 127.0.0.1:port means nobody else can (no SO_REUSEPORT there).
    # Otherwise ours has not bound yet, and whoever may answer there is not to be trusted.
    return Port.OURS if str(server.pid) in done.stdout.split() else Port.FREE


class Verdict(enum.Enum):
    READY = "ready"  # ours, and it accepts our secret
    STARTING = "starting"  # nothing answers yet
    FOREIGN = "foreign"  # someone else answers there: send it nothing
    WRONG_SECRET = "wrong secret"  # our process, but it was started with another secret


def probe(server: LocalServer, secret: str, timeout: float = 5.0) -> Verdict:
    """Whether `server` is ours and ready, sending the secret only once that is proven."""
    holder = _port_holder(server)
    if holder is Port.FOREIGN:
        return Verdict.FOREIGN
    if holder is Port.FREE:
        return Verdict.STARTING
    # No environment proxy: the secret must not travel through one.
    with httpx.Client(base_url=server.api_url, timeout=timeout, trust_env=False) as client:
        try:
            bare = client.post(_PROTECTED, json={"limit": 1})
        except httpx.HTTPError:
            return Verdict.STARTING
        if bare.status_code != 401:  # answers without the secret: not a server of ours
            return Verdict.FOREIGN
        try:
            signed = client.post(_PROTECTED, json={"limit": 1}, headers=auth_headers(secret))
        except httpx.HTTPError:
            return Verdict.STARTING
    if signed.status_code == 200:
        return Verdict.READY
    if signed.status_code == 401:
        return Verdict.WRONG_SECRET
    return Verdict.STARTING


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
    started = _start_time(process.pid) or ""  # fork time: set before Popen returns
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
