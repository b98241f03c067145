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

What runs where, each in its own process on 127.0.0.1, all stopped on exit, error or Ctrl-C
(started by `harness.services.standin_services`):

- the stand-in API (`harness/serve.py standin`): a hand-written asyncio HTTP/1.1 server that
  answers every text_to_image POST, after `--latency` seconds, with the same small precomputed
  JPEG (real and complete, made once with Pillow) and `Seed` / `Finish-Reason: SUCCESS`
  headers. Unlike the emulator it renders nothing, so its CPU (~0.1 ms a request) does not
  crowd the 2 cores; it counts the requests it saw, so "0 API calls" is checked from the API's
  side;
- `prefect server start` with a temporary PREFECT_HOME, PREFECT_API_URL set for the children;
- moto's S3 server, only for the S3 rows;
- one child per contender (`scale_contender.py`): a 2-image warm-up run (not counted; for
  Dask, after the cluster is up), then the measured run, with client and server CPU as
  `harness.cpu` defines them and its peak RSS (getrusage) at the end of the run.

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
import datetime as dt
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from harness.procs import Processes, measured_command, run_script
from harness.report import cpu_model, git_state, package_version, print_result, uptime_text
from harness.services import StandinServices, standin_services
from harness.workload import write_prompt_file
from scale_contender import run_contender
from scale_pool import chunk_runs, work_pool_workers
from scale_report import Row, figures_of, print_report

HERE = Path(__file__).resolve()
BUCKET = "flux-scale"
CHILD_TIMEOUT_S = 4 * 3600.0  # a 100,000-image run plus its re-run, or 20,000 task runs
POOL_LABEL = "(d) work pool, 2 process workers"


def contender(
    procs: Processes,
    svc: StandinServices,
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
    """One row in its own child (`_contender`); its figures, also printed in short."""
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
    out = procs.run_json(name, command, svc.env, result_file, CHILD_TIMEOUT_S)
    out["name"] = name
    out["dest"] = dest
    print(
        f"    {out['wall_s']:.1f} s, {n / out['wall_s']:.0f} images/s, "
        f"{1000 * out['cpu_s'] / n:.2f} ms CPU/image, server "
        f"{1000 * out['server_cpu_s'] / n:.2f} ms/image, peak RSS {out['max_rss_kb'] / 1024:.0f} MB",
        flush=True,
    )
    return out


Run = Callable[..., dict[str, Any]]


def measure(
    args: argparse.Namespace, svc: StandinServices, procs: Processes, workdir: Path
) -> list[Row]:
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
    measure_pool(args, svc, procs, workdir, run, rows)
    if args.rss_small:
        run(
            "(a) at the small N, for RSS",
            name="a-small",
            mode="threads",
            n=args.rss_small,
            dest=f"{out}/a-small",
        )
    if args.s3_n:
        measure_s3(args, svc, run)
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
        rows.append(measure_plan(args, svc, workdir))
    return rows


def measure_pool(
    args: argparse.Namespace,
    svc: StandinServices,
    procs: Processes,
    workdir: Path,
    run: Run,
    rows: list[Row],
) -> None:
    """Row (d), or why it could not run: its failure must not cost the other rows."""
    if not args.pool_n:
        note = "not available: skipped (--pool-n 0)"
        print(f"  (d) work pool: {note}", flush=True)
        rows.append(Row(POOL_LABEL, None, note))
        return
    with work_pool_workers(svc, procs, workdir) as why:
        if why:
            print(f"  (d) work pool: not available: {why}", flush=True)
            rows.append(Row(POOL_LABEL, None, f"not available: {why}"))
            return
        try:
            data = run(
                POOL_LABEL,
                name="d-workpool",
                mode="workpool",
                n=args.pool_n,
                dest=f"{workdir / 'out'}/d",
                extra_pids=svc.workers,
            )
        except RuntimeError as exc:
            note = f"failed: {str(exc).splitlines()[0]} (log: {workdir}/d-workpool.log)"
            print(f"  (d) work pool: {note}", flush=True)
            rows.append(Row(POOL_LABEL, None, note))
            return
        data.update(chunk_runs(svc.env["PREFECT_API_URL"], procs))
        print(
            f"    chunk runs {data['chunk_states']}, per worker {data['chunks_per_worker']}",
            flush=True,
        )


def measure_s3(args: argparse.Namespace, svc: StandinServices, run: Run) -> None:
    """(a) and (b) into moto's S3, into a bucket made for them."""
    import boto3

    boto3.client(
        "s3",
        endpoint_url=svc.s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=BUCKET)
    s3 = f"s3://{BUCKET}"
    run("(a) threads, S3 (moto)", name="s3-threads", mode="threads", n=args.s3_n, dest=f"{s3}/a")
    run("(b) Dask chunks, S3 (moto)", name="s3-dask", mode="dask", n=args.s3_n, dest=f"{s3}/b")


def measure_plan(args: argparse.Namespace, svc: StandinServices, workdir: Path) -> Row:
    """`flux-flows plan` of a generated file, reaped with wait4: wall, CPU, peak RSS."""
    source = workdir / f"prompts-{args.plan_rows}.txt"
    write_prompt_file(source, args.plan_rows)
    print(f"  plan of {args.plan_rows} rows ({source.stat().st_size / 1e6:.0f} MB) ...", flush=True)
    command = [sys.executable, "-m", "flux_flows.cli", "plan", str(source)]
    command += ["--to", str(workdir / "out" / "plan")]
    figures = measured_command(command, svc.env)
    print(
        f"    {figures['wall_s']:.1f} s, peak RSS {figures['max_rss_kb'] / 1024:.0f} MB", flush=True
    )
    return Row(f"flux-flows plan, {args.plan_rows} rows", dict(figures))


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
        f"prefect={version('prefect')} distributed={package_version('distributed')}; "
        f"flux-flows {git_state()}"
    )
    print(f"  start: {uptime_text()}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="flux-scale-"))
    procs = Processes(workdir)
    try:
        with standin_services(procs, workdir, latency=args.latency, s3=bool(args.s3_n)) as svc:
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
    print_result(figures)
    return 0


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
    children = {"_contender": run_contender}
    return run_script(argv, children, lambda args: orchestrate(parse_args(args)))


if __name__ == "__main__":
    sys.exit(main())
