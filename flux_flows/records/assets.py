"""The destination's manifest as a Prefect asset, with the prompt source upstream of it.

A batch does not run in a `@materialize` task (it is a flow, and its images are not one task's
output), so the asset events Prefect's materializing tasks send are sent here directly, in the
same shape (`prefect.assets` 3.9: `AssetContext.emit_events`): a
`prefect.asset.referenced` event per upstream asset, then one
`prefect.asset.materialization.succeeded` naming the upstream assets as related resources with
role `asset`, and the metadata as its payload. A self-hosted server stores these events (they
can trigger deployments); the asset graph is a Prefect Cloud view.

Asset keys are URIs: an `s3://` destination's manifest is its own key, a local one is
`file://` + its absolute path. Prefect refuses some keys (spaces, `?`, `#`, over 512 characters):
such an asset is skipped with a warning, because lineage is never worth failing a paid batch.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from prefect.assets import Asset
from prefect.events import emit_event
from pydantic import ValidationError

MATERIALIZED = "prefect.asset.materialization.succeeded"
REFERENCED = "prefect.asset.referenced"
MATERIALIZED_BY = "flux-flows"

_log = logging.getLogger(__name__)


def asset_key(uri: str) -> str:
    """The key Prefect knows a stored object by: a URI as is, a local path as `file://` + path."""
    if "://" in uri:
        return uri
    return "file://" + os.path.abspath(os.path.expanduser(uri))


def valid_asset(uri: str | None, what: str, logger: Any = _log) -> Asset | None:
    """The asset for `uri`, or None (with a warning naming why) when Prefect refuses its key."""
    if not uri:
        return None
    key = asset_key(uri)
    try:
        return Asset(key=key)
    except ValidationError as exc:
        reason = "; ".join(str(error.get("msg", "")) for error in exc.errors())
        logger.warning(
            "%s is not recorded as a Prefect asset: %r is refused (%s)", what, key, reason
        )
        return None


def materialize_manifest(
    manifest_uri: str | None,
    source_uri: str | None,
    metadata: dict[str, Any],
    logger: Any = _log,
) -> str | None:
    """Send the manifest's materialization (and its source's reference); returns the asset key
    sent, or None when there was nothing to send or the key was refused."""
    manifest = valid_asset(manifest_uri, "the manifest", logger)
    if manifest is None:
        return None
    upstream = valid_asset(source_uri, "the prompt source", logger)
    related = [
        {"prefect.resource.id": MATERIALIZED_BY, "prefect.resource.role": "asset-materialized-by"}
    ]
    if upstream is not None:
        emit_event(event=REFERENCED, resource={"prefect.resource.id": upstream.key}, related=[])
        related.insert(0, {"prefect.resource.id": upstream.key, "prefect.resource.role": "asset"})
    emit_event(
        event=MATERIALIZED,
        resource={"prefect.resource.id": manifest.key, "prefect.resource.name": "manifest.jsonl"},
        related=related,
        payload=metadata,
    )
    return manifest.key
