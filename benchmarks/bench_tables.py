"""`flux-flows plan` of a Parquet catalogue with a template, beside the same prompts as `.txt`.

Issue 24's targets: planning 1,000,000 Parquet rows through `--template` takes at most 1.5x the
peak RSS and 2x the time of planning the same rendered prompts from a `.txt` file. Both plans run
as `flux-flows plan` subprocesses, one after the other in the same run, into an empty folder
(no API key, no network); each child's own peak RSS and CPU come from `os.wait4`.

    python benchmarks/bench_tables.py --rows 1000000

The catalogue has the columns a product export would (`id`, `sku`, `name`, `colour`,
`category`, `price`), written by pyarrow with its default row groups; the plan reads only the
columns the template and the request fields need. Prints the date, commit and load first, a table,
then one `RESULT` line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TEMPLATE = "studio photo of a {name} in {colour}, item {sku}, white background"
NAMES = ["mug", "lamp", "chair", "sofa", "kettle", "vase", "rug", "desk", "stool", "clock"]
COLOURS = ["red", "oak", "white", "teal", "black", "sand", "grey"]


def write_catalogue(rows: int, parquet: Path, txt: Path) -> None:
    """The same rows twice: as a Parquet table, and as the prompts the template renders."""
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
    pq.write_table(table, parquet)
    with txt.open("w") as handle:
        for name, colour, sku in zip(names, colours, skus, strict=True):
            handle.write(TEMPLATE.format(name=name, colour=colour, sku=sku) + "\n")


# Linux hands a forked child its parent's peak RSS as a floor (`ru_maxrss` survives fork and
# exec), and this script holds the whole catalogue while writing it: each plan is therefore
# started and waited for by a small wrapper process, whose own footprint is the floor instead.
_WRAPPER = """
import json, os, subprocess, sys, time
started = time.perf_counter()
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
output = child.stdout.read()
_, status, usage = os.wait4(child.pid, 0)
wall = time.perf_counter() - started
sys.stdout.buffer.write(output)
figures = [os.waitstatus_to_exitcode(status), wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss]
sys.stderr.write(json.dumps(figures))
"""


def measure(args: list[str]) -> dict[str, float]:
    """Wall time, CPU time and peak RSS (its own, from `os.wait4`) of one `flux-flows` child."""
    done = subprocess.run(
        [sys.executable, "-c", _WRAPPER, sys.executable, "-m", "flux_flows.cli", *args],
        capture_output=True,
        env={**os.environ, "COLUMNS": "120"},
        check=False,
    )
    code, wall, cpu, max_rss_kb = json.loads(done.stderr)
    output = done.stdout.decode()
    if code != 0 or "to generate" not in output:
        raise SystemExit(f"flux-flows {' '.join(args)} failed ({code}):\n{output}")
    return {"wall_s": wall, "cpu_s": cpu, "rss_mb": max_rss_kb / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=None)
    options = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    commit += " (with uncommitted changes)" if dirty else ""
    print(f"date {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {commit}, load {os.getloadavg()}")
    print(f"python {sys.version.split()[0]}, pyarrow {pa.__version__}, rows {options.rows}")
    work = options.workdir or Path(tempfile.mkdtemp(prefix="bench-tables-"))
    work.mkdir(parents=True, exist_ok=True)
    parquet, txt = work / "catalogue.parquet", work / "catalogue.txt"
    write_catalogue(options.rows, parquet, txt)
    groups = pq.ParquetFile(parquet).metadata.num_row_groups
    print(
        f"catalogue.parquet {parquet.stat().st_size / 1e6:.1f} MB ({groups} row groups, 6 "
        f"columns), catalogue.txt {txt.stat().st_size / 1e6:.1f} MB"
    )
    figures = {
        "txt": measure(["plan", str(txt), "--to", str(work / "out-txt")]),
        "parquet": measure(
            ["plan", str(parquet), "--template", TEMPLATE, "--to", str(work / "out-parquet")]
        ),
    }
    print(
        f"{'flux-flows plan, ' + str(options.rows) + ' rows':42} {'wall s':>8} {'CPU s':>8} {'peak RSS MB':>12}"
    )
    for name, row in figures.items():
        label = ".txt" if name == "txt" else ".parquet --template"
        print(f"{label:42} {row['wall_s']:8.1f} {row['cpu_s']:8.1f} {row['rss_mb']:12.1f}")
    txt_row, pq_row = figures["txt"], figures["parquet"]
    rss_ratio, time_ratio = (
        pq_row["rss_mb"] / txt_row["rss_mb"],
        pq_row["wall_s"] / txt_row["wall_s"],
    )
    print(
        f"RESULT rows={options.rows} txt_s={txt_row['wall_s']:.1f} txt_cpu_s={txt_row['cpu_s']:.1f} "
        f"txt_rss_mb={txt_row['rss_mb']:.1f} parquet_s={pq_row['wall_s']:.1f} "
        f"parquet_cpu_s={pq_row['cpu_s']:.1f} parquet_rss_mb={pq_row['rss_mb']:.1f} "
        f"rss_ratio={rss_ratio:.2f} time_ratio={time_ratio:.2f} "
        f"targets_met={'yes' if rss_ratio <= 1.5 and time_ratio <= 2 else 'no'}"
    )


if __name__ == "__main__":
    main()
