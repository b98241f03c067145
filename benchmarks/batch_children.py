"""bench_batch.py's measuring children: each runs in a fresh process the orchestrator starts.

- `_flow`: one flux-flows measurement (warm-up run, measured first run, optional cached re-run),
  so its CPU time and peak RSS are the library's own;
- `_components`: what each step of one image costs, measured alone (CPU time, so load-robust).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from batch_contenders import BUCKET, s3_client
from harness.cpu import max_rss_kb, rss_kb, thread_cpu_s, thread_groups
from harness.procs import child_parser
from harness.timing import timed
from harness.workload import workload


@contextlib.contextmanager
def sampling_profiler(path: str | None) -> Iterator[int | None]:
    """py-spy on this very process for the measured run only (all threads, idle excluded).

    py-spy, not cProfile: the work runs in the task runner's threads, which cProfile and
    pyinstrument do not see. Its own CPU is in its own process (its pid is yielded, so the
    client CPU can leave it out), so the figures stay honest apart from the pauses of sampling.
    """
    if not path:
        yield None
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy not found (pip install py-spy): no profile", file=sys.stderr)
        yield None
        return
    command = [spy, "record", "--pid", str(os.getpid()), "--rate", "200"]
    command += ["--format", "raw", "--output", path, "--threads"]
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
    )
    time.sleep(1.0)  # let it attach before the clock starts
    try:
        yield proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _flow_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = child_parser("bench_batch.py _flow")
    parser.add_argument("--rpm", type=float, default=None)
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument("--profile-out", default=None)
    parser.add_argument("--no-thumbnails", action="store_true")
    return parser.parse_args(argv)


def run_flow_child(argv: Sequence[str]) -> None:
    """Warm-up run (not counted), the measured first run, optionally a fully cached re-run.

    Peak RSS is read right after the first run, before the re-run, so the small-N and large-N
    children are compared at the same point.
    """
    args = _flow_args(argv)
    import logging

    from flux_flows.flows import generate_images

    # The library's and Prefect's default logging stays on (users pay for it too); only the
    # noisy third-party debug loggers a user would not enable are left at their defaults.
    logging.getLogger("botocore").setLevel(logging.WARNING)
    out: dict[str, Any] = {"n": args.n, "profiled": bool(args.profile_out)}

    def run(jobs: list[dict[str, Any]]) -> Any:
        return generate_images(
            jobs,
            args.dest,
            max_concurrency=args.concurrency,
            requests_per_minute=args.rpm,
            thumbnails=not args.no_thumbnails,
        )

    started = time.perf_counter()
    warm = generate_images(
        workload(2, tag="warm-up "), args.dest.rstrip("/") + "-warmup", max_concurrency=2
    )
    out["warmup_s"] = time.perf_counter() - started
    out["warmup_ok"] = warm.counts.get("SUCCESS", 0)
    jobs = workload(args.n)
    gc.collect()
    out["rss_before_kb"], out["max_rss_before_kb"] = rss_kb(), max_rss_kb()
    threads0 = thread_cpu_s()
    with sampling_profiler(args.profile_out) as spy, timed(exclude=[spy] if spy else []) as t:
        report = run(jobs)
    out["first_wall_s"], out["first_cpu_s"] = t.wall_s, t.cpu_s
    out["thread_cpu_s"] = thread_groups(threads0, thread_cpu_s(), out["first_cpu_s"])
    out["first_started_at"], out["first_ended_at"] = t.started_at, t.ended_at
    out["max_rss_after_first_kb"], out["rss_after_first_kb"] = max_rss_kb(), rss_kb()
    out["first_counts"] = dict(report.counts)
    out["first_api_calls"] = report.api_calls
    out["first_cache_hits"] = report.cache_hits
    out["bytes"] = sum(r.size_bytes or 0 for r in report.records)
    del report
    if args.rerun:
        with timed() as t:
            report = run(jobs)
        out["rerun_wall_s"], out["rerun_cpu_s"] = t.wall_s, t.cpu_s
        out["rerun_counts"] = dict(report.counts)
        out["rerun_api_calls"] = report.api_calls
        out["rerun_cache_hits"] = report.cache_hits
    Path(args.result_file).write_text(json.dumps(out))


def cpu_per_call_ms(
    calls: int, work: Callable[[int], Any], threads: int = 1
) -> tuple[float, float]:
    """(process CPU ms per call, wall s) of `work(i)` for i < calls, on `threads` threads."""
    with timed() as t:
        if threads == 1:
            for i in range(calls):
                work(i)
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                list(pool.map(work, range(calls)))
    return 1000 * t.cpu_s / calls, t.wall_s


def run_components_child(argv: Sequence[str]) -> None:
    """CPU per image of each step of `render_image`, alone, and of a Prefect task run.

    Process CPU time is what one step costs this process, whatever else the machine is doing
    (wall times here are not comparable: they include the emulator's latency).
    """
    parser = child_parser("bench_batch.py _components", images="--calls")
    args = parser.parse_args(argv)

    from flux_flows.models import ImageRequest
    from flux_flows.rendering.one_image import RenderJob
    from flux_flows.rendering.spill import SpillFolder
    from flux_flows.storage import open_storage

    requests = [ImageRequest(**job) for job in workload(args.calls, tag="components ")]

    def job(index: int, folder: str) -> RenderJob:
        storage = open_storage(args.dest.rstrip("/") + folder)
        return RenderJob(requests[index], storage, SpillFolder(storage.root_uri))

    out = _step_costs(args.dest, requests, args.concurrency)
    out.update(_render_costs(job, args.calls, args.concurrency))
    Path(args.result_file).write_text(json.dumps(out))


def _step_costs(dest: str, requests: list[Any], conc: int) -> dict[str, float]:
    """Each step of one image alone: API call, checks, S3 metadata and puts, thumbnail."""
    from flux_flows.blocks import shared_client
    from flux_flows.rendering.one_image import image_metadata
    from flux_flows.storage import open_storage

    calls = len(requests)
    client = shared_client()
    storage = open_storage(dest)
    image = client.generate(requests[0])  # warm: connection, imports
    storage.put("warm.jpg", image.data, content_type=image.content_type)
    metadata = image_metadata(image)
    out: dict[str, float] = {}

    out["API call + parse (FluxClient.generate)"], _ = cpu_per_call_ms(
        calls, lambda i: client.generate(requests[i]), threads=conc
    )
    # The public names, so the same line times older trees too (Pillow-based size reading).
    from flux_flows.client._kontext import image_size, sniff_image

    out["verify the answer (sniff + image size)"], _ = cpu_per_call_ms(
        calls * 20, lambda i: (sniff_image(image.data), image_size(image.data))
    )
    out["S3 metadata of the image (image_metadata)"], _ = cpu_per_call_ms(
        calls * 20, lambda i: image_metadata(image)
    )
    out["S3 put of the image + metadata"], _ = cpu_per_call_ms(
        calls,
        lambda i: storage.put(
            f"c/{i}.jpg", image.data, content_type="image/jpeg", metadata=metadata
        ),
    )
    raw_s3 = s3_client(4)  # the raw loop's client: boto3 defaults
    out["S3 put of the image, boto3 defaults (as the raw loop)"], _ = cpu_per_call_ms(
        calls,
        lambda i: raw_s3.put_object(
            Bucket=BUCKET, Key=f"components/r/{i}.jpg", Body=image.data, ContentType="image/jpeg"
        ),
    )
    with contextlib.suppress(ImportError):
        from flux_flows.rendering.thumbnails import make_thumbnail

        thumb = make_thumbnail(image.data)
        out["thumbnail: make"], _ = cpu_per_call_ms(calls, lambda i: make_thumbnail(image.data))
        out["thumbnail: S3 put"], _ = cpu_per_call_ms(
            calls, lambda i: storage.put(f"t/{i}.jpg", thumb, content_type="image/jpeg")
        )
    return out


def _render_costs(job: Callable[[int, str], Any], calls: int, conc: int) -> dict[str, float]:
    """render() on plain threads, a no-op Prefect task run and render_image as a task."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.task_runners import ThreadPoolTaskRunner

    from flux_flows.rendering.one_image import render, render_image

    out: dict[str, float] = {}
    jobs = [job(i, "/plain") for i in range(calls)]
    out["render() on plain threads (all steps, no Prefect)"], _ = cpu_per_call_ms(
        calls, lambda i: render(jobs[i]), threads=conc
    )

    @task(cache_policy=NO_CACHE, persist_result=False)
    def noop(i: int) -> int:
        return i

    @flow(persist_result=False)
    def many(count: int, use_render: bool) -> None:
        pool: ThreadPoolTaskRunner[Any] = ThreadPoolTaskRunner(max_workers=conc)
        with pool as runner:
            if use_render:
                tagged = [job(i, "/task") for i in range(count)]
                futures = [runner.submit(render_image, {"job": j}) for j in tagged]
            else:
                futures = [runner.submit(noop, {"i": i}) for i in range(count)]
            for future in futures:
                future.result(raise_on_failure=False)

    many(1, False)  # warm: flow registration, task runner imports
    one_ms, _ = cpu_per_call_ms(1, lambda i: many(1, False))
    total_ms, _ = cpu_per_call_ms(1, lambda i: many(calls, False))
    out["Prefect task run, no-op body (per task)"] = (total_ms - one_ms) / (calls - 1)
    total_ms, _ = cpu_per_call_ms(1, lambda i: many(calls, True))
    out["render_image as a Prefect task (all steps)"] = (total_ms - one_ms) / calls
    return out
