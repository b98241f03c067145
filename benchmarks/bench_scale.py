"""Scale benchmark (issue 15): where a big batch runs, side by side in one run.

Each contender generates the same N small images into its own fresh local folder, against a
cheap stand-in of the Fireworks API, with the same number of images in flight:

- (a) one process, images on plain threads (the default);
- (b) a Dask `LocalCluster` of 2 worker processes x 2 threads, the plan cut into chunks
  (`generate_images.with_options(task_runner=DaskTaskRunner(...))`);
- (c) one Prefect task run per image (`per_image_tasks=True`), for the record: the old path;
- (d) a process work pool with 2 workers, the batch's chunks (default `chunk_size`) as runs of
  the chunk deployment `render-chunk/flux-flows-chunks`: the pool created with `prefect
  work-pool create --type process`, the deployment with the documented `prefect --no-prompt
  deploy --prefect-file deployments/prefect.yaml --name flux-flows-chunks`, two `prefect worker
  start` processes (stand-in URL and key in their env, PREFECT_WORKER_QUERY_SECONDS=1), waited
  for until both are online; its CPU is the batch process plus both workers' process trees
  (their flow-run processes included); `--pool-n 0` skips it, and if a step fails the row says
  why and the other rows still count;

plus the same (a) and (b) into moto's S3 at a smaller N, peak RSS of (a) at a small N and at N
(each in a fresh process), optionally a 100,000-image run in one process with a cached re-run
that must make 0 API calls, and optionally `flux-flows plan` of a generated 1,000,000-row file.

What runs where, each in its own process on 127.0.0.1, all stopped on exit, error or Ctrl-C:

- the stand-in API: a hand-written asyncio HTTP/1.1 server that answers every text_to_image
  POST, after `--latency` seconds, with the same small precomputed JPEG (real and complete, made
  once with Pillow) and `Seed` / `Finish-Reason: SUCCESS` headers. Unlike the emulator it
  renders nothing, so its CPU (~0.1 ms a request) does not crowd the 2 cores; it counts the
  requests it saw, so "0 API calls" is checked from the API's side;
- `prefect server start` with a temporary PREFECT_HOME, PREFECT_API_URL set for the children;
- moto's S3 server, only for the S3 rows;
- one child per contender: a 2-image warm-up run (not counted; for Dask, after the cluster is
  up), then the measured run. The child itself reads, right around the measured run, its own
  CPU time plus its descendants' (Dask's nanny and worker processes), the Prefect server's and
  the stand-in's (psutil on their pids), and its peak RSS (getrusage) at the end of the run.
  The Prefect server's CPU is read once it has gone quiet after the run, because it records
  task runs from events that arrive after the client is done.

Usage:
    python benchmarks/bench_scale.py                        # defaults: N=20000, ~9 min
    python benchmarks/bench_scale.py --n-large 100000 --plan-rows 1000000
    python benchmarks/bench_scale.py --n 200 --rss-small 50 --tasks-n 50 --s3-n 50  # quick
    python benchmarks/bench_scale.py --n 2000 --rss-small 0 --tasks-n 0 --s3-n 0  # (a) (b) (d)

The last line printed is machine-readable:
    RESULT n=.. threads_img_s=.. dask_img_s=.. dask_vs_threads=.. tasks_vs_threads=..
    threads_cpu_ms_per_image=.. dask_cpu_ms_per_image=.. server_ms_per_image=..
    rss_kb_per_image=.. [workpool_..] [s3_..] [large_..] [plan_..] workpool=ran|n/a
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import io
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from bench_batch import (  # noqa: E402  (the sibling script: servers in processes, CPU)
    REPO,
    Processes,
    _fmt,
    _http_ok,
    _terminate_on_sigterm,
    free_port,
    git_state,
    http_json,
    machine_busy_s,
    uptime_text,
    wait_until,
)

API_KEY = "bench-key"  # the stand-in accepts any key
BUCKET = "flux-scale"
CHILD_TIMEOUT_S = 4 * 3600.0  # a 100,000-image run plus its re-run, or 20,000 task runs
SETTLE_MAX_S = 120.0  # the longest the Prefect server is waited on to go quiet after a run
# Row (d): the pool and chunk deployment exactly as deployments/prefect.yaml declares them.
WORK_POOL = "flux-flows-pool"
CHUNK_DEPLOYMENT = "render-chunk/flux-flows-chunks"
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
POOL_READY_S = 180.0  # deploy + 2 workers registering, on 2 busy cores

# ============================================================================================
# Workload
# ============================================================================================

SUBJECTS = ("lighthouse", "fox", "teapot", "glacier", "bicycle", "orchard", "robot", "harbor")


def prompts_for(n: int, tag: str = "") -> list[str]:
    """N distinct plain-string prompts (the form the issue's "before" figures used)."""
    return [
        f"{tag}scale image {i}: a watercolor {SUBJECTS[i % len(SUBJECTS)]} at dusk, soft light"
        for i in range(n)
    ]


# ============================================================================================
# Child role: the stand-in API
# ============================================================================================


def make_jpeg(side: int = 96) -> bytes:
    """A small, real, complete JPEG (SOI ... EOI): the client checks both and reads the size."""
    from PIL import Image

    image = Image.new("RGB", (side, side))
    image.putdata(
        [
            ((x * 5) % 256, (y * 3) % 256, ((x ^ y) * 7) % 256)
            for y in range(side)
            for x in range(side)
        ]
    )
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


class _StandIn(asyncio.Protocol):
    """HTTP/1.1 with keep-alive, one request at a time per connection (as httpx sends them).

    text_to_image: the fixed JPEG after the latency, the request's seed echoed in `Seed`.
    GET /_bench/stats: {"requests": how many text_to_image requests arrived so far}.
    """

    jpeg: bytes = b""
    latency: float = 0.0
    requests = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            method, path = ([*head[0].split(" "), "", ""])[:2]
            self.handle(method, path, body)

    def handle(self, method: str, path: str, body: bytes) -> None:
        if method == "POST" and path.endswith("/text_to_image"):
            type(self).requests += 1
            try:
                seed = int(json.loads(body).get("seed") or 0)
            except (ValueError, TypeError, AttributeError):
                seed = 0
            headers = (
                f"Content-Type: image/jpeg\r\nSeed: {seed}\r\nFinish-Reason: SUCCESS\r\n"
                f"x-request-id: standin-{self.requests}\r\n"
            )
            answer = self._response(200, headers, self.jpeg)
            asyncio.get_running_loop().call_later(self.latency, self._send, answer)
        elif method == "GET" and path == "/_bench/stats":
            payload = json.dumps({"requests": type(self).requests}).encode()
            self._send(self._response(200, "Content-Type: application/json\r\n", payload))
        else:
            self._send(self._response(404, "Content-Type: text/plain\r\n", b"not found"))

    @staticmethod
    def _response(status: int, headers: str, payload: bytes) -> bytes:
        reason = {200: "OK", 404: "Not Found"}[status]
        head = f"HTTP/1.1 {status} {reason}\r\n{headers}Content-Length: {len(payload)}\r\n\r\n"
        return head.encode("latin-1") + payload

    def _send(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)


def serve_standin(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench_scale.py _standin")
    parser.add_argument("--latency", type=float, required=True)
    parser.add_argument("--port-file", required=True)
    args = parser.parse_args(argv)
    _StandIn.jpeg = make_jpeg()
    _StandIn.latency = args.latency

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        server = await loop.create_server(_StandIn, sock=sock, backlog=1024)
        for s in server.sockets:  # no Nagle stalls on small keep-alive answers
            with contextlib.suppress(OSError):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(sock.getsockname()[1]))
        tmp.replace(args.port_file)
        await server.serve_forever()

    asyncio.run(main())


def standin_requests(url: str) -> int:
    return int(http_json(url + "/_bench/stats")["requests"])


# ============================================================================================
# Child role: one contender in a fresh process
# ============================================================================================


def tree_cpu_s(pid: int) -> float:
    """User+system seconds of a process and its descendants, those that ended included.

    `bench_batch.process_tree_cpu_s` sums the live processes only; a work-pool worker's flow-run
    processes (or a restarted Dask worker) end during the run, and their CPU then shows up only
    in their parent's `children_*` times, which this adds.
    """
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def _tree_cpu(pids: Sequence[int]) -> float:
    return sum(tree_cpu_s(pid) for pid in pids)


def _settle(pid: int, quiet_cpu_per_s: float = 0.05, step: float = 1.0) -> float:
    """Wait until a server's process tree uses < `quiet_cpu_per_s` cores; seconds waited."""
    started = time.perf_counter()
    last = tree_cpu_s(pid)
    while time.perf_counter() - started < SETTLE_MAX_S:
        time.sleep(step)
        now = tree_cpu_s(pid)
        if now - last < quiet_cpu_per_s * step:
            break
        last = now
    return time.perf_counter() - started


def contact_sheet_figures(dest: str) -> dict[str, float]:
    """Pages of the run's contact sheet in a local destination (the issue's "before": one page
    of 17.5 MB at 20,000 images)."""
    if dest.startswith("s3://"):
        return {}
    sheets = sorted(
        Path(dest, "runs").glob("*/contact-sheet.html"), key=lambda p: p.stat().st_mtime
    )
    if not sheets:
        return {}
    index = sheets[-1].stat().st_size
    # Up to a page's worth of images the index is the sheet; past it, it links to the pages.
    pages = [p.stat().st_size for p in (sheets[-1].parent / "contact-sheet").glob("*.html")]
    return {
        "sheet_index_kb": index / 1024,
        "sheet_pages": len(pages) or 1,
        "sheet_max_page_kb": max(pages or [index]) / 1024,
    }


def _run_once(mode: str, prompts: list[str], dest: str, conc: int, runner: Any) -> Any:
    from flux_flows.flows import generate_images

    if mode == "dask":
        return generate_images.with_options(task_runner=runner)(prompts, dest, max_concurrency=conc)
    if mode == "tasks":
        return generate_images(prompts, dest, max_concurrency=conc, per_image_tasks=True)
    if mode == "workpool":
        return generate_images(
            prompts, dest, max_concurrency=conc, chunk_deployment=CHUNK_DEPLOYMENT
        )
    return generate_images(prompts, dest, max_concurrency=conc)


@contextlib.contextmanager
def _dask_runner(mode: str) -> Iterator[Any]:
    if mode != "dask":
        yield None
        return
    import distributed
    from prefect_dask import DaskTaskRunner

    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=2,
        processes=True,
        dashboard_address=None,
        silence_logs=40,
    ) as cluster:
        yield DaskTaskRunner(address=cluster.scheduler_address)


