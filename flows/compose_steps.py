"""The three step tasks composed inside your own flow, next to tasks of your own.

`generate_images` is the batch with every safeguard built in. When images are one step among
others (a catalogue job that writes descriptions, renders a picture of each product, then
publishes a page), use the steps directly:

- `build_request` validates a prompt into an `ImageRequest` with an explicit, reproducible seed;
- `generate_image` calls the API; it is cached by the request's cache key, so re-running the
  flow shows Cached states and makes no API call for requests it has already paid for;
- `upload_image` stores the image under a name derived from the same key and returns the
  manifest record.

Prefect passes futures between the mapped tasks, so each product's three steps run as soon as
its previous step is done, at most `max_workers` at a time.

Run it as a script to try it offline: `python flows/compose_steps.py`. With FIREWORKS_BASE_URL
unset it starts the local Fireworks emulator and writes to ./flux-flows-output/compose/.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from prefect import flow, task, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from flux_flows import (
    FinishReason,
    FireworksCredentials,
    ImageRecord,
    build_request,
    generate_image,
    upload_image,
)

LOCAL_DESTINATION = "./flux-flows-output/compose"
EXAMPLE_PRODUCTS: list[dict[str, Any]] = [
    {"sku": "mug-01", "name": "ceramic coffee mug", "colour": "sage green"},
    {"sku": "lamp-02", "name": "brass desk lamp", "colour": "antique gold"},
    {"sku": "tote-03", "name": "linen tote bag", "colour": "natural beige"},
]


@task(name="describe-product")
def describe_product(product: dict[str, Any], style: str) -> str:
    """Your own step: turn a catalogue row into a prompt (here a template; often an LLM call)."""
    return f"{product['colour']} {product['name']}, {style}"


@task(name="publish-catalogue")
def publish_catalogue(
    products: list[dict[str, Any]], records: list[ImageRecord]
) -> dict[str, str | None]:
    """Your own step after the images: map each SKU to its image URI (None if it was filtered)."""
    return {
        product["sku"]: record.uri if record.finish_reason is FinishReason.SUCCESS else None
        for product, record in zip(products, records, strict=True)
    }


@flow(
    name="product-shots",
    task_runner=ThreadPoolTaskRunner(max_workers=4),
    log_prints=True,
    persist_result=False,
)
def product_shots(
    products: list[dict[str, Any]],
    destination: str,
    style: str = "product photo, soft studio light, plain background",
    aspect_ratio: str = "4:3",
    base_seed: int = 7,
    credentials_block: str | None = None,
) -> dict[str, str | None]:
    """Render one picture per product into `destination` and return {sku: image URI}.

    `base_seed`: each image's own seed is derived from (base_seed, prompt), so the same
    catalogue always yields the same requests, and a re-run is served from the cache. (`seed=`
    would send that one seed as is for every product.)
    """
    credentials = FireworksCredentials.load(credentials_block) if credentials_block else None
    prompts = describe_product.map(products, unmapped(style))
    requests = build_request.map(
        prompts, aspect_ratio=unmapped(aspect_ratio), base_seed=unmapped(base_seed)
    )
    images = generate_image.map(requests, credentials=unmapped(credentials))
    records = upload_image.map(images, unmapped(destination))
    catalogue = publish_catalogue(products, records.result())
    print(f"published {sum(uri is not None for uri in catalogue.values())} images: {catalogue}")
    return catalogue


def main(argv: list[str] | None = None) -> int:
    """Script entry point: the emulator stands in for Fireworks unless FIREWORKS_BASE_URL is set."""
    parser = argparse.ArgumentParser(
        description="Render the example catalogue. Without FIREWORKS_BASE_URL it runs against "
        "a local Fireworks emulator, so it needs no key and costs nothing."
    )
    parser.add_argument("--destination", default=LOCAL_DESTINATION, help="folder or s3:// URI")
    parser.add_argument("--credentials-block", default=None, help="FireworksCredentials block")
    args = parser.parse_args(argv)
    kwargs: dict[str, Any] = {
        "products": EXAMPLE_PRODUCTS,
        "destination": args.destination,
        "credentials_block": args.credentials_block,
    }
    if os.environ.get("FIREWORKS_BASE_URL") or args.credentials_block:
        catalogue = product_shots(**kwargs)
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
            catalogue = product_shots(**kwargs)
    return 0 if all(catalogue.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
