"""`flux-flows plan` of a Parquet catalogue with a template, beside the same prompts as `.txt`.

Issue 24's targets: planning 1,000,000 Parquet rows through `--template` takes at most 1.5x the
peak RSS and 2x the time of planning the same rendered prompts from a `.txt` file. Both plans run
as `flux-flows plan` subprocesses, one after the other in the same run, into an empty folder
(no API key, no network), each started and reaped by `harness.procs.measured_command` (wall
time, and the child's own CPU and peak RSS from `wait4`).

    python benchmarks/bench_tables.py --rows 1000000
    python benchmarks/bench_tables.py --rows 1000000 --row-group-rows 65536

The catalogue has the columns a product export would (`id`, `sku`, `name`, `colour`,
`category`, `price`), written by pyarrow with its default row groups (up to 1Mi rows each: one
group for a million rows) unless `--row-group-rows` says otherwise; the plan reads only the
columns the template and the request fields need. The catalogue is written by a child process
(`_write`): Linux starts an exec'd child's peak RSS at what its parent held, so the measuring
process stays small and prints its own peak RSS, the floor of every figure. Prints its header
facts, a table, then one `RESULT` line; keep the whole output as `raw_output_path()` names it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.cpu import max_rss_kb
from harness.procs import REPO, measured_command, run_script
from harness.report import (
    cpu_model,
    package_version,
    print_result,
    raw_output_path,
    stamp,
    uptime_text,
)

TEMPLATE = "studio photo of a {name} in {colour}, item {sku}, white background"
NAMES = ["mug", "lamp", "chair", "sofa", "kettle", "vase", "rug", "desk", "stool", "clock"]
COLOURS = ["red", "oak", "white", "teal", "black", "sand", "grey"]


def write_catalogue(argv: Sequence[str]) -> None:
    """`_write ROWS PARQUET TXT GROUP_ROWS`: the same rows as a table and as rendered prompts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, parquet, txt, group_rows = int(argv[0]), Path(argv[1]), Path(argv[2]), int(argv[3])
    ids = [f"p-{i}" for i in range(rows)]
    skus = [f"SKU-{i:07d}" for i in range(rows)]
    names = [NAMES[i % len(NAMES)] for i in range(rows)]
    colours = [COLOURS[i % len(COLOURS)] for i in range(rows)]
    table = pa.table(
        {
            "id": ids,
            "sku": skus,
            "name": names,
            "colour": colours,
            "category": ["home"] * rows,
            "price": [9.5 + i % 100 for i in range(rows)],
        }
    )
    pq.write_table(table, parquet, row_group_size=group_rows or None)
    groups = pq.ParquetFile(parquet).metadata.num_row_groups
    with txt.open("w") as handle:
        for name, colour, sku in zip(names, colours, skus, strict=True):
            handle.write(TEMPLATE.format(name=name, colour=colour, sku=sku) + "\n")
    print(
        f"catalogue.parquet {parquet.stat().st_size / 1e6:.1f} MB ({groups} row groups, 6 "
        f"columns), catalogue.txt {txt.stat().st_size / 1e6:.1f} MB"
    )


def plan(args: list[str]) -> dict[str, Any]:
    """One `flux-flows plan` child: wall s, CPU s, peak RSS MB; it must have planned."""
    command = [sys.executable, "-m", "flux_flows.cli", "plan", *args]
    figures = measured_command(command, {**os.environ, "COLUMNS": "120"})
    if "to generate" not in figures["output"]:
        raise SystemExit(f"flux-flows plan {' '.join(args)} did not plan:\n{figures['output']}")
    return {
        "wall_s": figures["wall_s"],
        "cpu_s": figures["cpu_s"],
        "rss_mb": figures["max_rss_kb"] / 1024,
    }


def orchestrate(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--row-group-rows", type=int, default=0, help="0: pyarrow's default")
    options = parser.parse_args(argv)
    print(f"bench_tables: {stamp()}; {os.cpu_count()} cores; {cpu_model()}")
    print(f"  command: python benchmarks/bench_tables.py {' '.join(argv) or '(defaults)'}")
    print(f"  python {sys.version.split()[0]}, pyarrow {package_version('pyarrow')}")
    print(f"  raw output kept as {raw_output_path(__file__).relative_to(REPO)}")
    print(f"  start: {uptime_text()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-tables-"))
    try:
        parquet, txt = work / "catalogue.parquet", work / "catalogue.txt"
        written = measured_command(
            [
                sys.executable,
                __file__,
                "_write",
                str(options.rows),
                str(parquet),
                str(txt),
                str(options.row_group_rows),
            ],
            dict(os.environ),
        )
        print("  " + written["output"].strip())
        figures = {
            "txt": plan([str(txt), "--to", str(work / "out-txt")]),
            "parquet": plan([str(parquet), "--template", TEMPLATE, "--to", str(work / "out-pq")]),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"  end: {uptime_text()}")
    print(f"  this process's own peak RSS (the floor of a child's): {max_rss_kb() / 1024:.1f} MB")
    print(
        f"{'flux-flows plan, ' + str(options.rows) + ' rows':42} {'wall s':>8} {'CPU s':>8} {'peak RSS MB':>12}"
    )
    for name, label in (("txt", ".txt"), ("parquet", ".parquet --template")):
        row = figures[name]
        print(f"{label:42} {row['wall_s']:8.1f} {row['cpu_s']:8.1f} {row['rss_mb']:12.1f}")
    txt_row, pq_row = figures["txt"], figures["parquet"]
    rss_ratio, time_ratio = (
        pq_row["rss_mb"] / txt_row["rss_mb"],
        pq_row["wall_s"] / txt_row["wall_s"],
    )
    print_result(
        {
            "rows": options.rows,
            "row_group_rows": options.row_group_rows or "default",
            "txt_s": txt_row["wall_s"],
            "txt_cpu_s": txt_row["cpu_s"],
            "txt_rss_mb": txt_row["rss_mb"],
            "parquet_s": pq_row["wall_s"],
            "parquet_cpu_s": pq_row["cpu_s"],
            "parquet_rss_mb": pq_row["rss_mb"],
            "rss_ratio": rss_ratio,
            "time_ratio": time_ratio,
            "targets_met": "yes" if rss_ratio <= 1.5 and time_ratio <= 2 else "no",
        }
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_script(argv, {"_write": write_catalogue}, orchestrate)


if __name__ == "__main__":
    raise SystemExit(main())
