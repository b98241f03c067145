"""bench_batch.py's contenders, as the orchestrator runs or starts them.

In the orchestrating process: the raw loop (asyncio + httpx + boto3, the best a user could
write by hand) and the sequential seed loop. In fresh children: each flux-flows measurement
(`batch_children`), and the run against the zero-cost stand-in. Plus the emulator's request
log, from which rates are measured on the API's side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.cpu import machine_busy_s, tree_cpu_s
from harness.procs import Processes, http_json
from harness.servers import API_KEY, standin_requests, start_standin
from harness.services import EmulatorServices
from harness.timing import timed
from harness.workload import GENERATION_PATH, api_body

SCRIPT = Path(__file__).resolve().with_name("bench_batch.py")
BUCKET = "flux-bench"
CHILD_TIMEOUT_S = 1800.0


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


def put_image(s3: Any, key: str, response: Any) -> None:
    """One `put_object` of an answer's JPEG, as a hand-written script does it."""
    s3.put_object(Bucket=BUCKET, Key=key, Body=response.content, ContentType="image/jpeg")


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
                    await asyncio.to_thread(put_image, s3, f"{prefix}/{index:06d}.jpg", response)
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
    servers: Sequence[int] = (),
) -> Phase:
    """The hand-written loop in this process; `servers` (this process's children) not billed."""
    s3_client(1).list_buckets()  # import and credential resolution, not counted
    with timed(exclude=servers) as t:
        failed = asyncio.run(_raw_batch(base_url, jobs, prefix, concurrency, rpm))
    return Phase("raw asyncio+httpx+boto3", t.wall_s, len(jobs), failed=failed, cpu_s=t.cpu_s)


def run_seed_loop(
    base_url: str,
    jobs: Sequence[dict[str, Any]],
    n: int,
    prefix: str = "seed",
    servers: Sequence[int] = (),
) -> Phase:
    """The script users start from: one request, one upload, next; timed on a sample only."""
    s3 = s3_client(1)
    s3.list_buckets()
    with timed(exclude=servers) as t:
        failed = _seed_loop(base_url, jobs, prefix, s3)
    scale = n / max(len(jobs), 1)
    return Phase(
        "seed loop (sequential requests+boto3)",
        t.wall_s * scale,
        n,
        failed=failed,
        cpu_s=t.cpu_s * scale,
        extrapolated_from=len(jobs),
    )


def _seed_loop(base_url: str, jobs: Sequence[dict[str, Any]], prefix: str, s3: Any) -> int:
    import requests

    failed = 0
    for index, job in enumerate(jobs):
        try:
            response = requests.post(
                base_url + GENERATION_PATH,
                json=api_body(job),
                headers={"Authorization": f"Bearer {API_KEY}", "Accept": "image/jpeg"},
                timeout=120,
            )
            response.raise_for_status()
            put_image(s3, f"{prefix}/{index:06d}.jpg", response)
        except Exception:
            failed += 1
    return failed


# ============================================================================================
# The orchestrator
# ============================================================================================


def flow_child(
    procs: Processes,
    svc: EmulatorServices,
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
    command = [sys.executable, str(SCRIPT), "_flow", "--n", str(n)]
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
    return procs.run_json(name, command, {**svc.env, **(env or {})}, result_file, CHILD_TIMEOUT_S)


def components_child(
    procs: Processes, svc: EmulatorServices, workdir: Path, concurrency: int, calls: int = 64
) -> dict[str, float]:
    result_file = workdir / "components.json"
    command = [sys.executable, str(SCRIPT), "_components", "--calls", str(calls)]
    command += ["--concurrency", str(concurrency), "--dest", f"s3://{BUCKET}/components"]
    command += ["--result-file", str(result_file)]
    return procs.run_json("components", command, svc.env, result_file, CHILD_TIMEOUT_S)


def fetch_emulator_jpeg(svc: EmulatorServices, path: Path) -> int:
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
    args: argparse.Namespace, svc: EmulatorServices, procs: Processes, workdir: Path, tag: str = ""
) -> dict[str, Any]:
    """A fresh flux-flows child against the zero-cost stand-in: the rate one process sustains.

    The stand-in answers every generation with the same precomputed JPEG after
    `--standin-latency`, with `--standin-concurrency` in flight, so neither the API's latency
    nor an emulator's rendering is the limit; the destination is a local folder (default) or
    moto. The stand-in's and moto's CPU are reported so the claim "~0 CPU" can be checked.
    """
    image_file = workdir / f"standin{tag}.jpg"
    size = fetch_emulator_jpeg(svc, image_file)
    server = start_standin(
        procs,
        svc.env,
        workdir,
        latency=args.standin_latency,
        image_file=image_file,
        name=f"standin{tag}",
    )
    proc = server.proc
    try:
        url = server.ready()
        dest = (
            str(workdir / f"standin-out{tag}")
            if args.standin_dest == "local"
            else f"s3://{BUCKET}/standin{tag}"
        )
        pids = {"stand-in": proc.pid, "moto": svc.pids["moto"]}
        cpu0 = {name: tree_cpu_s(pid) for name, pid in pids.items()}
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
        cpu1 = {name: tree_cpu_s(pid) for name, pid in pids.items()}
        result["served"] = standin_requests(url)
    finally:
        procs.stop(proc)
    result["server_cpu_s"] = {name: cpu1[name] - cpu0[name] for name in pids}
    result["machine_cores"] = (busy1 - busy0) / max(wall1 - wall0, 1e-9)
    result["image_bytes"] = size
    result["dest"] = "local folder" if args.standin_dest == "local" else "moto S3"
    return result


def emulator_log(svc: EmulatorServices, *, clear: bool = False) -> list[tuple[float, int]]:
    return [
        (float(t), int(s))
        for t, s in http_json(svc.emulator_url + "/_bench/log", "POST" if clear else "GET")
    ]


def reset_emulator(svc: EmulatorServices) -> None:
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
