"""bench_scale.py's rows, RESULT figures and table."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from harness.report import fmt


@dataclass
class Row:
    label: str
    data: dict[str, Any] | None = None
    note: str = ""


def get_row(rows: list[Row], name: str) -> dict[str, Any] | None:
    return next((r.data for r in rows if r.data and r.data.get("name") == name), None)


def figures_of(args: argparse.Namespace, rows: list[Row]) -> dict[str, Any]:
    a, b, c = get_row(rows, "a-threads"), get_row(rows, "b-dask"), get_row(rows, "c-tasks")
    d, small = get_row(rows, "d-workpool"), get_row(rows, "a-small")
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
    out.update(_extra_figures(args, rows))
    out["workpool"] = "ran" if d else "n/a"
    return out


def _extra_figures(args: argparse.Namespace, rows: list[Row]) -> dict[str, Any]:
    """The optional rows' figures: S3, the large run and its re-run, `flux-flows plan`."""

    def rate(x: dict[str, Any]) -> float:
        return x["n"] / x["wall_s"]

    out: dict[str, Any] = {}
    s3a, s3b = get_row(rows, "s3-threads"), get_row(rows, "s3-dask")
    if s3a and s3b:
        out["s3_n"] = s3a["n"]
        out["s3_threads_img_s"] = rate(s3a)
        out["s3_dask_img_s"] = rate(s3b)
        out["s3_dask_vs_threads"] = rate(s3b) / rate(s3a)
    large = get_row(rows, "large")
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
    return out


def print_report(args: argparse.Namespace, rows: list[Row], figures: dict[str, Any]) -> None:
    header = (
        f"{'contender':42} {'N':>7} {'wall s':>8} {'img/s':>7} {'x (a)':>6} "
        f"{'CPU ms/img':>10} {'server ms/img':>13} {'peak RSS MB':>11} {'API calls':>9} "
        f"{'failed':>6} {'others':>6}"
    )
    print()
    print(header)
    print("-" * len(header))
    for row in rows:
        _print_row(args, rows, row)
    _print_notes(args, rows, figures)


def _print_row(args: argparse.Namespace, rows: list[Row], row: Row) -> None:
    a, x = get_row(rows, "a-threads"), row.data
    if x is None:
        print(f"{row.label:42} {row.note}")
        return
    if row.label.startswith("flux-flows plan"):
        print(
            f"{row.label:42} {args.plan_rows:7d} {x['wall_s']:8.1f} {'':>7} {'':>6} "
            f"{'':>10} {'':>13} {x['max_rss_kb'] / 1024:11.0f}   (CPU {x['cpu_s']:.1f} s)"
        )
        return
    n = x["n"]
    failed = n - x["counts"].get("SUCCESS", 0)
    base = get_row(rows, "s3-threads") if x["dest"].startswith("s3://") else a
    ratio = (
        (n / x["wall_s"]) / (base["n"] / base["wall_s"])
        if base and x["name"] not in ("a-small", "large")
        else math.nan
    )
    print(
        f"{row.label:42} {n:7d} {x['wall_s']:8.1f} {n / x['wall_s']:7.0f} {fmt(ratio):>6} "
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


def _print_notes(args: argparse.Namespace, rows: list[Row], figures: dict[str, Any]) -> None:
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
