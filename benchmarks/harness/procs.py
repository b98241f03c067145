"""Child processes of a benchmark: started in their own session, ended by id, waited on.

A benchmark starts servers and one child per contender; all of them must stop on exit, error,
Ctrl-C or SIGTERM, and a child that fails must say why (the tail of its log).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True once a server answers at all (any status below 500)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 500
    except (urllib.error.URLError, OSError, ValueError):
        return False


def http_json(
    url: str, method: str = "GET", timeout: float = 10.0, headers: dict[str, str] | None = None
) -> Any:
    request = urllib.request.Request(
        url, method=method, data=b"" if method == "POST" else None, headers=headers or {}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it if the benchmark dies, even by SIGKILL (Linux).

    The finally-blocks cover Ctrl-C, SIGTERM and errors; this covers the one case they cannot.
    """
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class Processes:
    """Every child a benchmark starts, each in its own session, so all can be ended by id.

    A new session per child means a terminal Ctrl-C reaches only the benchmark, which then
    ends the children itself in order (and also their own children, e.g. the Prefect server's
    workers, through the process group whose id is the child's pid).
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(
        self, name: str, command: Sequence[str], env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        """Start `command` with its output in `<log_dir>/<name>.log` (shown if it fails)."""
        log = (self.log_dir / f"{name}.log").open("ab")
        try:
            proc = subprocess.Popen(
                list(command),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                cwd=str(REPO),
                preexec_fn=_die_with_parent,
            )
        finally:
            log.close()
        self._children.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        """SIGTERM to the child's group, then SIGKILL if it lingers; never a broad kill."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        # The leader may be gone while grandchildren of its group live on.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for _name, proc in reversed(self._children):
            with contextlib.suppress(Exception):
                self.stop(proc)
        self._children.clear()

    def finish(
        self, name: str, proc: subprocess.Popen[bytes], result_file: Path, timeout: float
    ) -> dict[str, Any]:
        """Wait for a measuring child and read the JSON it wrote; its log tail if it failed."""
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            raise RuntimeError(f"{name} did not finish in {timeout:.0f} s") from None
        if code != 0 or not result_file.exists():
            raise RuntimeError(f"{name} failed (exit {code}):\n{self.log_tail(name)}")
        return dict(json.loads(result_file.read_text()))

    def run_json(
        self,
        name: str,
        command: Sequence[str],
        env: dict[str, str],
        result_file: Path,
        timeout: float,
    ) -> dict[str, Any]:
        """Start a measuring child that writes its figures to `result_file`; return them."""
        return self.finish(name, self.spawn(name, command, env), result_file, timeout)


def wait_until(
    check: Callable[[], bool],
    what: str,
    proc: subprocess.Popen[bytes],
    timeout: float = STARTUP_TIMEOUT_S,
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was not ready after {timeout:.0f} s")
        time.sleep(0.1)


def terminate_on_sigterm() -> None:
    """SIGTERM behaves like Ctrl-C, so the finally-blocks stop every child."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def measured_command(command: Sequence[str], env: dict[str, str]) -> dict[str, Any]:
    """Wall time, CPU and peak RSS of one command (its own process, reaped with wait4)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        list(command),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=str(REPO),
    )
    try:
        output = proc.stdout.read() if proc.stdout else b""
        _pid, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        if proc.stdout:
            proc.stdout.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{command[3:5]} failed ({proc.returncode}): {output[-2000:]!r}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "max_rss_kb": float(usage.ru_maxrss),
        "output": output.decode(errors="replace"),
    }


def run_script(
    argv: Sequence[str] | None,
    children: Mapping[str, Callable[[Sequence[str]], None]],
    orchestrate: Callable[[Sequence[str]], int],
) -> int:
    """A benchmark's entry point: `<script> _role ...` runs a child role, anything else the
    orchestrator; SIGTERM and Ctrl-C end both through their finally-blocks."""
    args = list(sys.argv[1:] if argv is None else argv)
    terminate_on_sigterm()
    if args[:1] and args[0] in children:
        children[args[0]](args[1:])
        return 0
    try:
        return orchestrate(args)
    except KeyboardInterrupt:
        print("interrupted: every server and child started here was stopped", file=sys.stderr)
        return 130


def child_parser(prog: str, *, images: str = "--n") -> argparse.ArgumentParser:
    """A measuring child's options: how many (`--n`, or `--calls`), how many in flight, where
    to, and the file its figures go to (what the orchestrator then reads with `finish`)."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument(images, type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--dest", required=True)
    parser.add_argument("--result-file", required=True)
    return parser
