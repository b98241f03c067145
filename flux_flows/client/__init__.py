"""FluxClient / AsyncFluxClient: one HTTP call per image (FLUX.1) or one Kontext task, with the
retries the API needs.

One job per module: `_wire` knows the wire format (no I/O), `_kontext` what a Kontext task's
answers mean, `_protocol` the one loop that retries and polls (a generator, like httpx's
`Auth.auth_flow`), and `_sync` / `_async` only send and sleep for it. `_config` holds what both
clients are configured with, and their common base.
"""

from flux_flows.client._async import AsyncFluxClient
from flux_flows.client._config import (
    BASE_URL_ENV,
    DEFAULT_BASE_URL,
    KontextPolicy,
    RetryPolicy,
    resolve_api_key,
    resolve_base_url,
)
from flux_flows.client._sync import FluxClient

__all__ = [
    "BASE_URL_ENV",
    "DEFAULT_BASE_URL",
    "AsyncFluxClient",
    "FluxClient",
    "KontextPolicy",
    "RetryPolicy",
    "resolve_api_key",
    "resolve_base_url",
]
