"""Side-by-side batch benchmark: flux-flows against the ideal, a hand-written loop and a seed script.

Why this shape: the library's promise is "as fast as you could write it yourself, plus caching,
records and resumability". So one run measures, against the same emulator and the same S3:

- ideal: N x latency / concurrency, or N / RPM x 60 when the rate limit binds;
- raw: asyncio + httpx + boto3 (put_object in threads) at the same concurrency, the best a
  user could write by hand without Prefect;
- seed loop: the sequential requests + boto3 script users start from (timed on a sample and
  extrapolated to N, because 1,000 sequential 1 s calls would take a quarter of an hour);
- flux-flows: `generate_images` at the same concurrency into a fresh prefix, then a fully
  cached re-run, in a fresh child process (after an uncounted warm-up run) so its CPU time and
  peak RSS are the library's own;
- memory growth: the same child at a small N, so (peak RSS at N - peak RSS at small N) / (N -
  small N) is what each extra image costs.

Every server runs in its own process so that its CPU is not billed to the client: the Fireworks
emulator (`flux_flows.emulator.create_app` under uvicorn, plus a request log for rate figures),
moto's `moto_server` for S3, and a `prefect server start` with a throw-away PREFECT_HOME (so the
runs neither pay for nor wait on Prefect's temporary per-process server, nor touch ~/.prefect).
Everything binds to 127.0.0.1, and every process started here is stopped on exit, error or
Ctrl-C (each lives in its own process group, ended by id).

Every contender (raw loop, seed loop, each flux-flows child) first does an uncounted 2-image
warm-up run of its own. The raw loop, the flux-flows run and the thumbnails=False run share the
servers, so their order can matter: `--repeat K` runs K rounds, each in a rotated order (round 1:
raw, flow, bare; round 2: flow, bare, raw; ...), and prints the median, min and max of every
figure, computed here.

Usage:
    python benchmarks/bench_batch.py --n 1000 --latency 1 --concurrency 32 --image-kb 300
    python benchmarks/bench_batch.py --repeat 3             # 3 rounds, medians and ranges
    python benchmarks/bench_batch.py --n 300 --rpm 600
    python benchmarks/bench_batch.py --n 300 --profile /tmp/prof.txt   # + where the CPU goes

The last line printed is machine-readable:
    RESULT n=.. flow_vs_ideal=.. flow_vs_raw=.. speedup_vs_seed=.. cached_rerun_ratio=..
    cpu_ms_per_image=.. cpu_vs_raw=.. rss_kb_per_image=.. image_kb=..
    [flow_vs_raw_no_thumbnails=.. cpu_vs_raw_no_thumbnails=.. thumbnail_cpu_ms_per_image=..]
    [standin_images_per_s=.. standin_cpu_ms_per_image=..]
    [rpm=.. sustained_rate_pct=.. peak_60s_requests=.. failed=..]   (with --rpm)
With --repeat K (K > 1): one `ROUND i/K n=..` line per round, then `RANGE repeat=K key=min-max ..`
and `RESULT repeat=K key=median ..` (the medians over the rounds) as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import gc
import json
import math
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
BUCKET = "flux-bench"
API_KEY = "bench-key"  # the emulator accepts any key; this one only has to be non-empty
EMULATOR_TOKEN_ENV = "FLUX_FLOWS_EMULATOR_TOKEN"  # the emulator child's control token
MODEL = "flux-1-schnell-fp8"
GENERATION_PATH = f"/workflows/accounts/fireworks/models/{MODEL}/text_to_image"
STARTUP_TIMEOUT_S = 120.0
# Ends a hung child instead of hanging the benchmark (generous: 1 s latency, 2 cores, shared).
CHILD_TIMEOUT_S = 1800.0


# ============================================================================================
# Workload: the same requests for every contender, so every image has the same bytes
# ============================================================================================


def workload(n: int, tag: str = "") -> list[dict[str, Any]]:
    """N distinct prompts with explicit seeds: identical requests (and images) in every phase."""
    subjects = ("lighthouse", "fox", "teapot", "glacier", "bicycle", "orchard", "robot", "harbor")
    return [
        {
            "prompt": f"{tag}benchmark image {i}: a watercolor {subjects[i % len(subjects)]} "
            "at dusk, soft light, high detail",
            "seed": i + 1,
        }
        for i in range(n)
    ]


def api_body(job: dict[str, Any]) -> dict[str, Any]:
    """What the library sends for such a job (see ImageRequest.api_body), so the work is equal."""
    return {
        "prompt": job["prompt"],
        "aspect_ratio": "1:1",
        "guidance_scale": 3.5,
        "num_inference_steps": 4,
        "seed": job["seed"],
        "safety_check": False,
    }


# ============================================================================================
# Process bookkeeping
# ============================================================================================


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _http_ok(url: str, timeout: float = 2.0) -> bool:
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
    """In the child, before exec: SIGTERM it if this script dies, even by SIGKILL (Linux only).

    The finally-blocks cover Ctrl-C, SIGTERM and errors; this covers the one case they cannot.
    """
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class Processes:
    """Every child this script starts, each in its own session, so all can be ended by id.

    A new session per child means a terminal Ctrl-C reaches only this script, which then ends
    the children itself in order (and also their own children, e.g. the Prefect server's
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


def wait_until(check: Callable[[], bool], what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not check():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was not ready after {STARTUP_TIMEOUT_S:.0f} s")
        time.sleep(0.1)


# ----- CPU accounting, so the table can say where the machine's time went -------------------


def process_tree_cpu_s(pid: int) -> float:
    """User+system seconds of a process and its live descendants (0 if it is gone)."""
    try:
        import psutil
    except ImportError:
        return math.nan
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def machine_busy_s() -> float:
    """CPU seconds all processes on the machine have used since boot (from /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return math.nan
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_and_children_cpu_s() -> float:
    """This process plus its waited-for children (the flow children), user+system seconds."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} ({os.cpu_count()} cores)"


# ============================================================================================
# Child role 1: the emulator, with a request log for rate figures
# ============================================================================================


def serve_emulator(argv: Sequence[str]) -> None:
    """The library's emulator app under uvicorn, plus `/_bench/log` (arrival time, status).

    The log is what makes "sustained rate" measurable from the API's side, independently of
    what the client believes it sent.
    """
    parser = argparse.ArgumentParser(prog="bench_batch.py _emulator")
    parser.add_argument("--latency", type=float, required=True)
    parser.add_argument("--image-kb", type=int, default=None)
    parser.add_argument("--rpm", type=int, default=None)
    parser.add_argument("--port-file", required=True)
    args = parser.parse_args(argv)

    import uvicorn

    from flux_flows.emulator import EmulatorConfig, EmulatorStats, create_app

    config = EmulatorConfig(latency_s=args.latency, image_kb=args.image_kb, rpm_limit=args.rpm)
    # The parent resets the emulator between contenders: a change needs the control token.
    app = create_app(config, EmulatorStats(), control_token=os.environ[EMULATOR_TOKEN_ENV])
    arrivals: list[tuple[float, int]] = []

    async def logged(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        path = scope["path"]
        if path == "/_bench/log":
            if scope["method"] == "POST":
                arrivals.clear()
            body = json.dumps(arrivals).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        if scope["method"] != "POST" or not path.endswith("/text_to_image"):
            await app(scope, receive, send)
            return
        arrived = time.time()
        status = [0]

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await app(scope, receive, send_status)
        finally:
            arrivals.append((arrived, status[0]))

    # IPPROTO_TCP explicitly, as the library's own server does: asyncio then sets TCP_NODELAY,
    # without which keep-alive answers stall ~40 ms on Nagle + delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = int(sock.getsockname()[1])
    server = uvicorn.Server(
        uvicorn.Config(
            logged,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
            access_log=False,
            http="h11",
            ws="none",
            loop="asyncio",
            timeout_graceful_shutdown=1,
            backlog=1024,
        )
    )
    tmp = Path(args.port_file + ".tmp")
    tmp.write_text(str(port))
    tmp.replace(args.port_file)  # atomic: the parent never reads half a number
    server.run(sockets=[sock])


# ============================================================================================
# Child role 1b: a stand-in API that costs ~nothing, so only the client can be the limit
# ============================================================================================


class _StandInProtocol(asyncio.Protocol):
    """Minimal HTTP/1.1 keep-alive server: every POST gets the same precomputed JPEG.

    Written on raw asyncio rather than an ASGI framework so its own CPU per answer stays in
    the tens of microseconds (parsing a header block and one `json.loads` for the seed); the
    300 KB body is one `writelines` of bytes prepared at start-up. The emulator renders each
    image (8-15 ms of CPU): on a 2-core machine it, not the client, would set the rate.
    """

    def __init__(self, image: bytes, latency_s: float, counter: list[int]) -> None:
        self.image = image
        self.latency_s = latency_s
        self.counter = counter
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buffer[:end]).split(b"\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            total = end + 4 + length
            if len(self.buffer) < total:
                return  # the body is still arriving
            body = bytes(self.buffer[end + 4 : total])
            del self.buffer[:total]
            method, path, *_ = head[0].split(b" ")
            reply = self._reply(method, path, body)
            if self.latency_s and method == b"POST":
                asyncio.get_running_loop().call_later(self.latency_s, self._write, reply)
            else:
                self._write(reply)

    def _reply(self, method: bytes, path: bytes, body: bytes) -> list[bytes]:
        if method == b"POST" and path.endswith(b"/text_to_image"):
            self.counter[0] += 1
            try:
                seed = int(json.loads(body).get("seed") or 1)
            except (ValueError, AttributeError):
                seed = 1
            head = (
                "HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
                f"Content-Length: {len(self.image)}\r\nSeed: {seed}\r\n"
                "Finish-Reason: SUCCESS\r\n\r\n"
            )
            return [head.encode(), self.image]
        text = json.dumps({"requests": self.counter[0]}).encode()
        status = "200 OK" if path == b"/_standin/stats" else "404 Not Found"
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(text)}\r\n\r\n"
        )
        return [head.encode(), text]

    def _write(self, reply: list[bytes]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(reply)


def serve_standin(argv: Sequence[str]) -> None:
    """The zero-cost stand-in on 127.0.0.1: `--image-file` bytes for every generation."""
    parser = argparse.ArgumentParser(prog="bench_batch.py _standin")
    parser.add_argument("--image-file", required=True)
    parser.add_argument("--latency", type=float, required=True)
    parser.add_argument("--port-file", required=True)
    args = parser.parse_args(argv)
    image = Path(args.image_file).read_bytes()
    counter = [0]

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _StandInProtocol(image, args.latency, counter),
            host="127.0.0.1",
            port=0,
            backlog=1024,
        )
        port = int(server.sockets[0].getsockname()[1])
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(args.port_file)
        await server.serve_forever()

    asyncio.run(serve())


# ============================================================================================
# Child role 2: one flux-flows measurement in a fresh process
# ============================================================================================


def _rss_kb() -> int:
    """Current resident set, kB (Linux /proc)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024
    return 0


def _max_rss_kb() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # kB on Linux


@contextlib.contextmanager
def _sampling_profiler(path: str | None) -> Iterator[None]:
    """py-spy on this very process for the measured run only (all threads, idle excluded).

    py-spy, not cProfile: the work runs in the task runner's threads, which cProfile and
    pyinstrument do not see. Its own CPU is in its own process, so the figures stay honest
    apart from the brief pauses of sampling.
    """
    if not path:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy not found (pip install py-spy): no profile", file=sys.stderr)
        yield
        return
    command = [spy, "record", "--pid", str(os.getpid()), "--rate", "200"]
    command += ["--format", "raw", "--output", path, "--threads"]
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
    )
    time.sleep(1.0)  # let it attach before the clock starts
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _thread_cpu_s() -> dict[int, tuple[str, float]]:
    """CPU seconds of each live thread of this process, by native id, with its Python name."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    ticks = os.sysconf("SC_CLK_TCK")
    found: dict[int, tuple[str, float]] = {}
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            # Fields after the ")" that closes the command name: utime, stime are 12th, 13th.
            rest = (task / "stat").read_text().rpartition(")")[2].split()
            tid = int(task.name)
            found[tid] = (names.get(tid, f"native-{tid}"), (int(rest[11]) + int(rest[12])) / ticks)
    return found


def _thread_groups(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], total: float
) -> dict[str, float]:
    """CPU by thread family over an interval; threads that ended in it are the remainder.

    The task runner's worker threads end when the batch's pool closes, so what no surviving
    thread accounts for is charged to them.
    """
    groups: dict[str, float] = {}
    for tid, (name, cpu) in after.items():
        group = name.rstrip("0123456789_-() ").removesuffix(" (run")
        groups[group] = groups.get(group, 0.0) + cpu - before.get(tid, (name, 0.0))[1]
    groups["task runner workers (ended)"] = total - sum(groups.values())
    return {k: v for k, v in groups.items() if abs(v) >= 0.005}


