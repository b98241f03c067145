"""Helpers of tests/test_fleet.py: CLI runs as subprocesses, a delaying HTTP proxy, a skewed clock.

Everything here is test machinery: nothing in `flux_flows` imports it.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# --------------------------------------------------------------------------------------------
# CLI runs as subprocesses
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One `flux-flows run` process: its own process group, its output in a file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    started: float
    ended: float | None = None
    killed_at: float | None = None

    def poll(self) -> int | None:
        code = self.process.poll()
        if code is not None and self.ended is None:
            self.ended = time.monotonic()
        return code

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.poll()

    @property
    def wall_s(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def output(self) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, chars: int = 3000) -> str:
        return f"--- {self.name} (pid {self.pid}, exit {self.poll()}) ---\n{self.output()[-chars:]}"

    def kill(self) -> None:
        """SIGKILL the run's whole process group and reap its leader (so its PID is gone)."""
        self.killed_at = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.poll()


def cli_argv(prompts: Path, dest: str, concurrency: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flux_flows.cli",
        "run",
        str(prompts),
        "--to",
        dest,
        "-c",
        str(concurrency),
    ]


class Fleet:
    """The runs one test starts; `close` kills any still running (only those, by group)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.runs: list[Run] = []

    def start(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        *,
        prefix: Iterable[str] = (),
    ) -> Run:
        log = self.tmp_path / f"{name}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [*prefix, *argv],
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        run = Run(name, process, log, time.monotonic())
        self.runs.append(run)
        return run

    def tails(self) -> str:
        return "\n".join(r.tail() for r in self.runs)

    def wait_until(self, condition: Callable[[], bool], timeout_s: float, what: str) -> float:
        """Poll `condition` (and the runs) until it holds; seconds it took. Fails at the deadline."""
        start = time.monotonic()
        deadline = start + timeout_s
        while True:
            for run in self.runs:
                run.poll()
            if condition():
                return time.monotonic() - start
            assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}\n" + (
                self.tails()
            )
            time.sleep(0.05)

    def wait_alive_until(
        self, condition: Callable[[], bool], timeout_s: float, what: str, alive: list[Run]
    ) -> float:
        """As `wait_until`, failing at once if one of `alive` exits first."""

        def check() -> bool:
            if condition():
                return True
            ended = [r.name for r in alive if r.poll() is not None]
            assert not ended, f"{ended} ended before: {what}\n" + self.tails()
            return False

        return self.wait_until(check, timeout_s, what)

    def finish(self, runs: list[Run], timeout_s: float) -> float:
        return self.wait_until(
            lambda: all(r.poll() is not None for r in runs),
            timeout_s,
            f"{[r.name for r in runs]} exit",
        )

    def close(self) -> None:
        for run in self.runs:
            if run.poll() is None:
                run.kill()


@contextlib.contextmanager
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    runs = Fleet(tmp_path)
    try:
        yield runs
    finally:
        runs.close()


# --------------------------------------------------------------------------------------------
# A delaying HTTP proxy
# --------------------------------------------------------------------------------------------

# Hold = (method, path, body) -> seconds to hold that request before forwarding it, or None.
Hold = Callable[[str, str, bytes], float | None]
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
}


@dataclass
class Held:
    method: str
    path: str
    received: float
    forwarded: float | None = None
    dropped: bool = False
    status: int | None = None  # the upstream's answer


def _read_chunked(stream: Any) -> bytes:
    body = bytearray()
    while True:
        size = int(stream.readline().split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while stream.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return bytes(body)
        body += stream.read(size)
        stream.readline()


def _client_gone(sock: socket.socket) -> bool:
    """True if the client closed its connection (a killed process) while its request was held."""
    with contextlib.suppress(OSError):
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    return True


@dataclass
class DelayingProxy:
    """A threaded HTTP/1.1 forwarder to `target` that holds the requests `hold` picks.

    A held request waits `hold(...)` seconds, or less if `release` is set, then is forwarded as
    it came (headers, Host and body unchanged, so a signed S3 request stays valid); a request
    whose client went away while held (a killed run) is dropped, never forwarded. Answers are
    passed back as they came, the upstream's own `Date` included (S3 ages are judged by it).
    With `hold_answers`, the request is forwarded at once and its answer is held instead (the
    write has landed; its writer hears so late).
    """

    target: str
    hold: Hold
    hold_answers: bool = False
    release: threading.Event = field(default_factory=threading.Event)
    held: list[Held] = field(default_factory=list)
    first_held: threading.Event = field(default_factory=threading.Event)
    forwarded: int = 0

    def __post_init__(self) -> None:
        parts = urlsplit(self.target)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: no keep-alive to relay

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _relay(self) -> None:
                proxy._relay(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _relay(self, handler: BaseHTTPRequestHandler) -> None:
        if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = _read_chunked(handler.rfile)
        else:
            body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        delay = self.hold(handler.command, handler.path, body)
        record: Held | None = None
        if delay:
            record = Held(handler.command, handler.path, time.monotonic())
            with self._lock:
                self.held.append(record)
            self.first_held.set()
            if not self.hold_answers:
                self.release.wait(delay)
                if _client_gone(handler.connection):
                    record.dropped = True
                    return
            record.forwarded = time.monotonic()
        upstream = http.client.HTTPConnection(*self._upstream, timeout=300)
        try:
            upstream.putrequest(
                handler.command, handler.path, skip_host=True, skip_accept_encoding=True
            )
            for name, value in handler.headers.items():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    upstream.putheader(name, value)
            if body or handler.command in ("PUT", "POST"):
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body or None)
            answer = upstream.getresponse()
            data = answer.read()
            if record is not None:
                record.status = answer.status
                if self.hold_answers:
                    self.release.wait(delay or 0)
            handler.send_response_only(answer.status, answer.reason)
            for name, value in answer.getheaders():
                lower = name.lower()
                if lower in _HOP_BY_HOP or (
                    lower == "content-length" and handler.command != "HEAD"
                ):
                    continue
                handler.send_header(name, value)
            if handler.command != "HEAD":
                handler.send_header("Content-Length", str(len(data)))
            handler.send_header("Connection", "close")
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(data)
            with self._lock:
                self.forwarded += 1
        except OSError:
            return  # the client or the upstream went away: nothing to answer
        finally:
            upstream.close()

    def close(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()


@contextlib.contextmanager
def delaying_proxy(
    target: str, hold: Hold, *, hold_answers: bool = False
) -> Iterator[DelayingProxy]:
    proxy = DelayingProxy(target, hold, hold_answers=hold_answers)
    try:
        yield proxy
    finally:
        proxy.close()


# --------------------------------------------------------------------------------------------
# A skewed clock in a child process
# --------------------------------------------------------------------------------------------

SITECUSTOMIZE = '''"""Shift this process's time.time by FLEET_CLOCK_OFFSET_S (tests/test_fleet.py)."""
import os
import time

