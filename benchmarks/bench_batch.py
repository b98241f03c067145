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
import datetime as dt
import functools
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from batch_children import run_components_child, run_flow_child
from batch_contenders import (
    BUCKET,
    Phase,
    components_child,
    emulator_log,
    flow_child,
    measure_standin,
    rate_figures,
    reset_emulator,
    run_raw,
    run_seed_loop,
    s3_client,
)
from batch_report import Measurements, print_aggregate, print_report, results
from harness.cpu import machine_busy_s, tree_cpu_s
from harness.procs import Processes, run_script
from harness.report import (
    git_state,
    load_text,
    print_repeat_result,
    print_result,
    result_line,
    uptime_text,
)
from harness.services import EmulatorServices, emulator_services
from harness.workload import workload

# The contenders whose order can matter (they share the emulator, moto and the Prefect server,
# whose state grows from one to the next, and the machine's load drifts): each round runs them
# in a rotated order, so with --repeat K each one runs first, in the middle and last in turn.
CONTENDERS = ("raw", "flow", "bare")


def round_order(args: argparse.Namespace, index: int) -> list[str]:
    names = [c for c in CONTENDERS if c != "bare" or args.no_thumbnails_row]
    shift = index % len(names)
    return names[shift:] + names[:shift]


class Round:
    """One round: seed sample, small-N flow child, then raw / flow / bare in `round_order`.

    Every contender first does an uncounted 2-image warm-up run of its own at concurrency 2,
    as the flux-flows children always did: the raw loop and the seed loop in this process
    (imports, clients, the servers' first requests), the flux-flows ones in their child. Every
    round writes under its own prefixes, so no round finds another's images.
    """

    def __init__(
        self, args: argparse.Namespace, svc: EmulatorServices, procs: Processes, workdir: Path
    ) -> None:
        self.args, self.svc, self.procs, self.workdir = args, svc, procs, workdir
        self.jobs = workload(args.n)
        self.warm_jobs = workload(2, tag="warm-up ")
        self.servers = list(svc.pids.values())  # children of this process, not the raw loop's
        self.flow = functools.partial(
            flow_child, procs, svc, workdir, concurrency=args.concurrency, rpm=args.rpm
        )
        self.index, self.tag, self.out = 0, "", Measurements()

    def run(self, index: int) -> Measurements:
        args, n = self.args, self.args.n
        self.tag = f"-r{index + 1}" if args.repeat > 1 else ""
        self.index = index
        out = self.out = Measurements(
            n_small=args.rss_small or (max(2, min(n // 10, 100)) if n > 4 else 0)
        )
        out.order = round_order(args, index)
        if args.seed_sample:
            self.seed()
        if out.n_small:
            reset_emulator(self.svc)
            out.small = self.flow(
                name=f"flow-small{self.tag}",
                n=out.n_small,
                dest=f"s3://{BUCKET}/flow-small{self.tag}",
            )
            print(f"  flux-flows at N={out.n_small} (memory baseline) done", flush=True)
        steps = {"raw": self.raw, "flow": self.main_flow, "bare": self.bare}
        print(f"  order of this round: {', '.join(out.order)}", flush=True)
        for name in out.order:
            steps[name]()
        if args.standin_n:
            out.standin = measure_standin(args, self.svc, self.procs, self.workdir, tag=self.tag)
            print("  flux-flows against the zero-cost stand-in done", flush=True)
        return out

    def seed(self) -> None:
        svc, tag, n = self.svc, self.tag, self.args.n
        self.out.warmup_s["seed"] = run_seed_loop(
            svc.base_url, self.warm_jobs, 2, prefix=f"seed-warmup{tag}", servers=self.servers
        ).wall_s
        reset_emulator(svc)
        sample = self.jobs[: self.args.seed_sample]
        self.out.seed = run_seed_loop(
            svc.base_url, sample, n, prefix=f"seed{tag}", servers=self.servers
        )
        print(f"  seed loop sample done: {self.out.seed.wall_s:.0f} s extrapolated", flush=True)

    def raw(self) -> None:
        args, svc, tag, out = self.args, self.svc, self.tag, self.out
        reset_emulator(svc)
        warm = run_raw(svc.base_url, self.warm_jobs, 2, args.rpm, f"raw-warmup{tag}", self.servers)
        out.warmup_s["raw"] = warm.wall_s
        reset_emulator(svc)
        out.raw = run_raw(
            svc.base_url, self.jobs, args.concurrency, args.rpm, f"raw{tag}", self.servers
        )
        if args.rpm:
            out.rates["raw"] = rate_figures(emulator_log(svc), args.rpm)
        print(f"  raw loop done: {out.raw.wall_s:.1f} s", flush=True)

    def main_flow(self) -> None:
        args, svc, out = self.args, self.svc, self.out
        reset_emulator(svc)
        out.load_before_flow = load_text()
        # This process's tree holds the servers and the flow child (reaped: it counts).
        busy0, ours0, wall0 = machine_busy_s(), tree_cpu_s(os.getpid()), time.perf_counter()
        servers0 = {name: tree_cpu_s(pid) for name, pid in svc.pids.items()}
        profile = str(Path(args.profile).absolute()) if args.profile and self.index == 0 else None
        out.main = self.flow(
            name=f"flow-main{self.tag}",
            n=args.n,
            dest=f"s3://{BUCKET}/flow-main{self.tag}",
            rerun=True,
            profile_out=profile,
        )
        out.warmup_s["flow"] = out.main["warmup_s"]
        servers1 = {name: tree_cpu_s(pid) for name, pid in svc.pids.items()}
        busy1, ours1, wall1 = machine_busy_s(), tree_cpu_s(os.getpid()), time.perf_counter()
        out.server_cpu_s = {name: servers1[name] - servers0[name] for name in servers0}
        # Whatever else the machine did meanwhile: other people's test suites, on these cores.
        out.foreign_cores = max(0.0, (busy1 - busy0 - (ours1 - ours0)) / max(wall1 - wall0, 1e-9))
        self.read_log()
        print("  flux-flows first run and cached re-run done", flush=True)

    def read_log(self) -> None:
        """The measured run's requests as the emulator saw them: rates, and the flow's edges."""
        args, out = self.args, self.out
        log = emulator_log(self.svc)
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

    def bare(self) -> None:
        reset_emulator(self.svc)
        tag = self.tag
        self.out.bare = self.flow(
            name=f"flow-bare{tag}",
            n=self.args.n,
            dest=f"s3://{BUCKET}/flow-bare{tag}",
            thumbnails=False,
        )
        self.out.warmup_s["bare"] = self.out.bare["warmup_s"]
        print("  flux-flows with thumbnails=False done", flush=True)


def print_header(args: argparse.Namespace) -> None:
    from importlib.metadata import version

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


RoundResult = tuple[Measurements, dict[str, Any], list[Phase]]


def run_rounds(args: argparse.Namespace, started: float) -> list[RoundResult]:
    workdir = Path(tempfile.mkdtemp(prefix="flux-bench-"))
    procs = Processes(workdir)
    rounds: list[RoundResult] = []
    try:
        with emulator_services(
            procs, workdir, latency=args.latency, image_kb=args.image_kb, rpm=args.rpm
        ) as svc:
            os.environ.update({k: v for k, v in svc.env.items() if k.startswith("AWS_")})
            s3_client(1).create_bucket(Bucket=BUCKET)
            print(f"  services up in {time.perf_counter() - started:.1f} s", flush=True)
            one_round = Round(args, svc, procs, workdir)
            for index in range(args.repeat):
                if args.repeat > 1:
                    print(f"\nround {index + 1}/{args.repeat}", flush=True)
                measured = one_round.run(index)
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
    return rounds


def orchestrate(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    print_header(args)
    rounds = run_rounds(args, started)
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
        print_result(rounds[0][1])
    else:
        print_repeat_result([fig for _, fig, _ in rounds])
    return 0


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


def main(argv: Sequence[str] | None = None) -> int:
    children = {"_components": run_components_child, "_flow": run_flow_child}
    return run_script(argv, children, lambda args: orchestrate(parse_args(args)))


if __name__ == "__main__":
    sys.exit(main())