def run_flow_child(argv: Sequence[str]) -> None:
    """Warm-up run (not counted), the measured first run, optionally a fully cached re-run.

    Peak RSS is read right after the first run, before the re-run, so the small-N and large-N
    children are compared at the same point.
    """
    parser = argparse.ArgumentParser(prog="bench_batch.py _flow")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--rpm", type=float, default=None)
    parser.add_argument("--dest", required=True)
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument("--result-file", required=True)
    parser.add_argument("--profile-out", default=None)
    parser.add_argument("--no-thumbnails", action="store_true")
    args = parser.parse_args(argv)

    import logging

    from flux_flows.flows import generate_images

    # The library's and Prefect's default logging stays on (users pay for it too); only the
    # noisy third-party debug loggers a user would not enable are left at their defaults.
    logging.getLogger("botocore").setLevel(logging.WARNING)
    out: dict[str, Any] = {"n": args.n, "profiled": bool(args.profile_out)}

    started = time.perf_counter()
    warm = generate_images(
        workload(2, tag="warm-up "),
        args.dest.rstrip("/") + "-warmup",
        max_concurrency=2,
    )
    out["warmup_s"] = time.perf_counter() - started
    out["warmup_ok"] = warm.counts.get("SUCCESS", 0)

    jobs = workload(args.n)
    gc.collect()
    out["rss_before_kb"] = _rss_kb()
    out["max_rss_before_kb"] = _max_rss_kb()
    threads0 = _thread_cpu_s()
    with _sampling_profiler(args.profile_out):
        cpu0, wall0, t0 = time.process_time(), time.perf_counter(), time.time()
        report = generate_images(
            jobs,
            args.dest,
            max_concurrency=args.concurrency,
            requests_per_minute=args.rpm,
            thumbnails=not args.no_thumbnails,
        )
        out["first_wall_s"] = time.perf_counter() - wall0
        out["first_cpu_s"] = time.process_time() - cpu0
    out["thread_cpu_s"] = _thread_groups(threads0, _thread_cpu_s(), out["first_cpu_s"])
    out["first_started_at"], out["first_ended_at"] = t0, time.time()
    out["max_rss_after_first_kb"] = _max_rss_kb()
    out["rss_after_first_kb"] = _rss_kb()
    out["first_counts"] = dict(report.counts)
    out["first_api_calls"] = report.api_calls
    out["first_cache_hits"] = report.cache_hits
    out["bytes"] = sum(r.size_bytes or 0 for r in report.records)
    del report
    if args.rerun:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        report = generate_images(
            jobs,
            args.dest,
            max_concurrency=args.concurrency,
            requests_per_minute=args.rpm,
            thumbnails=not args.no_thumbnails,
        )
        out["rerun_wall_s"] = time.perf_counter() - wall0
        out["rerun_cpu_s"] = time.process_time() - cpu0
        out["rerun_counts"] = dict(report.counts)
        out["rerun_api_calls"] = report.api_calls
        out["rerun_cache_hits"] = report.cache_hits
    Path(args.result_file).write_text(json.dumps(out))


# ============================================================================================
# Child role 3: what each step of one image costs, measured alone (CPU time, so load-robust)
# ============================================================================================