_offset = float(os.environ.get("FLEET_CLOCK_OFFSET_S") or 0)
if _offset:
    _real_time, _real_time_ns = time.time, time.time_ns
    time.time = lambda: _real_time() + _offset
    time.time_ns = lambda: _real_time_ns() + int(_offset * 1e9)
    _marker = os.environ.get("FLEET_CLOCK_MARKER")
    if _marker:
        with open(f"{_marker}.{os.getpid()}", "w", encoding="utf-8") as _handle:
            _handle.write(f"{time.time()} {_real_time()}")
'''


def skewed_clock_env(folder: Path, offset_s: float) -> dict[str, str]:
    """Env additions that run a child with `time.time` shifted by `offset_s`; each process that
    applies it writes `<folder>/applied.<pid>` ("shifted real")."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    path = os.environ.get("PYTHONPATH")
    return {
        "PYTHONPATH": f"{folder}{os.pathsep}{path}" if path else str(folder),
        "FLEET_CLOCK_OFFSET_S": str(offset_s),
        "FLEET_CLOCK_MARKER": str(folder / "applied"),
    }


def applied_offset(folder: Path, pid: int) -> float | None:
    """The shift process `pid` applied to its own clock, or None if it applied none."""
    marker = folder / f"applied.{pid}"
    if not marker.is_file():
        return None
    shifted, real = (float(x) for x in marker.read_text(encoding="utf-8").split())
    return shifted - real
