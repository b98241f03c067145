"""bench_scale.py's measuring child: one contender (row) in a fresh process.

A 2-image warm-up run (not counted; for Dask, after its cluster is up), then the measured run.
The child reads, right around the measured run, its client CPU (`harness.cpu`: its own tree,
so Dask's nanny and worker processes count, plus the work-pool workers' trees passed as
`--extra-pids`), the Prefect server's, the stand-in's and moto's CPU, and its peak RSS at the
end of the run. The Prefect server's CPU is read once it has gone quiet after the run, because
it records task runs from events that arrive after the client is done.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from harness.cpu import machine_busy_s, max_rss_kb, settle, tree_cpu_s
from harness.procs import child_parser
from harness.servers import standin_requests
from harness.timing import timed
from harness.workload import prompts_for
from scale_pool import CHUNK_DEPLOYMENT

MODES = ("threads", "dask", "tasks", "workpool")


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


def run_once(mode: str, prompts: list[str], dest: str, conc: int, runner: Any) -> Any:
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
def dask_runner(mode: str) -> Iterator[Any]:
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


def _contender_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = child_parser("bench_scale.py _contender")
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--rerun", action="store_true")
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--standin-pid", type=int, required=True)
    parser.add_argument("--standin-url", required=True)
    parser.add_argument("--extra-pids", default="", help="more processes of this contender")
    parser.add_argument("--store-pid", type=int, default=0, help="moto's S3 server, if used")
    return parser.parse_args(argv)


def run_contender(argv: Sequence[str]) -> None:
    args = _contender_args(argv)
    logging.getLogger("botocore").setLevel(logging.WARNING)
    out: dict[str, Any] = {"mode": args.mode, "n": args.n}
    with dask_runner(args.mode) as runner:
        with timed() as t:
            warm = run_once(args.mode, prompts_for(2, "warm-up "), args.dest + "-warmup", 2, runner)
        out["warmup_s"] = t.wall_s
        out["warmup_ok"] = warm.counts.get("SUCCESS", 0)
        del warm
        prompts = prompts_for(args.n)
        gc.collect()
        settle(args.server_pid)
        out["rss_before_kb"] = max_rss_kb()
        _measured_run(args, runner, prompts, out)
        if args.rerun:
            _rerun(args, runner, prompts, out)
    Path(args.result_file).write_text(json.dumps(out))


def _measured_run(
    args: argparse.Namespace, runner: Any, prompts: list[str], out: dict[str, Any]
) -> None:
    """The measured run, with every process's CPU around it, then the server's after it."""
    extra = [int(p) for p in args.extra_pids.split(",") if p]
    server0, standin0 = tree_cpu_s(args.server_pid), tree_cpu_s(args.standin_pid)
    store0 = tree_cpu_s(args.store_pid) if args.store_pid else 0.0
    requests0, busy0 = standin_requests(args.standin_url), machine_busy_s()
    with timed(extra) as t:
        report = run_once(args.mode, prompts, args.dest, args.concurrency, runner)
    out["wall_s"], out["cpu_s"] = t.wall_s, t.cpu_s
    out["max_rss_kb"] = max_rss_kb()
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
    out["settle_s"] = settle(args.server_pid)
    out["server_cpu_s"] = tree_cpu_s(args.server_pid) - server0
    out["standin_cpu_s"] = standin1 - standin0
    ours = out["cpu_s"] + server_at_end - server0 + out["standin_cpu_s"] + out["store_cpu_s"]
    out["foreign_cores"] = max(0.0, (busy1 - busy0 - ours) / out["wall_s"])


def _rerun(args: argparse.Namespace, runner: Any, prompts: list[str], out: dict[str, Any]) -> None:
    """The same call again: every image is found, so no API call may happen."""
    extra = [int(p) for p in args.extra_pids.split(",") if p]
    requests0 = standin_requests(args.standin_url)
    with timed(extra) as t:
        report = run_once(args.mode, prompts, args.dest, args.concurrency, runner)
    out["rerun_wall_s"], out["rerun_cpu_s"] = t.wall_s, t.cpu_s
    out["rerun_requests"] = standin_requests(args.standin_url) - requests0
    out["rerun_api_calls"] = report.api_calls
    out["rerun_cache_hits"] = report.cache_hits
    out["rerun_counts"] = {str(k): v for k, v in report.counts.items() if v}
    out["max_rss_after_rerun_kb"] = max_rss_kb()