def _cpu_per_call_ms(
    calls: int, work: Callable[[int], Any], threads: int = 1
) -> tuple[float, float]:
    """(process CPU ms per call, wall s) of `work(i)` for i < calls, on `threads` threads."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if threads == 1:
        for i in range(calls):
            work(i)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(work, range(calls)))
    return 1000 * (time.process_time() - cpu0) / calls, time.perf_counter() - wall0


def run_components_child(argv: Sequence[str]) -> None:
    """CPU per image of each step of `render_image`, alone, and of a Prefect task run.

    Process CPU time is what one step costs this process, whatever else the machine is doing
    (wall times here are not comparable: they include the emulator's latency).
    """
    parser = argparse.ArgumentParser(prog="bench_batch.py _components")
    parser.add_argument("--calls", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--dest", required=True)
    parser.add_argument("--result-file", required=True)
    args = parser.parse_args(argv)

    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.task_runners import ThreadPoolTaskRunner

    from flux_flows.blocks import shared_client
    from flux_flows.models import ImageRequest
    from flux_flows.rendering.one_image import RenderJob, image_metadata, render, render_image
    from flux_flows.rendering.spill import SpillFolder
    from flux_flows.storage import open_storage

    calls, conc = args.calls, args.concurrency
    requests = [ImageRequest(**job) for job in workload(calls, tag="components ")]
    client = shared_client()
    storage = open_storage(args.dest)
    image = client.generate(requests[0])  # warm: connection, imports
    storage.put("warm.jpg", image.data, content_type=image.content_type)
    metadata = image_metadata(image)
    out: dict[str, float] = {}

    out["API call + parse (FluxClient.generate)"], _ = _cpu_per_call_ms(
        calls, lambda i: client.generate(requests[i]), threads=conc
    )
    # The public names, so the same line times older trees too (Pillow-based size reading).
    from flux_flows.inputs.sniff import image_size, sniff_image

    out["verify the answer (sniff + image size)"], _ = _cpu_per_call_ms(
        calls * 20, lambda i: (sniff_image(image.data), image_size(image.data))
    )
    out["S3 metadata of the image (image_metadata)"], _ = _cpu_per_call_ms(
        calls * 20, lambda i: image_metadata(image)
    )
    out["S3 put of the image + metadata"], _ = _cpu_per_call_ms(
        calls,
        lambda i: storage.put(
            f"c/{i}.jpg", image.data, content_type="image/jpeg", metadata=metadata
        ),
    )
    raw_s3 = s3_client(4)  # the raw loop's client: boto3 defaults
    out["S3 put of the image, boto3 defaults (as the raw loop)"], _ = _cpu_per_call_ms(
        calls,
        lambda i: raw_s3.put_object(
            Bucket=BUCKET, Key=f"components/r/{i}.jpg", Body=image.data, ContentType="image/jpeg"
        ),
    )
    with contextlib.suppress(ImportError):
        from flux_flows.rendering.thumbnails import make_thumbnail

        thumb = make_thumbnail(image.data)
        out["thumbnail: make"], _ = _cpu_per_call_ms(calls, lambda i: make_thumbnail(image.data))
        out["thumbnail: S3 put"], _ = _cpu_per_call_ms(
            calls, lambda i: storage.put(f"t/{i}.jpg", thumb, content_type="image/jpeg")
        )

    def job(request: ImageRequest, folder: str) -> RenderJob:
        destination = args.dest.rstrip("/") + folder
        storage = open_storage(destination)
        return RenderJob(request, storage, SpillFolder(storage.root_uri))

    jobs = [job(r, "/plain") for r in requests]
    out["render() on plain threads (all steps, no Prefect)"], _ = _cpu_per_call_ms(
        calls, lambda i: render(jobs[i]), threads=conc
    )

    @task(cache_policy=NO_CACHE, persist_result=False)
    def noop(i: int) -> int:
        return i

    @flow(persist_result=False)
    def many(count: int, use_render: bool) -> None:
        with ThreadPoolTaskRunner(max_workers=conc) as runner:
            if use_render:
                tagged = [job(r, "/task") for r in requests[:count]]
                futures = [runner.submit(render_image, {"job": j}) for j in tagged]
            else:
                futures = [runner.submit(noop, {"i": i}) for i in range(count)]
            for future in futures:
                future.result(raise_on_failure=False)

    many(1, False)  # warm: flow registration, task runner imports
    one_ms, _ = _cpu_per_call_ms(1, lambda i: many(1, False))
    total_ms, _ = _cpu_per_call_ms(1, lambda i: many(calls, False))
    out["Prefect task run, no-op body (per task)"] = (total_ms - one_ms) / (calls - 1)
    total_ms, _ = _cpu_per_call_ms(1, lambda i: many(calls, True))
    out["render_image as a Prefect task (all steps)"] = (total_ms - one_ms) / calls
    Path(args.result_file).write_text(json.dumps(out))


# ============================================================================================
# The contenders that run in this process: raw asyncio loop and the sequential seed script
# ============================================================================================


@dataclass
class Phase:
    """One contender's figures; `extrapolated_from` > 0 marks a sampled, scaled-up time."""

    name: str
    wall_s: float
    images: int
    failed: int = 0
    cpu_s: float = math.nan
    extrapolated_from: int = 0
    notes: list[str] = field(default_factory=list)


def s3_client(max_pool: int) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        config=Config(max_pool_connections=max_pool, retries={"mode": "standard"}),
    )


async def _raw_batch(
    base_url: str,
    jobs: Sequence[dict[str, Any]],
    prefix: str,
    concurrency: int,
    rpm: float | None,
) -> int:
    """Hand-written: a semaphore, one pooled AsyncClient, put_object in a right-sized pool."""
    import httpx

    loop = asyncio.get_running_loop()
    # asyncio.to_thread's default pool has min(32, cores + 4) = 6 threads here: a careful
    # hand-written loop sizes it to the concurrency, so the uploads do not queue behind it.
    executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="raw-put")
    loop.set_default_executor(executor)
    s3 = s3_client(concurrency)
    semaphore = asyncio.Semaphore(concurrency)
    interval = 60.0 / rpm if rpm else 0.0
    next_slot = [time.monotonic()]
    failed = 0

    async def pace() -> None:
        if not interval:
            return
        slot = max(next_slot[0], time.monotonic())
        next_slot[0] = slot + interval
        await asyncio.sleep(max(0.0, slot - time.monotonic()))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=base_url,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=httpx.Timeout(120.0, connect=10.0),
        limits=limits,
    ) as http:

        async def one(index: int, job: dict[str, Any]) -> None:
            nonlocal failed
            async with semaphore:
                await pace()
                try:
                    response = await http.post(
                        GENERATION_PATH, json=api_body(job), headers={"Accept": "image/jpeg"}
                    )
                    response.raise_for_status()
                    await asyncio.to_thread(
                        s3.put_object,
                        Bucket=BUCKET,
                        Key=f"{prefix}/{index:06d}.jpg",
                        Body=response.content,
                        ContentType="image/jpeg",
                    )
                except Exception:
                    failed += 1

        await asyncio.gather(*(one(i, job) for i, job in enumerate(jobs)))
    executor.shutdown(wait=True)
    return failed


def run_raw(
    base_url: str,
    jobs: Sequence[dict[str, Any]],
    concurrency: int,
    rpm: float | None,
    prefix: str = "raw",
) -> Phase:
    s3_client(1).list_buckets()  # import and credential resolution, not counted
    cpu0, wall0 = time.process_time(), time.perf_counter()
    failed = asyncio.run(_raw_batch(base_url, jobs, prefix, concurrency, rpm))
    return Phase(
        "raw asyncio+httpx+boto3",
        time.perf_counter() - wall0,
        len(jobs),
        failed=failed,
        cpu_s=time.process_time() - cpu0,
    )