def run_contender(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench_scale.py _contender")
    parser.add_argument("--mode", choices=("threads", "dask", "tasks", "workpool"), required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--dest", required=True)
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument("--result-file", required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--standin-pid", type=int, required=True)
    parser.add_argument("--standin-url", required=True)
    parser.add_argument("--extra-pids", default="", help="more processes of this contender")
    parser.add_argument("--store-pid", type=int, default=0, help="moto's S3 server, if used")
    args = parser.parse_args(argv)

    import logging

    logging.getLogger("botocore").setLevel(logging.WARNING)
    me = os.getpid()
    extra = [int(p) for p in args.extra_pids.split(",") if p]
    out: dict[str, Any] = {"mode": args.mode, "n": args.n}
    with _dask_runner(args.mode) as runner:
        started = time.perf_counter()
        warm = _run_once(args.mode, prompts_for(2, "warm-up "), args.dest + "-warmup", 2, runner)
        out["warmup_s"] = time.perf_counter() - started
        out["warmup_ok"] = warm.counts.get("SUCCESS", 0)
        del warm
        prompts = prompts_for(args.n)
        gc.collect()
        _settle(args.server_pid)
        out["rss_before_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        server0, standin0 = (
            tree_cpu_s(args.server_pid),
            tree_cpu_s(args.standin_pid),
        )
        store0 = tree_cpu_s(args.store_pid) if args.store_pid else 0.0
        requests0, busy0 = standin_requests(args.standin_url), machine_busy_s()
        cpu0 = _tree_cpu([me, *extra])
        wall0 = time.perf_counter()
        report = _run_once(args.mode, prompts, args.dest, args.concurrency, runner)
        out["wall_s"] = time.perf_counter() - wall0
        out["cpu_s"] = _tree_cpu([me, *extra]) - cpu0
        out["max_rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        standin1, busy1 = tree_cpu_s(args.standin_pid), machine_busy_s()
        server_at_end = tree_cpu_s(args.server_pid)
        store1 = tree_cpu_s(args.store_pid) if args.store_pid else 0.0
        out["store_cpu_s"] = store1 - store0
        out["requests"] = standin_requests(args.standin_url) - requests0
        out["counts"] = {str(k): v for k, v in report.counts.items() if v}
        out["api_calls"] = report.api_calls
        out.update(contact_sheet_figures(args.dest))
        out["cache_hits"] = report.cache_hits
        del report
        out["settle_s"] = _settle(args.server_pid)
        out["server_cpu_s"] = tree_cpu_s(args.server_pid) - server0
        out["standin_cpu_s"] = standin1 - standin0
        ours = out["cpu_s"] + server_at_end - server0 + out["standin_cpu_s"] + out["store_cpu_s"]
        out["foreign_cores"] = max(0.0, (busy1 - busy0 - ours) / out["wall_s"])
        if args.rerun:
            requests0 = standin_requests(args.standin_url)
            cpu0, wall0 = _tree_cpu([me, *extra]), time.perf_counter()
            report = _run_once(args.mode, prompts, args.dest, args.concurrency, runner)
            out["rerun_wall_s"] = time.perf_counter() - wall0
            out["rerun_cpu_s"] = _tree_cpu([me, *extra]) - cpu0
            out["rerun_requests"] = standin_requests(args.standin_url) - requests0
            out["rerun_api_calls"] = report.api_calls
            out["rerun_cache_hits"] = report.cache_hits
            out["rerun_counts"] = {str(k): v for k, v in report.counts.items() if v}
            out["max_rss_after_rerun_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(args.result_file).write_text(json.dumps(out))


# ============================================================================================
# The orchestrator
# ============================================================================================


@dataclass
class Services:
    env: dict[str, str]
    standin_url: str
    server_pid: int
    standin_pid: int
    s3_endpoint: str | None = None
    moto_pid: int | None = None
    workers: list[int] = field(default_factory=list)


@contextlib.contextmanager
def services(args: argparse.Namespace, workdir: Path, procs: Processes) -> Iterator[Services]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "PREFECT_", "FIREWORKS_", "FLUX_FLOWS_"))
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    prefect_port = free_port()
    prefect_api = f"http://127.0.0.1:{prefect_port}/api"
    prefect_home = workdir / "prefect-home"
    prefect_home.mkdir(parents=True, exist_ok=True)
    prefect_env = {
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{prefect_home}/prefect.db",
    }
    prefect_cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    prefect_cmd += ["--port", str(prefect_port), "--no-ui", "--analytics-off"]
    prefect = procs.spawn("prefect-server", prefect_cmd, {**env, **prefect_env})
    port_file = workdir / "standin.port"
    standin_cmd = [sys.executable, str(HERE), "_standin", "--latency", str(args.latency)]
    standin = procs.spawn("standin", [*standin_cmd, "--port-file", str(port_file)], env)
    moto = None
    s3_endpoint = None
    if args.s3_n:
        moto_port = free_port()
        s3_endpoint = f"http://127.0.0.1:{moto_port}"
        moto = procs.spawn(
            "moto",
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
            env,
        )
    wait_until(port_file.exists, "the stand-in API", standin)
    standin_url = f"http://127.0.0.1:{int(port_file.read_text())}"
    if moto is not None:
        wait_until(lambda: _http_ok(str(s3_endpoint)), "moto", moto)
    wait_until(lambda: _http_ok(prefect_api + "/health"), "the Prefect server", prefect)
    child_env = {
        **env,
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_API_URL": prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "FIREWORKS_API_KEY": API_KEY,
        "FIREWORKS_BASE_URL": standin_url + "/inference/v1",
        "FLUX_FLOWS_SPILL_DIR": str(workdir / "spill"),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(workdir / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "aws-credentials"),
    }
    if s3_endpoint:
        child_env["AWS_ENDPOINT_URL"] = s3_endpoint
    yield Services(
        env=child_env,
        standin_url=standin_url,
        server_pid=prefect.pid,
        standin_pid=standin.pid,
        s3_endpoint=s3_endpoint,
        moto_pid=moto.pid if moto else None,
    )


def contender(
    procs: Processes,
    svc: Services,
    workdir: Path,
    *,
    name: str,
    mode: str,
    n: int,
    concurrency: int,
    dest: str,
    rerun: bool = False,
    extra_pids: Sequence[int] = (),
) -> dict[str, Any]:
    result_file = workdir / f"{name}.json"
    command = [sys.executable, str(HERE), "_contender", "--mode", mode, "--n", str(n)]
    command += ["--concurrency", str(concurrency), "--dest", dest]
    command += ["--result-file", str(result_file), "--server-pid", str(svc.server_pid)]
    command += ["--standin-pid", str(svc.standin_pid), "--standin-url", svc.standin_url]
    if extra_pids:
        command += ["--extra-pids", ",".join(map(str, extra_pids))]
    if dest.startswith("s3://") and svc.moto_pid:
        command += ["--store-pid", str(svc.moto_pid)]
    if rerun:
        command.append("--rerun")
    print(f"  {name}: {mode}, N={n} -> {dest} ...", flush=True)
    proc = procs.spawn(name, command, svc.env)
    try:
        code = proc.wait(CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        procs.stop(proc)
        raise RuntimeError(f"{name} did not finish in {CHILD_TIMEOUT_S:.0f} s") from None
    if code != 0 or not result_file.exists():
        raise RuntimeError(f"{name} failed (exit {code}):\n{procs.log_tail(name)}")
    out = dict(json.loads(result_file.read_text()))
    out["name"] = name
    out["dest"] = dest
    print(
        f"    {out['wall_s']:.1f} s, {n / out['wall_s']:.0f} images/s, "
        f"{1000 * out['cpu_s'] / n:.2f} ms CPU/image, server "
        f"{1000 * out['server_cpu_s'] / n:.2f} ms/image, peak RSS {out['max_rss_kb'] / 1024:.0f} MB",
        flush=True,
    )
    return out


def measured_command(command: Sequence[str], env: dict[str, str]) -> dict[str, float]:
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
        "output": output.decode(errors="replace"),  # type: ignore[dict-item]
    }


def write_prompt_file(path: Path, rows: int) -> None:
    with path.open("w") as f:
        for start in range(0, rows, 10_000):
            f.write(
                "".join(
                    f"plan row {i}: a watercolor {SUBJECTS[i % len(SUBJECTS)]} at dusk, soft light\n"
                    for i in range(start, min(rows, start + 10_000))
                )
            )


def _pool_state(api_url: str) -> dict[str, Any]:
    """The pool's workers (online ones) and the chunk deployment, as the Prefect API sees them."""
    import httpx

    with httpx.Client(base_url=api_url.rstrip("/") + "/", timeout=10.0) as http:
        answer = http.post(f"work_pools/{WORK_POOL}/workers/filter", json={})
        workers = answer.json() if answer.status_code == 200 else []
        answer = http.get(f"deployments/name/{CHUNK_DEPLOYMENT}")
        deployment = answer.json() if answer.status_code == 200 else None
    return {
        "online": sorted(w["name"] for w in workers if w.get("status") == "ONLINE"),
        "deployment": deployment,
    }


@contextlib.contextmanager
def work_pool_workers(svc: Services, procs: Processes, workdir: Path) -> Iterator[str | None]:
    """Row (d): a process pool, the chunk deployment and 2 process workers, as
    deployments/README.md (section 8) tells a user; yields None once both workers are online and
    the deployment is on the pool, else why not (the other rows still count)."""
    prefect = [sys.executable, "-m", "prefect"]

    def step(*args: str) -> str | None:
        done = subprocess.run(
            [*prefect, *args],
            env=svc.env,
            capture_output=True,
            text=True,
            cwd=str(REPO),
            timeout=300,
        )
        if done.returncode == 0:
            return None
        return f"{' '.join(args[:3])} failed: {(done.stdout + done.stderr).strip()[-300:]}"

    why = step("work-pool", "create", WORK_POOL, "--type", "process", "--overwrite")
    if why:
        yield why
        return
    # What a worker host provides (as tests/test_deployment.py's worker_env): the Prefect API,
    # the stand-in's URL and key; polled every second so a chunk does not wait 10 s for a worker.
    # They start while the deployment is made: both take seconds of start-up.
    env = {**svc.env, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    command = [*prefect, "worker", "start", "--pool", WORK_POOL, "--type", "process"]
    workers = [
        procs.spawn(f"worker-{i}", [*command, "--name", f"bench-worker-{i}"], env) for i in range(2)
    ]
    try:
        # The documented command, only this one deployment (the others need S3 feeds).
        why = step(
            "--no-prompt", "deploy", "--prefect-file", str(PREFECT_FILE), "--name",
            CHUNK_DEPLOYMENT.partition("/")[2],
        )  # fmt: skip
        api_url = svc.env["PREFECT_API_URL"]
        deployment = _pool_state(api_url)["deployment"]
        if not why and (not deployment or deployment.get("work_pool_name") != WORK_POOL):
            why = f"{CHUNK_DEPLOYMENT} is not on {WORK_POOL} after prefect deploy: {deployment}"
        if why:
            yield why
            return
        deadline = time.monotonic() + POOL_READY_S
        while len(_pool_state(api_url)["online"]) < len(workers):
            dead = [w for w in workers if w.poll() is not None]
            if dead or time.monotonic() > deadline:
                names = ", ".join(_pool_state(api_url)["online"]) or "none"
                why = f"{len(dead)} worker(s) exited" if dead else "timed out"
                yield f"workers not online ({why}; online: {names}; logs in {workdir})"
                return
            time.sleep(0.5)
        svc.workers = [w.pid for w in workers]
        yield None
    finally:
        for worker in workers:
            procs.stop(worker)
        svc.workers = []


def chunk_runs(api_url: str, procs: Processes) -> dict[str, Any]:
    """The chunk deployment's flow runs by final state (warm-up included), and how many runs each
    worker took (from the workers' logs): evidence that row (d) ran on the pool, on both."""
    import httpx

    with httpx.Client(base_url=api_url.rstrip("/") + "/", timeout=30.0) as http:
        answer = http.post(
            "flow_runs/filter",
            json={"deployments": {"name": {"any_": [CHUNK_DEPLOYMENT.partition("/")[2]]}}},
        )
        answer.raise_for_status()
        states = Counter(str((r.get("state") or {}).get("type")) for r in answer.json())
    per_worker = {
        f"worker-{i}": procs.log_tail(f"worker-{i}", 100_000).count("submitted to infrastructure")
        for i in range(2)
    }
    return {"chunk_states": dict(states), "chunks_per_worker": per_worker}


@dataclass
class Row:
    label: str
    data: dict[str, Any] | None = None
    note: str = ""


def measure(args: argparse.Namespace, svc: Services, procs: Processes, workdir: Path) -> list[Row]:
    conc, n = args.concurrency, args.n
    out = workdir / "out"
    rows: list[Row] = []

    def run(label: str, **kw: Any) -> dict[str, Any]:
        data = contender(procs, svc, workdir, concurrency=conc, **kw)
        rows.append(Row(label, data))
        return data

    run("(a) one process, threads", name="a-threads", mode="threads", n=n, dest=f"{out}/a")
    run("(b) Dask 2 workers x 2 threads, chunks", name="b-dask", mode="dask", n=n, dest=f"{out}/b")
    if args.tasks_n:
        run(
            "(c) task run per image (for the record)",
            name="c-tasks",
            mode="tasks",
            n=args.tasks_n,
            dest=f"{out}/c",
        )
    if not args.pool_n:
        note = "not available: skipped (--pool-n 0)"
        print(f"  (d) work pool: {note}", flush=True)
        rows.append(Row("(d) work pool, 2 process workers", None, note))
    else:
        with work_pool_workers(svc, procs, workdir) as why:
            if why:
                print(f"  (d) work pool: not available: {why}", flush=True)
                rows.append(Row("(d) work pool, 2 process workers", None, f"not available: {why}"))
            else:
                try:
                    data = run(
                        "(d) work pool, 2 process workers",
                        name="d-workpool",
                        mode="workpool",
                        n=args.pool_n,
                        dest=f"{out}/d",
                        extra_pids=svc.workers,
                    )
                    data.update(chunk_runs(svc.env["PREFECT_API_URL"], procs))
                    print(
                        f"    chunk runs {data['chunk_states']}, per worker "
                        f"{data['chunks_per_worker']}",
                        flush=True,
                    )
                except RuntimeError as exc:  # its failure must not cost the other rows
                    note = f"failed: {str(exc).splitlines()[0]} (log: {workdir}/d-workpool.log)"
                    print(f"  (d) work pool: {note}", flush=True)
                    rows.append(Row("(d) work pool, 2 process workers", None, note))
    if args.rss_small:
        run(
            "(a) at the small N, for RSS",
            name="a-small",
            mode="threads",
            n=args.rss_small,
            dest=f"{out}/a-small",
        )
    if args.s3_n:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=svc.s3_endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket=BUCKET)
        s3 = f"s3://{BUCKET}"
        run(
            "(a) threads, S3 (moto)", name="s3-threads", mode="threads", n=args.s3_n, dest=f"{s3}/a"
        )
        run("(b) Dask chunks, S3 (moto)", name="s3-dask", mode="dask", n=args.s3_n, dest=f"{s3}/b")
    if args.n_large:
        run(
            "(a) large run, threads",
            name="large",
            mode="threads",
            n=args.n_large,
            dest=f"{out}/large",
            rerun=True,
        )
    if args.plan_rows:
        source = workdir / f"prompts-{args.plan_rows}.txt"
        write_prompt_file(source, args.plan_rows)
        print(
            f"  plan of {args.plan_rows} rows ({source.stat().st_size / 1e6:.0f} MB) ...",
            flush=True,
        )
        command = [
            sys.executable,
            "-m",
            "flux_flows.cli",
            "plan",
            str(source),
            "--to",
            f"{out}/plan",
        ]
        figures = measured_command(command, svc.env)
        rows.append(Row(f"flux-flows plan, {args.plan_rows} rows", dict(figures)))
        print(
            f"    {figures['wall_s']:.1f} s, peak RSS {figures['max_rss_kb'] / 1024:.0f} MB",
            flush=True,
        )
    return rows


def _get(rows: list[Row], name: str) -> dict[str, Any] | None:
    return next((r.data for r in rows if r.data and r.data.get("name") == name), None)


def figures_of(args: argparse.Namespace, rows: list[Row]) -> dict[str, Any]:
    a, b, c = _get(rows, "a-threads"), _get(rows, "b-dask"), _get(rows, "c-tasks")
    d, small = _get(rows, "d-workpool"), _get(rows, "a-small")
    assert a is not None and b is not None

    def rate(x: dict[str, Any]) -> float:
        return x["n"] / x["wall_s"]

    def per_image_ms(x: dict[str, Any], key: str) -> float:
        return 1000 * x[key] / x["n"]

    out: dict[str, Any] = {"n": args.n, "threads_img_s": rate(a), "dask_img_s": rate(b)}
    out["dask_vs_threads"] = rate(b) / rate(a)
    if c:
        out["tasks_img_s"] = rate(c)
        out["tasks_vs_threads"] = rate(c) / rate(a)
    out["workpool_vs_threads"] = rate(d) / rate(a) if d else math.nan
    if d:
        out["workpool_n"] = d["n"]
        out["workpool_img_s"] = rate(d)
        out["workpool_cpu_ms_per_image"] = per_image_ms(d, "cpu_s")
        out["server_ms_per_image_workpool"] = per_image_ms(d, "server_cpu_s")
    out["threads_cpu_ms_per_image"] = per_image_ms(a, "cpu_s")
    out["dask_cpu_ms_per_image"] = per_image_ms(b, "cpu_s")
    if c:
        out["tasks_cpu_ms_per_image"] = per_image_ms(c, "cpu_s")
    out["server_ms_per_image_threads"] = per_image_ms(a, "server_cpu_s")
    out["server_ms_per_image_dask"] = per_image_ms(b, "server_cpu_s")
    if c:
        out["server_ms_per_image_tasks"] = per_image_ms(c, "server_cpu_s")
    # The target's figure: the worst of the scale paths (a), (b) and (d) if it ran.
    out["server_ms_per_image"] = max(
        per_image_ms(x, "server_cpu_s") for x in (a, b, d) if x is not None
    )
    if small:
        out["rss_small_n"] = small["n"]
        out["rss_small_mb"] = small["max_rss_kb"] / 1024
        out["rss_n_mb"] = a["max_rss_kb"] / 1024
        out["rss_kb_per_image"] = (a["max_rss_kb"] - small["max_rss_kb"]) / (a["n"] - small["n"])
    if "sheet_pages" in a:
        out["sheet_pages"] = a["sheet_pages"]
        out["sheet_max_page_kb"] = a["sheet_max_page_kb"]
    s3a, s3b = _get(rows, "s3-threads"), _get(rows, "s3-dask")
    if s3a and s3b:
        out["s3_n"] = s3a["n"]
        out["s3_threads_img_s"] = rate(s3a)
        out["s3_dask_img_s"] = rate(s3b)
        out["s3_dask_vs_threads"] = rate(s3b) / rate(s3a)
    large = _get(rows, "large")
    if large:
        out["large_n"] = large["n"]
        out["large_img_s"] = rate(large)
        out["large_peak_rss_mb"] = large["max_rss_kb"] / 1024
        out["large_rerun_api_calls"] = large["rerun_api_calls"] + large["rerun_requests"]
        out["large_rerun_s"] = large["rerun_wall_s"]
    plan = next((r.data for r in rows if r.label.startswith("flux-flows plan")), None)
    if plan:
        out["plan_rows"] = args.plan_rows
        out["plan_s"] = plan["wall_s"]
        out["plan_peak_rss_mb"] = plan["max_rss_kb"] / 1024
    out["workpool"] = "ran" if d else "n/a"
    return out


def print_report(args: argparse.Namespace, rows: list[Row], figures: dict[str, Any]) -> None:
    a = _get(rows, "a-threads")
    header = (
        f"{'contender':42} {'N':>7} {'wall s':>8} {'img/s':>7} {'x (a)':>6} "
        f"{'CPU ms/img':>10} {'server ms/img':>13} {'peak RSS MB':>11} {'API calls':>9} "
        f"{'failed':>6} {'others':>6}"
    )
    print()
    print(header)
    print("-" * len(header))
    for row in rows:
        x = row.data
        if x is None:
            print(f"{row.label:42} {row.note}")
            continue
        if row.label.startswith("flux-flows plan"):
            print(
                f"{row.label:42} {args.plan_rows:7d} {x['wall_s']:8.1f} {'':>7} {'':>6} "
                f"{'':>10} {'':>13} {x['max_rss_kb'] / 1024:11.0f}   (CPU {x['cpu_s']:.1f} s)"
            )
            continue
        n = x["n"]
        failed = n - x["counts"].get("SUCCESS", 0)
        base = _get(rows, "s3-threads") if x["dest"].startswith("s3://") else a
        ratio = (
            (n / x["wall_s"]) / (base["n"] / base["wall_s"])
            if base and x["name"] not in ("a-small", "large")
            else math.nan
        )
        print(
            f"{row.label:42} {n:7d} {x['wall_s']:8.1f} {n / x['wall_s']:7.0f} {_fmt(ratio):>6} "
            f"{1000 * x['cpu_s'] / n:10.2f} {1000 * x['server_cpu_s'] / n:13.2f} "
            f"{x['max_rss_kb'] / 1024:11.0f} {x['requests']:9d} {failed:6d} "
            f"{x['foreign_cores']:6.2f}"
        )
        if "rerun_wall_s" in x:
            print(
                f"{'  ... cached re-run':42} {n:7d} {x['rerun_wall_s']:8.1f} "
                f"{n / x['rerun_wall_s']:7.0f} {'':>6} {1000 * x['rerun_cpu_s'] / n:10.2f} "
                f"{'':>13} {x['max_rss_after_rerun_kb'] / 1024:11.0f} "
                f"{x['rerun_requests']:9d} {n - x['rerun_counts'].get('SUCCESS', 0):6d}"
            )
    print()
    print(
        "  CPU ms/img: the contender's process and its descendants (Dask nanny + worker "
        "processes), measured run only;"
    )
    print(
        "  server ms/img: the Prefect server's CPU from the start of the measured run until it "
        "went quiet after it;"
    )
    print(
        "  API calls: requests the stand-in saw; others: cores other processes on the machine "
        "used meanwhile."
    )
    for row in rows:
        x = row.data
        if x and "standin_cpu_s" in x:
            store = x.get("store_cpu_s") or 0.0
            print(
                f"  {row.label}: stand-in {1000 * x['standin_cpu_s'] / x['n']:.2f} ms/img, "
                + (f"moto {1000 * store / x['n']:.2f} ms/img, " if store else "")
                + f"warm-up {x['warmup_s']:.1f} s (not counted), server settled in "
                f"{x['settle_s']:.0f} s, counts {x['counts']}"
            )
    if "rss_kb_per_image" in figures:
        print(
            f"  memory: peak RSS {figures['rss_small_mb']:.0f} MB at N={figures['rss_small_n']}, "
            f"{figures['rss_n_mb']:.0f} MB at N={args.n}: "
            f"{figures['rss_kb_per_image']:.2f} KB per extra image"
        )
    for row in rows:
        x = row.data
        if x and "sheet_pages" in x and x["name"] in ("a-threads", "b-dask", "d-workpool", "large"):
            print(
                f"  contact sheet of {row.label} (N={x['n']}): {x['sheet_pages']} "
                f"page{'s' if x['sheet_pages'] != 1 else ''}, index "
                f"{x['sheet_index_kb']:.0f} KB, largest page {x['sheet_max_page_kb']:.0f} KB"
            )


def _fmt_result(value: Any) -> str:
    if isinstance(value, str):
        return value
    return str(value) if isinstance(value, int) else _fmt(float(value), 2)


def orchestrate(args: argparse.Namespace) -> int:
    from importlib.metadata import version

    started = time.perf_counter()
    print(f"flux-flows scale benchmark, {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"  command: python benchmarks/bench_scale.py {' '.join(args.argv) or '(defaults)'}")
    print(
        f"  N={args.n} latency={args.latency}s concurrency={args.concurrency} "
        f"rss-small={args.rss_small} tasks-n={args.tasks_n} s3-n={args.s3_n} "
        f"pool-n={args.pool_n} n-large={args.n_large or '-'} plan-rows={args.plan_rows or '-'}"
    )
    print(
        f"  machine: nproc={os.cpu_count()} cpu={cpu_model()!r} python={platform.python_version()} "
        f"prefect={version('prefect')} distributed={_version('distributed')}; "
        f"flux-flows {git_state()}"
    )
    print(f"  start: {uptime_text()}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="flux-scale-"))
    procs = Processes(workdir)
    try:
        with services(args, workdir, procs) as svc:
            print(f"  services up in {time.perf_counter() - started:.1f} s", flush=True)
            rows = measure(args, svc, procs, workdir)
    finally:
        procs.stop_all()
        if args.keep:
            print(f"  kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    figures = figures_of(args, rows)
    print_report(args, rows, figures)
    print(f"  end: {uptime_text()}")
    print(f"  benchmark took {time.perf_counter() - started:.0f} s")
    print()
    print("RESULT " + " ".join(f"{k}={_fmt_result(v)}" for k, v in figures.items()))
    return 0


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "-"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Where a big batch runs: threads, Dask chunks, task runs, a work pool."
    )
    parser.add_argument("--n", type=int, default=20_000, help="images for (a), (b), (d)")
    parser.add_argument("--latency", type=float, default=0.05, help="stand-in seconds per image")
    parser.add_argument("--concurrency", type=int, default=32, help="images in flight")
    parser.add_argument("--rss-small", type=int, default=2_000, help="small N for RSS growth")
    parser.add_argument("--tasks-n", type=int, default=None, help="images for (c) (default N)")
    parser.add_argument(
        "--s3-n", type=int, default=2_000, help="images for (a), (b) into moto S3 (0: skip)"
    )
    parser.add_argument(
        "--pool-n",
        type=int,
        default=None,
        help="images for (d), the work pool (default N; 0: skip)",
    )
    parser.add_argument("--n-large", type=int, default=0, help="a large threads run + re-run")
    parser.add_argument("--plan-rows", type=int, default=0, help="rows for `flux-flows plan`")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args(argv)
    args.argv = list(argv or [])
    if args.tasks_n is None:
        args.tasks_n = args.n
    if args.pool_n is None:
        args.pool_n = args.n
    if args.n < 1 or args.concurrency < 1 or args.latency < 0:
        parser.error("--n and --concurrency must be >= 1 and --latency >= 0")
    if args.rss_small >= args.n:
        args.rss_small = 0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_standin"]:
        serve_standin(argv[1:])
        return 0
    if argv[:1] == ["_contender"]:
        _terminate_on_sigterm()
        run_contender(argv[1:])
        return 0
    _terminate_on_sigterm()
    try:
        return orchestrate(parse_args(argv))
    except KeyboardInterrupt:
        print("interrupted: every server and child started here was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
