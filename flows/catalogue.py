"""A product catalogue in Parquet becomes product shots: a template, no pre-processing flow.

The data team's export has `id`, `sku`, `name`, `colour`, `category` and no `prompt`. A
template makes each row's prompt from its columns, a default fills a missing colour, and the
`sku` and `category` columns ride into the manifest (and into each image's S3 metadata as
`row-sku`, `row-category`, `row-id`), so the next job joins the images back to the catalogue:

    generate_images_from_file("s3://exports/catalogue.parquet", "s3://assets/shots/",
                              prompt_template="studio photo of a {name} in {colour}, ...",
                              template_defaults={"colour": "white"},
                              keep_columns=["sku", "category"])

or, from a shell: `flux-flows run catalogue.parquet --template 'studio photo of a {name} in
{colour}' --template-default colour=white --keep-columns sku,category`.

Run it as a script to try it offline (needs `pip install 'flux-flows[parquet]'`):
`python flows/catalogue.py`. It writes a small catalogue.parquet, and with FIREWORKS_BASE_URL
unset it starts the local Fireworks emulator and writes to ./flux-flows-output/catalogue/.
A second run pays for nothing; changing the template pays only for the prompts it changed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from prefect import flow

from flux_flows import generate_images_from_file
from flux_flows.records.manifests import iter_manifest

LOCAL_DESTINATION = "./flux-flows-output/catalogue"
TEMPLATE = "studio photo of a {name} in {colour}, white background, soft shadow"
EXAMPLE_ROWS: list[dict[str, Any]] = [
    {
        "id": "p-101",
        "sku": "MUG-RED",
        "name": "ceramic mug",
        "colour": "red",
        "category": "kitchen",
    },
    {"id": "p-102", "sku": "LAMP-01", "name": "desk lamp", "colour": None, "category": "office"},
    {
        "id": "p-103",
        "sku": "CHR-OAK",
        "name": "dining chair",
        "colour": "oak",
        "category": "living",
    },
]


def write_example_catalogue(path: Path) -> Path:
    """What a warehouse export looks like: one row per product, a null where a value is unknown."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(EXAMPLE_ROWS), path)
    return path


@flow(name="catalogue-shots", log_prints=True)
def catalogue_shots(
    catalogue: str, destination: str = LOCAL_DESTINATION, template: str = TEMPLATE
) -> dict[str, str | None]:
    """One image per catalogue row; returns sku -> image URI (None where it failed)."""
    report = generate_images_from_file(
        catalogue,
        destination,
        prompt_template=template,
        template_defaults={"colour": "white"},
        keep_columns=["sku", "category"],
        seed=2026,
    )
    print(f"{report.counts['SUCCESS']} images, {report.api_calls} API calls: {report.manifest_uri}")
    shots: dict[str, str | None] = {}
    for record in iter_manifest(report.manifest_uri or ""):
        sku = (record.columns or {}).get("sku", record.item_id or str(record.index))
        shots[sku] = record.uri
        print(json.dumps({"sku": sku, "prompt": record.prompt, "uri": record.uri}))
    return shots


def main(argv: list[str] | None = None) -> int:
    """Script entry point: the emulator stands in for Fireworks unless FIREWORKS_BASE_URL is set."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--destination", default=LOCAL_DESTINATION, help="folder or s3:// URI")
    parser.add_argument("--catalogue", default=None, help="a .parquet/.csv/.jsonl catalogue")
    args = parser.parse_args(argv)
    catalogue = args.catalogue
    if catalogue is None:
        folder = Path(args.destination if "://" not in args.destination else LOCAL_DESTINATION)
        folder.mkdir(parents=True, exist_ok=True)
        catalogue = str(write_example_catalogue(folder / "catalogue.parquet"))
    if os.environ.get("FIREWORKS_BASE_URL"):
        shots = catalogue_shots(catalogue, args.destination)
    else:
        from flux_flows.emulator import Emulator

        with Emulator() as emulator:
            print(
                f"FIREWORKS_BASE_URL is not set: using a local Fireworks emulator at "
                f"{emulator.base_url} (no key needed, nothing is billed).",
                file=sys.stderr,
            )
            # A placeholder key, never the user's real one: the emulator accepts any key.
            os.environ["FIREWORKS_BASE_URL"] = emulator.base_url
            os.environ["FIREWORKS_API_KEY"] = "emulator-accepts-any-key"
            shots = catalogue_shots(catalogue, args.destination)
    return 0 if all(shots.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