def run_seed_loop(
    base_url: str, jobs: Sequence[dict[str, Any]], n: int, prefix: str = "seed"
) -> Phase:
    """The script users start from: one request, one upload, next; timed on a sample only."""
    import requests

    s3 = s3_client(1)
    s3.list_buckets()
    failed = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for index, job in enumerate(jobs):
        try:
            response = requests.post(
                base_url + GENERATION_PATH,
                json=api_body(job),
                headers={"Authorization": f"Bearer {API_KEY}", "Accept": "image/jpeg"},
                timeout=120,
            )
            response.raise_for_status()
            s3.put_object(
                Bucket=BUCKET,
                Key=f"{prefix}/{index:06d}.jpg",
                Body=response.content,
                ContentType="image/jpeg",
            )
        except Exception:
            failed += 1
    sample_wall = time.perf_counter() - wall0
    sample_cpu = time.process_time() - cpu0
    scale = n / max(len(jobs), 1)
    return Phase(
        "seed loop (sequential requests+boto3)",
        sample_wall * scale,
        n,
        failed=failed,
        cpu_s=sample_cpu * scale,
        extrapolated_from=len(jobs),
    )


# ============================================================================================
# The orchestrator
# ============================================================================================


@dataclass
class Services:
    emulator_url: str  # origin, e.g. http://127.0.0.1:1234
    control_token: str  # for the emulator's /_emulator/reset
    base_url: str  # FIREWORKS_BASE_URL
    s3_endpoint: str
    prefect_api: str
    pids: dict[str, int]
    env: dict[str, str]  # for children: AWS, Fireworks, Prefect settings


