"""bench_batch.py's figures and tables: one round's RESULT figures and report, and the
aggregate over `--repeat` rounds (medians and ranges computed by `harness.report`)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batch_contenders import Phase
from batch_profile import summarize_profile
from harness.report import fmt, print_figure_spreads, spread


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
    figures.update(_optional_figures(args, m, flow))
    return figures, rows


def _optional_figures(args: argparse.Namespace, m: Measurements, flow: Phase) -> dict[str, float]:
    """The stand-in run's and the rate limit's figures, when they ran."""
    figures: dict[str, float] = {}
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
    return figures


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
            f"{fmt(1000 * phase.cpu_s / phase.images, 1):>18}"
        )
    print()
    _print_run_notes(args, m, figures, rows)
    _print_cpu_notes(args, m, figures, rows)
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


def _print_run_notes(
    args: argparse.Namespace, m: Measurements, figures: dict[str, float], rows: list[Phase]
) -> None:
    """Order and warm-ups, the seed sample, the re-run's calls, counts, memory."""
    n, main = args.n, m.main
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
            f"{fmt(figures['rss_kb_per_image'], 1)} kB per extra image"
        )
    print(
        memory + f"; RSS {main['rss_before_kb'] / 1024:.0f} MB before the run, "
        f"{main['rss_after_first_kb'] / 1024:.0f} MB after"
    )


def _print_cpu_notes(
    args: argparse.Namespace, m: Measurements, figures: dict[str, float], rows: list[Phase]
) -> None:
    """Where the CPU went (threads, servers, other processes), rates, the flow's edges."""
    n, main = args.n, m.main
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
            f"{fmt(rate['sustained_rpm'], 0)}/min = {fmt(rate.get('sustained_pct', math.nan), 1)}"
            f"% of the limit (between the first and last request the API saw); busiest 60 s: "
            f"{rate['peak_60s']:.0f} requests; 429s: {rate['rejected']:.0f}"
        )
    if args.rpm:
        print(f"  flux-flows end to end: {60 * n / main['first_wall_s']:.0f} images/min")
    raw = rows[0]
    print(
        f"  client CPU, flux-flows over raw: {fmt(figures['cpu_vs_raw'])} "
        f"({1000 * main['first_cpu_s'] / n:.1f} / {1000 * raw.cpu_s / raw.images:.1f} ms/img); "
        f"flow start to first API request {fmt(m.edges_s[0])} s, last answer to flow end "
        f"{fmt(m.edges_s[1])} s (fixed costs the raw loop does not have)"
    )


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
        med, lo, hi = spread(values)
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
    print_figure_spreads([fig for _, fig, _ in rounds])
    print()
