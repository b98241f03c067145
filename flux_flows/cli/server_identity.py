"""What proves the CLI's background Prefect server is ours, and the secret only it admits.

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
import ipaddress
import os
import secrets
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

HOST = "127.0.0.1"
LOG_FILE = "flux-flows-server.log"
SECRET_DIR = "flux-flows"  # 0700, under PREFECT_HOME
SECRET_FILE = "server-auth-string"  # 0600: the server's PREFECT_SERVER_API_AUTH_STRING
TOKEN_ENV = "FLUX_FLOWS_SERVER_TOKEN"  # per start, in the server's environment (never argv)
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


def process_start_time(pid: int) -> str | None:
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
    if process_start_time(server.pid) != server.started:
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