@contextlib.contextmanager
def services(args: argparse.Namespace, workdir: Path, procs: Processes) -> Iterator[Services]:
    """Emulator, moto and a Prefect server, each its own process on loopback; stopped on exit."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "PREFECT_", "FIREWORKS_", "FLUX_FLOWS_"))
    }
    # Children import flux_flows from this checkout even when it is not installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    prefect_port, moto_port = free_port(), free_port()
    prefect_api = f"http://127.0.0.1:{prefect_port}/api"
    s3_endpoint = f"http://127.0.0.1:{moto_port}"
    prefect_home = workdir / "prefect-home"
    prefect_env = {
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{prefect_home}/prefect.db",
    }
    port_file = workdir / "emulator.port"
    emulator_cmd = [sys.executable, str(HERE), "_emulator", "--latency", str(args.latency)]
    emulator_cmd += ["--port-file", str(port_file)]
    if args.image_kb:
        emulator_cmd += ["--image-kb", str(args.image_kb)]
    if args.rpm:
        emulator_cmd += ["--rpm", str(int(args.rpm))]

    prefect_home.mkdir(parents=True, exist_ok=True)
    prefect_cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    prefect_cmd += ["--port", str(prefect_port), "--no-ui", "--analytics-off"]
    prefect = procs.spawn("prefect-server", prefect_cmd, {**env, **prefect_env})
    # `python -m moto.server` from this interpreter: a `moto_server` found on PATH may belong
    # to another Python installation.
    moto = procs.spawn(
        "moto",
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
        env,
    )
    control_token = secrets.token_urlsafe(24)
    emulator = procs.spawn("emulator", emulator_cmd, {**env, EMULATOR_TOKEN_ENV: control_token})
    wait_until(port_file.exists, "the emulator", emulator)
    emulator_url = f"http://127.0.0.1:{int(port_file.read_text())}"
    wait_until(lambda: _http_ok(s3_endpoint), "moto_server", moto)
    wait_until(lambda: _http_ok(prefect_api + "/health"), "the Prefect server", prefect)

    child_env = {
        **env,
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_API_URL": prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
        # A user's ~/.aws must not redirect or slow the runs (profiles, SSO, other endpoints).
        "AWS_CONFIG_FILE": str(workdir / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "aws-credentials"),
        "FIREWORKS_API_KEY": API_KEY,
        "FIREWORKS_BASE_URL": emulator_url + "/inference/v1",
        "FLUX_FLOWS_SPILL_DIR": str(workdir / "spill"),
    }
    yield Services(
        emulator_url=emulator_url,
        control_token=control_token,
        base_url=emulator_url + "/inference/v1",
        s3_endpoint=s3_endpoint,
        prefect_api=prefect_api,
        pids={"emulator": emulator.pid, "moto": moto.pid, "prefect server": prefect.pid},
        env=child_env,
    )


def flow_child(
    procs: Processes,
    svc: Services,
    workdir: Path,
    *,
    name: str,
    n: int,
    concurrency: int,
    rpm: float | None,
    dest: str,
    rerun: bool = False,
    profile_out: str | None = None,
    env: dict[str, str] | None = None,
    thumbnails: bool = True,
) -> dict[str, Any]:
    result_file = workdir / f"{name}.json"
    command = [sys.executable, str(HERE), "_flow", "--n", str(n)]
    command += [
        "--concurrency",
        str(concurrency),
        "--dest",
        dest,
        "--result-file",
        str(result_file),
    ]
    if rpm:
        command += ["--rpm", str(rpm)]
    if rerun:
        command.append("--rerun")
    if not thumbnails:
        command.append("--no-thumbnails")
    if profile_out:
        command += ["--profile-out", profile_out]
    proc = procs.spawn(name, command, {**svc.env, **(env or {})})
    try:
        code = proc.wait(CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        procs.stop(proc)
        raise RuntimeError(f"{name} did not finish in {CHILD_TIMEOUT_S:.0f} s") from None
    if code != 0 or not result_file.exists():
        raise RuntimeError(f"{name} failed (exit {code}):\n{procs.log_tail(name)}")
    return dict(json.loads(result_file.read_text()))


def components_child(
    procs: Processes, svc: Services, workdir: Path, concurrency: int, calls: int = 64
) -> dict[str, float]:
    result_file = workdir / "components.json"
    command = [sys.executable, str(HERE), "_components", "--calls", str(calls)]
    command += ["--concurrency", str(concurrency), "--dest", f"s3://{BUCKET}/components"]
    command += ["--result-file", str(result_file)]
    proc = procs.spawn("components", command, svc.env)
    code = proc.wait(CHILD_TIMEOUT_S)
    if code != 0 or not result_file.exists():
        raise RuntimeError(
            f"components child failed (exit {code}):\n{procs.log_tail('components')}"
        )
    return dict(json.loads(result_file.read_text()))


def fetch_emulator_jpeg(svc: Services, path: Path) -> int:
    """One JPEG from the emulator (the same kind of bytes as the main run), saved to `path`."""
    request = urllib.request.Request(
        svc.base_url + GENERATION_PATH,
        data=json.dumps(api_body({"prompt": "stand-in image", "seed": 1})).encode(),
        method="POST",
        headers={
            "Authorization": f"Bearer {API_KEY}",
            "Accept": "image/jpeg",
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        data = response.read()
    path.write_bytes(data)
    return len(data)


def measure_standin(
    args: argparse.Namespace, svc: Services, procs: Processes, workdir: Path, tag: str = ""
) -> dict[str, Any]:
    """A fresh flux-flows child against the zero-cost stand-in: the rate one process sustains.

    The stand-in answers every generation with the same precomputed JPEG after
    `--standin-latency`, with `--standin-concurrency` in flight, so neither the API's latency
    nor an emulator's rendering is the limit; the destination is a local folder (default) or
    moto. The stand-in's and moto's CPU are reported so the claim "~0 CPU" can be checked.
    """
    image_file, port_file = workdir / f"standin{tag}.jpg", workdir / f"standin{tag}.port"
    size = fetch_emulator_jpeg(svc, image_file)
    command = [sys.executable, str(HERE), "_standin", "--image-file", str(image_file)]
    command += ["--latency", str(args.standin_latency), "--port-file", str(port_file)]
    proc = procs.spawn(f"standin{tag}", command, svc.env)
    try:
        wait_until(port_file.exists, "the stand-in API", proc)
        url = f"http://127.0.0.1:{int(port_file.read_text())}"
        dest = (
            str(workdir / f"standin-out{tag}")
            if args.standin_dest == "local"
            else f"s3://{BUCKET}/standin{tag}"
        )
        pids = {"stand-in": proc.pid, "moto": svc.pids["moto"]}
        cpu0 = {name: process_tree_cpu_s(pid) for name, pid in pids.items()}
        busy0, wall0 = machine_busy_s(), time.perf_counter()
        result = flow_child(
            procs,
            svc,
            workdir,
            name=f"flow-standin{tag}",
            n=args.standin_n,
            concurrency=args.standin_concurrency,
            rpm=None,
            dest=dest,
            env={"FIREWORKS_BASE_URL": url + "/inference/v1"},
        )
        busy1, wall1 = machine_busy_s(), time.perf_counter()
        cpu1 = {name: process_tree_cpu_s(pid) for name, pid in pids.items()}
        result["served"] = http_json(url + "/_standin/stats")["requests"]
    finally:
        procs.stop(proc)
    result["server_cpu_s"] = {name: cpu1[name] - cpu0[name] for name in pids}
    result["machine_cores"] = (busy1 - busy0) / max(wall1 - wall0, 1e-9)
    result["image_bytes"] = size
    result["dest"] = "local folder" if args.standin_dest == "local" else "moto S3"
    return result


def emulator_log(svc: Services, *, clear: bool = False) -> list[tuple[float, int]]:
    return [
        (float(t), int(s))
        for t, s in http_json(svc.emulator_url + "/_bench/log", "POST" if clear else "GET")
    ]


def reset_emulator(svc: Services) -> None:
    """Fresh counters and rate window between contenders, so one does not pay for another."""
    http_json(
        svc.emulator_url + "/_emulator/reset",
        "POST",
        headers={"X-Emulator-Token": svc.control_token},
    )
    emulator_log(svc, clear=True)


def rate_figures(log: Sequence[tuple[float, int]], rpm: float) -> dict[str, float]:
    """Rates as the API saw them: steady rate between first and last request, busiest minute."""
    times = sorted(t for t, status in log if status == 200)
    rejected = sum(1 for _, status in log if status == 429)
    if len(times) < 2:
        return {"sustained_rpm": math.nan, "peak_60s": float(len(times)), "rejected": rejected}
    span = times[-1] - times[0]
    sustained = (len(times) - 1) / span * 60 if span > 0 else math.inf
    peak, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= 60.0:
            start += 1
        peak = max(peak, end - start + 1)
    return {
        "sustained_rpm": sustained,
        "sustained_pct": 100 * sustained / rpm,
        "peak_60s": float(peak),
        "rejected": float(rejected),
    }


# Where a sample of the flux-flows run is charged: the first rule whose marker appears in the
# stack wins, so nested work (an S3 put inside a thumbnail) is charged to the outer step.
PROFILE_BUCKETS: tuple[tuple[str, str], ...] = (
    ("thumbnail: make + S3 put", "store_thumbnail (flux_flows/rendering/thumbnails.py"),
    ("S3 put of the image (boto3)", "S3Storage.put (flux_flows/storage/s3.py"),
    ("API call: httpx + response parsing", "FluxClient.generate (flux_flows/client/_sync.py"),
    ("render(): other library code", "flux_flows/rendering/one_image.py"),
    ("logging (log records, handlers)", "Logger._log (logging/__init__.py"),
    ("Prefect task engine (per-task overhead)", "prefect/task_engine.py"),
    ("manifest, records, artifacts", "flux_flows/records/reports.py"),
)
# py-spy's idle detection does not see threads blocked in C calls (socket reads, lock and
# condition waits), so a sample whose innermost Python frame is one of these waits is dropped.
# Checked against the process CPU time: what is left matches it within ~10%.
IDLE_LEAVES = frozenset(
    {
        "SyncStream.read",
        "SocketIO.readinto",
        "poll_wait_for_socket.<locals>.do_poll",
        "EpollSelector.select",
        "Condition.wait",
        "Event.wait",
        "Queue.get",
        "_worker",
        "Thread._wait_for_tstate_lock",
        "Handler.acquire",
        "ThreadLock.__enter__",
        "Popen._wait",
        "_send_heartbeats.<locals>.heartbeat_loop",
        "_sampling_profiler",
    }
)


def _frame_key(frame: str) -> str:
    """`func (path/to/file.py:123)` -> `func (path/to/file.py)`: lines of one function merge."""
    head, _, tail = frame.rpartition(":")
    return head + ")" if tail.endswith(")") and tail[:-1].isdigit() else frame


def _sample_weights(
    samples: dict[str, int], thread_cpu_s: dict[str, float] | None, total_ms: float, n: int
) -> dict[str, float]:
    """ms of CPU per image that one sample of each thread family stands for.

    With the per-thread CPU times the child measured (/proc), each family's samples share that
    family's own CPU time: a thread that py-spy sees as busy while it only waits (for the GIL,
    for a core on a loaded machine, or in a C call such as a queue's get) then cannot claim
    another thread's CPU. Families that ended before the measurement (the render pool) share
    what no surviving thread accounts for. Without those times, every sample weighs the same.
    """
    all_samples = sum(samples.values())
    if not thread_cpu_s or not all_samples:
        return {group: total_ms / max(all_samples, 1) for group in samples}
    known = {g: thread_cpu_s[g] for g in samples if g in thread_cpu_s}
    rest_s = max(0.0, sum(thread_cpu_s.values()) - sum(known.values()))
    rest_samples = sum(c for g, c in samples.items() if g not in known)
    return {
        group: 1000
        * (known[group] if group in known else rest_s * count / rest_samples)
        / n
        / count
        for group, count in samples.items()
    }


def summarize_profile(
    path: Path,
    n: int,
    cpu_ms_per_image: float,
    top: int = 25,
    thread_cpu_s: dict[str, float] | None = None,
) -> list[str]:
    """Per-image CPU by step and the heaviest functions, from py-spy's collapsed stacks.

    Sample counts say where a thread spends its time; how much CPU that is comes from the
    child's own per-thread CPU times (see `_sample_weights`), because on an oversubscribed
    machine a thread that is runnable but waiting for a core, or blocked in a C call, is still
    sampled as busy.
    """
    stacks: list[tuple[str, list[str], int]] = []
    samples: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        if frames[-1].rpartition(" (")[0].strip() in IDLE_LEAVES:
            continue
        group = (frames[0].partition(": ")[2] or frames[0]).rstrip("0123456789_-")
        stacks.append((group, frames, int(count_text)))
        samples[group] = samples.get(group, 0) + int(count_text)
    weight = _sample_weights(samples, thread_cpu_s, cpu_ms_per_image, n)

    buckets: dict[str, float] = {}
    threads: dict[str, float] = {}
    inclusive: dict[str, float] = {}
    for group, frames, count in stacks:
        ms_here = weight[group] * count
        threads[group] = threads.get(group, 0.0) + ms_here
        stack = ";".join(frames)
        bucket = next((name for name, mark in PROFILE_BUCKETS if mark in stack), None)
        if bucket is None:
            bucket = (
                "flow orchestration (main thread)"
                if group.startswith("MainThread")
                else f"other threads ({group})"
            )
        buckets[bucket] = buckets.get(bucket, 0.0) + ms_here
        for key in {_frame_key(f) for f in frames[1:]}:
            inclusive[key] = inclusive.get(key, 0.0) + ms_here
    total_ms = sum(threads.values())

    def ms(value: float) -> str:
        return f"{value:7.2f} ms/img {100 * value / max(total_ms, 1e-9):5.1f}%"

    how = (
        "each thread's samples weighted by its own CPU time"
        if thread_cpu_s
        else f"shares of the measured {cpu_ms_per_image:.1f} ms CPU per image"
    )
    lines = [
        f"py-spy: {sum(samples.values())} busy samples over N={n} (wait frames dropped); {how}"
    ]
    lines += ["  by step:"] + [
        f"    {ms(v)}  {name}" for name, v in sorted(buckets.items(), key=lambda kv: -kv[1])
    ]
    lines += ["  by thread:"] + [
        f"    {ms(v)}  {name}" for name, v in sorted(threads.items(), key=lambda kv: -kv[1])
    ]
    boring = ("threading.py", "concurrent/futures/thread.py", "<module>", "asyncio/")
    ranked = [
        kv
        for kv in sorted(inclusive.items(), key=lambda kv: -kv[1])
        if not any(b in kv[0] for b in boring)
    ]
    lines += ["  heaviest functions (inclusive):"] + [
        f"    {ms(v)}  {name}" for name, v in ranked[:top]
    ]
    return lines


def git_state() -> str:
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "flux_flows"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + (" + uncommitted changes in flux_flows/" if dirty else "")


def uptime_text() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return load_text()


def _fmt(value: float, digits: int = 2) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:.{digits}f}")
    )


@dataclass
class Measurements:
    """Everything one round of the benchmark measured, before it is turned into a table."""

    raw: Phase | None = None  # the hand-written asyncio loop
    seed: Phase | None = None  # the sequential loop, timed on a sample and extrapolated
    main: dict[str, Any] = field(default_factory=dict)  # the N-image flux-flows child
    small: dict[str, Any] | None = None  # the small-N child, for RSS growth
    n_small: int = 0
    server_cpu_s: dict[str, float] = field(default_factory=dict)
    foreign_cores: float = math.nan
    load_before_flow: str = ""
    rerun_requests: int = 0
    rates: dict[str, dict[str, float]] = field(default_factory=dict)
    components: dict[str, float] = field(default_factory=dict)
    # Seconds from the flow's start to the first API request, and from the last answer to the
    # flow's end: the fixed part of the flow's wall time that a raw loop does not have.
    edges_s: tuple[float, float] = (math.nan, math.nan)
    standin: dict[str, Any] | None = None  # the flux-flows child against the stand-in API
    bare: dict[str, Any] | None = None  # the same run with thumbnails=False
    order: list[str] = field(default_factory=list)  # the contenders' order in this round
    warmup_s: dict[str, float] = field(default_factory=dict)  # each contender's warm-up run


# The contenders whose order can matter (they share the emulator, moto and the Prefect server,
# whose state grows from one to the next, and the machine's load drifts): each round runs them
# in a rotated order, so with --repeat K each one runs first, in the middle and last in turn.
CONTENDERS = ("raw", "flow", "bare")


def round_order(args: argparse.Namespace, index: int) -> list[str]:
    names = [c for c in CONTENDERS if c != "bare" or args.no_thumbnails_row]
    shift = index % len(names)
    return names[shift:] + names[:shift]


def measure(
    args: argparse.Namespace, svc: Services, procs: Processes, workdir: Path, index: int = 0
) -> Measurements:
    """One round: seed sample, small-N flow child, then raw / flow / bare in `round_order`.

    Every contender first does an uncounted 2-image warm-up run of its own at concurrency 2,
    as the flux-flows children always did: the raw loop and the seed loop in this process
    (imports, clients, the servers' first requests), the flux-flows ones in their child. Every
    round writes under its own prefixes, so no round finds another's images.
    """
    n, conc = args.n, args.concurrency
    tag = f"-r{index + 1}" if args.repeat > 1 else ""
    jobs = workload(n)
    warm_jobs = workload(2, tag="warm-up ")
    out = Measurements(n_small=args.rss_small or (max(2, min(n // 10, 100)) if n > 4 else 0))
    out.order = round_order(args, index)

    if args.seed_sample:
        out.warmup_s["seed"] = run_seed_loop(
            svc.base_url, warm_jobs, 2, prefix=f"seed-warmup{tag}"
        ).wall_s
        reset_emulator(svc)
        out.seed = run_seed_loop(svc.base_url, jobs[: args.seed_sample], n, prefix=f"seed{tag}")
        print(f"  seed loop sample done: {out.seed.wall_s:.0f} s extrapolated", flush=True)

    flow = functools.partial(flow_child, procs, svc, workdir, concurrency=conc, rpm=args.rpm)
    if out.n_small:
        reset_emulator(svc)
        out.small = flow(
            name=f"flow-small{tag}", n=out.n_small, dest=f"s3://{BUCKET}/flow-small{tag}"
        )
        print(f"  flux-flows at N={out.n_small} (memory baseline) done", flush=True)

    def raw() -> None:
        reset_emulator(svc)
        warm = run_raw(svc.base_url, warm_jobs, 2, args.rpm, prefix=f"raw-warmup{tag}")
        out.warmup_s["raw"] = warm.wall_s
        reset_emulator(svc)
        out.raw = run_raw(svc.base_url, jobs, conc, args.rpm, prefix=f"raw{tag}")
        if args.rpm:
            out.rates["raw"] = rate_figures(emulator_log(svc), args.rpm)
        print(f"  raw loop done: {out.raw.wall_s:.1f} s", flush=True)

    def main_flow() -> None:
        reset_emulator(svc)
        out.load_before_flow = load_text()
        busy0, ours0, wall0 = machine_busy_s(), _own_and_children_cpu_s(), time.perf_counter()
        servers0 = {name: process_tree_cpu_s(pid) for name, pid in svc.pids.items()}
        profile = str(Path(args.profile).absolute()) if args.profile and index == 0 else None
        out.main = flow(
            name=f"flow-main{tag}",
            n=n,
            dest=f"s3://{BUCKET}/flow-main{tag}",
            rerun=True,
            profile_out=profile,
        )
        out.warmup_s["flow"] = out.main["warmup_s"]
        servers1 = {name: process_tree_cpu_s(pid) for name, pid in svc.pids.items()}
        busy1, ours1, wall1 = machine_busy_s(), _own_and_children_cpu_s(), time.perf_counter()
        out.server_cpu_s = {name: servers1[name] - servers0[name] for name in servers0}
        ours = sum(out.server_cpu_s.values()) + ours1 - ours0
        # Whatever else the machine did meanwhile: other people's test suites, on these cores.
        out.foreign_cores = max(0.0, (busy1 - busy0 - ours) / max(wall1 - wall0, 1e-9))

        log = emulator_log(svc)
        first_run = out.main["first_started_at"], out.main["first_ended_at"]
        # The child's warm-up run reached the emulator too: keep only the measured run's.
        measured = [(t, status) for t, status in log if first_run[0] <= t <= first_run[1]]
        out.rerun_requests = sum(1 for t, _ in log if t > first_run[1])
        if args.rpm:
            out.rates["flux-flows"] = rate_figures(measured, args.rpm)
        if measured:
            arrivals = sorted(t for t, _ in measured)
            out.edges_s = (
                arrivals[0] - first_run[0],
                first_run[1] - (arrivals[-1] + args.latency),
            )
        print("  flux-flows first run and cached re-run done", flush=True)

    def bare() -> None:
        reset_emulator(svc)
        out.bare = flow(
            name=f"flow-bare{tag}", n=n, dest=f"s3://{BUCKET}/flow-bare{tag}", thumbnails=False
        )
        out.warmup_s["bare"] = out.bare["warmup_s"]
        print("  flux-flows with thumbnails=False done", flush=True)

    steps = {"raw": raw, "flow": main_flow, "bare": bare}
    print(f"  order of this round: {', '.join(out.order)}", flush=True)
    for name in out.order:
        steps[name]()
    if args.standin_n:
        out.standin = measure_standin(args, svc, procs, workdir, tag=tag)
        print("  flux-flows against the zero-cost stand-in done", flush=True)
    return out


def results(args: argparse.Namespace, m: Measurements) -> tuple[dict[str, float], list[Phase]]:
    """The RESULT figures, and the table's rows in order."""
    n, main = args.n, m.main
    flow = Phase(
        "flux-flows generate_images",
        main["first_wall_s"],
        n,
        failed=n - main["first_counts"].get("SUCCESS", 0),
        cpu_s=main["first_cpu_s"],
    )
    rerun = Phase(
        "flux-flows cached re-run",
        main["rerun_wall_s"],
        n,
        failed=n - main["rerun_counts"].get("SUCCESS", 0),
        cpu_s=main["rerun_cpu_s"],
    )
    raw, seed = m.raw, m.seed
    assert raw is not None
    ideal = ideal_s(args)
    rss_per_image = math.nan
    if m.small is not None:
        grown = main["max_rss_after_first_kb"] - m.small["max_rss_after_first_kb"]
        rss_per_image = grown / (n - m.n_small)
    figures: dict[str, float] = {
        "n": n,
        "flow_vs_ideal": flow.wall_s / ideal if ideal else math.nan,
        "flow_vs_raw": flow.wall_s / raw.wall_s,
        "speedup_vs_seed": seed.wall_s / flow.wall_s if seed else math.nan,
        "cached_rerun_ratio": rerun.wall_s / flow.wall_s,
        "cpu_ms_per_image": 1000 * flow.cpu_s / n,
        # Same images, same servers, same run: the CPU the library adds to a hand-written loop.
        "cpu_vs_raw": flow.cpu_s / raw.cpu_s if raw.cpu_s > 0 else math.nan,
        "rss_kb_per_image": rss_per_image,
        "image_kb": main["bytes"] / max(n - flow.failed, 1) / 1024,
    }
    rows = [raw, *([seed] if seed else []), flow, rerun]
    if m.bare is not None:
        bare = Phase(
            "flux-flows, thumbnails=False",
            m.bare["first_wall_s"],
            n,
            failed=n - m.bare["first_counts"].get("SUCCESS", 0),
            cpu_s=m.bare["first_cpu_s"],
        )
        rows.append(bare)
        figures["flow_vs_raw_no_thumbnails"] = bare.wall_s / raw.wall_s
        figures["cpu_vs_raw_no_thumbnails"] = bare.cpu_s / raw.cpu_s if raw.cpu_s else math.nan
        # What the thumbnails cost: the same images in the same round, with and without them.
        figures["thumbnail_cpu_ms_per_image"] = 1000 * (flow.cpu_s - bare.cpu_s) / n
    if m.standin is not None:
        stand = m.standin
        figures["standin_images_per_s"] = stand["n"] / stand["first_wall_s"]
        figures["standin_cpu_ms_per_image"] = 1000 * stand["first_cpu_s"] / stand["n"]
    if args.rpm:
        rate = m.rates["flux-flows"]
        figures["rpm"] = args.rpm
        figures["sustained_rate_pct"] = rate.get("sustained_pct", math.nan)
        figures["peak_60s_requests"] = rate["peak_60s"]
        figures["failed"] = flow.failed
    return figures, rows


def ideal_s(args: argparse.Namespace) -> float:
    return max(args.n * args.latency / args.concurrency, args.n / args.rpm * 60 if args.rpm else 0)


def print_report(
    args: argparse.Namespace, m: Measurements, figures: dict[str, float], rows: list[Phase]
) -> None:
    n, main, ideal = args.n, m.main, ideal_s(args)
    header = (
        f"{'contender':46} {'wall s':>9} {'img/min':>8} {'x ideal':>8} {'failed':>6} "
        f"{'client CPU ms/img':>18}"
    )
    print()
    print(header)
    print("-" * len(header))
    label = "ideal (N x latency / concurrency" + (", or RPM" if args.rpm else "") + ")"
    print(f"{label:46} {ideal:9.2f} {60 * n / ideal:8.0f} {1.0:8.2f}")
    for phase in rows:
        name = phase.name + (
            f" [x{n}/{phase.extrapolated_from}]" if phase.extrapolated_from else ""
        )
        print(
            f"{name:46} {phase.wall_s:9.2f} {60 * phase.images / phase.wall_s:8.0f} "
            f"{phase.wall_s / ideal:8.2f} {phase.failed:6d} "
            f"{_fmt(1000 * phase.cpu_s / phase.images, 1):>18}"
        )
    print()
    warm = ", ".join(f"{name} {sec:.1f} s" for name, sec in m.warmup_s.items())
    print(
        f"  order: {', '.join(m.order)} (then the stand-in run); each contender's 2-image "
        f"warm-up run, not counted: {warm}"
    )
    seed = next((p for p in rows if p.extrapolated_from), None)
    if seed:
        print(f"  seed loop: timed on {seed.extrapolated_from} images, extrapolated to N={n}")
    print(
        f"  cached re-run: API calls {main['rerun_api_calls']}, cache hits "
        f"{main['rerun_cache_hits']}, requests seen by the emulator {m.rerun_requests}"
    )
    counts = {k: v for k, v in main["first_counts"].items() if v}
    print(
        f"  flux-flows first run: {main['first_api_calls']} API calls, counts {counts}, mean "
        f"image {figures['image_kb']:.0f} KB; warm-up run {main['warmup_s']:.1f} s (not counted)"
    )
    memory = f"  memory: peak RSS {main['max_rss_after_first_kb'] / 1024:.0f} MB at N={n}"
    if m.small:
        memory += (
            f", {m.small['max_rss_after_first_kb'] / 1024:.0f} MB at N={m.n_small}: "
            f"{_fmt(figures['rss_kb_per_image'], 1)} kB per extra image"
        )
    print(
        memory + f"; RSS {main['rss_before_kb'] / 1024:.0f} MB before the run, "
        f"{main['rss_after_first_kb'] / 1024:.0f} MB after"
    )
    threads = sorted(main.get("thread_cpu_s", {}).items(), key=lambda kv: -kv[1])
    print(
        "  client CPU ms/img by thread: "
        + ", ".join(f"{name} {1000 * cpu / n:.1f}" for name, cpu in threads)
    )
    servers = ", ".join(f"{name} {1000 * cpu / n:.1f}" for name, cpu in m.server_cpu_s.items())
    print(f"  server CPU ms/img while the flux-flows child ran (not client CPU): {servers}")
    print(
        f"  other processes on the machine used {m.foreign_cores:.2f} cores on average "
        f"meanwhile; before it: {m.load_before_flow}"
    )
    for label, rate in m.rates.items():
        print(
            f"  rate limit {args.rpm:g}/min, {label}: sustained "
            f"{_fmt(rate['sustained_rpm'], 0)}/min = {_fmt(rate.get('sustained_pct', math.nan), 1)}"
            f"% of the limit (between the first and last request the API saw); busiest 60 s: "
            f"{rate['peak_60s']:.0f} requests; 429s: {rate['rejected']:.0f}"
        )
    if args.rpm:
        print(f"  flux-flows end to end: {60 * n / main['first_wall_s']:.0f} images/min")
    raw = rows[0]
    print(
        f"  client CPU, flux-flows over raw: {_fmt(figures['cpu_vs_raw'])} "
        f"({1000 * main['first_cpu_s'] / n:.1f} / {1000 * raw.cpu_s / raw.images:.1f} ms/img); "
        f"flow start to first API request {_fmt(m.edges_s[0])} s, last answer to flow end "
        f"{_fmt(m.edges_s[1])} s (fixed costs the raw loop does not have)"
    )
    if m.standin is not None:
        _print_standin(args, m.standin)
    if args.profile and m.main.get("profiled") and Path(args.profile).exists():
        print()
        summary = summarize_profile(
            Path(args.profile),
            n,
            figures["cpu_ms_per_image"],
            thread_cpu_s=main.get("thread_cpu_s"),
        )
        print("\n".join(summary))


def _print_standin(args: argparse.Namespace, stand: dict[str, Any]) -> None:
    n, wall = stand["n"], stand["first_wall_s"]
    ideal = n * args.standin_latency / args.standin_concurrency
    servers = ", ".join(
        f"{name} {1000 * cpu / n:.2f}" for name, cpu in stand["server_cpu_s"].items()
    )
    print()
    print(
        f"  zero-cost stand-in API (one precomputed {stand['image_bytes'] / 1024:.0f} KB JPEG, "
        f"latency {args.standin_latency:g} s, {args.standin_concurrency} in flight, "
        f"destination: {stand['dest']}), N={n}:"
    )
    print(
        f"    flux-flows generate_images: {wall:.2f} s, {n / wall:.0f} images/s "
        f"(the API allows {n / ideal:.0f}/s), failed {n - stand['first_counts'].get('SUCCESS', 0)}"
        f", client CPU {1000 * stand['first_cpu_s'] / n:.1f} ms/img = "
        f"{stand['first_cpu_s'] / wall:.2f} cores"
    )
    threads = sorted(stand.get("thread_cpu_s", {}).items(), key=lambda kv: -kv[1])
    print(
        "    client CPU ms/img by thread: "
        + ", ".join(f"{name} {1000 * cpu / n:.1f}" for name, cpu in threads)
    )
    print(
        f"    server CPU ms/img (warm-up included): {servers}; the machine was "
        f"{stand['machine_cores']:.2f} cores busy in all; the stand-in answered "
        f"{stand['served']} generations"
    )


def orchestrate(args: argparse.Namespace) -> int:
    from importlib.metadata import version

    started = time.perf_counter()
    print(f"flux-flows batch benchmark, {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"  command: python benchmarks/bench_batch.py {' '.join(args.argv) or '(defaults)'}")
    print(
        f"  N={args.n} latency={args.latency}s concurrency={args.concurrency} "
        f"image={args.image_kb} KB rpm={args.rpm or '-'} seed sample={args.seed_sample} "
        f"repeat={args.repeat}"
    )
    print(
        f"  machine: nproc={os.cpu_count()} python={platform.python_version()} "
        f"prefect={version('prefect')} ({platform.machine()}); flux-flows {git_state()}"
    )
    print(f"  start: {uptime_text()}")
    print(
        "  Prefect API: a `prefect server start` on loopback with a temporary PREFECT_HOME, "
        "started before timing; every contender does a 2-image warm-up run first "
        "(not counted)."
    )
    sys.stdout.flush()
    workdir = Path(tempfile.mkdtemp(prefix="flux-bench-"))
    procs = Processes(workdir)
    rounds: list[tuple[Measurements, dict[str, float], list[Phase]]] = []
    try:
        with services(args, workdir, procs) as svc:
            os.environ.update({k: v for k, v in svc.env.items() if k.startswith("AWS_")})
            s3_client(1).create_bucket(Bucket=BUCKET)
            print(f"  services up in {time.perf_counter() - started:.1f} s", flush=True)
            for index in range(args.repeat):
                if args.repeat > 1:
                    print(f"\nround {index + 1}/{args.repeat}", flush=True)
                measured = measure(args, svc, procs, workdir, index)
                figures, rows = results(args, measured)
                print_report(args, measured, figures, rows)
                if args.repeat > 1:
                    print()
                    print(f"ROUND {index + 1}/{args.repeat} " + result_line(figures), flush=True)
                rounds.append((measured, figures, rows))
            if args.profile:
                rounds[-1][0].components = components_child(procs, svc, workdir, args.concurrency)
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.profile and rounds[-1][0].components:
        print()
        print(
            "  CPU per image of each step alone (process CPU time, 64 calls each, 1,280 for "
            "the sub-millisecond ones):"
        )
        for name, value in rounds[-1][0].components.items():
            print(f"    {value:7.2f} ms  {name}")
    if args.repeat > 1:
        print_aggregate(args, rounds)
    print(f"  end: {uptime_text()}")
    print(f"  benchmark took {time.perf_counter() - started:.0f} s")
    print()
    if args.repeat == 1:
        print("RESULT " + result_line(rounds[0][1]))
    else:
        keys = list(rounds[0][1])
        spread = {k: _spread([fig.get(k, math.nan) for _, fig, _ in rounds]) for k in keys}
        print(
            f"RANGE repeat={args.repeat} "
            + " ".join(
                f"{k}={_fmt_result(lo)}-{_fmt_result(hi)}" for k, (_, lo, hi) in spread.items()
            )
        )
        print(
            f"RESULT repeat={args.repeat} "
            + " ".join(f"{k}={_fmt_result(med)}" for k, (med, _, _) in spread.items())
        )
    return 0


def _spread(values: Sequence[float]) -> tuple[float, float, float]:
    """Median, min and max of the values that are numbers (NaN where none is)."""
    kept = sorted(v for v in values if v is not None and not math.isnan(float(v)))
    if not kept:
        return math.nan, math.nan, math.nan
    median = statistics.median(kept)
    if all(isinstance(v, int) for v in kept) and float(median).is_integer():
        median = int(median)  # counts stay counts (n, failed)
    return median, kept[0], kept[-1]


def print_aggregate(
    args: argparse.Namespace, rounds: Sequence[tuple[Measurements, dict[str, float], list[Phase]]]
) -> None:
    """Medians and ranges over the rounds, computed here (the RANGE and RESULT lines too)."""
    k = len(rounds)
    print()
    print(f"aggregate over {k} rounds: median [min-max]")
    print(
        "  orders: "
        + "; ".join(f"round {i + 1}: {', '.join(m.order)}" for i, (m, _, _) in enumerate(rounds))
    )
    header = f"  {'contender':46} {'wall s':>24} {'client CPU ms/img':>24}"
    print(header)
    print("  " + "-" * (len(header) - 2))

    def cell(values: Sequence[float], digits: int) -> str:
        med, lo, hi = _spread(values)
        return f"{med:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"

    names = [phase.name for phase in rounds[0][2]]
    for row, name in enumerate(names):
        phases = [rows[row] for _, _, rows in rounds]
        cpu = [1000 * p.cpu_s / p.images for p in phases]
        print(f"  {name:46} {cell([p.wall_s for p in phases], 2):>24} {cell(cpu, 2):>24}")
    others = [m.foreign_cores for m, _, _ in rounds]
    print(
        f"  other processes during the flux-flows run, cores: {cell(others, 2)} "
        f"(rounds: {', '.join(f'{x:.2f}' for x in others)})"
    )
    print()
    print(f"  {'figure':28} {'median':>9} {'min':>9} {'max':>9}   per round")
    for key in rounds[0][1]:
        values = [fig.get(key, math.nan) for _, fig, _ in rounds]
        med, lo, hi = _spread(values)
        each = " ".join(_fmt_result(v) for v in values)
        print(
            f"  {key:28} {_fmt_result(med):>9} {_fmt_result(lo):>9} {_fmt_result(hi):>9}   {each}"
        )
    print()


def result_line(figures: dict[str, float]) -> str:
    return " ".join(f"{k}={_fmt_result(v)}" for k, v in figures.items())


def _fmt_result(value: float) -> str:
    return str(value) if isinstance(value, int) else _fmt(float(value), 2)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="flux-flows vs ideal, a hand-written asyncio loop and a sequential script."
    )
    parser.add_argument("--n", type=int, default=1000, help="images per contender")
    parser.add_argument("--latency", type=float, default=1.0, help="emulator seconds per image")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--image-kb", type=int, default=300, help="JPEG size the emulator sends")
    parser.add_argument("--rpm", type=float, default=None, help="emulator and client RPM limit")
    parser.add_argument(
        "--seed-sample", type=int, default=20, help="images the sequential loop is timed on"
    )
    parser.add_argument(
        "--rss-small", type=int, default=0, help="small N for RSS growth (default N/10, <= 100)"
    )
    parser.add_argument(
        "--standin-n",
        type=int,
        default=None,
        help="images for the zero-cost stand-in run (default 2 x N; 0 skips it)",
    )
    parser.add_argument("--standin-latency", type=float, default=0.1)
    parser.add_argument("--standin-concurrency", type=int, default=64)
    parser.add_argument("--standin-dest", choices=("local", "s3"), default="local")
    parser.add_argument(
        "--bare-row",
        dest="no_thumbnails_row",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time flux-flows with thumbnails=False, for cpu_vs_raw_no_thumbnails",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="K",
        help="rounds of every contender, in a rotated order each round; prints each round's "
        "RESULT (as ROUND i/K), then medians and ranges over the rounds (RANGE and RESULT)",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        default=None,
        help="py-spy the measured flux-flows run (collapsed stacks to FILE) and print a summary",
    )
    args = parser.parse_args(argv)
    args.argv = list(argv or [])
    if args.n < 1 or args.concurrency < 1 or args.latency < 0 or args.repeat < 1:
        parser.error("--n, --concurrency and --repeat must be >= 1 and --latency >= 0")
    args.seed_sample = min(args.seed_sample, args.n)
    if args.standin_n is None:
        args.standin_n = 2 * args.n
    return args


def _terminate_on_sigterm() -> None:
    """SIGTERM behaves like Ctrl-C, so the finally-blocks stop every child."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_emulator"]:
        serve_emulator(argv[1:])
        return 0
    if argv[:1] == ["_standin"]:
        serve_standin(argv[1:])
        return 0
    if argv[:1] == ["_components"]:
        _terminate_on_sigterm()
        run_components_child(argv[1:])
        return 0
    if argv[:1] == ["_flow"]:
        _terminate_on_sigterm()
        run_flow_child(argv[1:])
        return 0
    _terminate_on_sigterm()
    try:
        return orchestrate(parse_args(argv))
    except KeyboardInterrupt:
        print("interrupted: every server and child started here was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
