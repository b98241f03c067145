"""FluxClient / AsyncFluxClient: one HTTP call per image (FLUX.1) or one Kontext task, with the
retries the API needs.

One job per module: `_wire` knows the wire format (no I/O), `_kontext` what a Kontext task's
answers mean, `_protocol` the one loop that retries and polls (a generator, like httpx's
`Auth.auth_flow`), and `_sync` / `_async` only send and sleep for it. `_config` holds what both
clients are configured with, and their common base.
"""

from flux_flows.client._async import AsyncFluxClient
from flux_flows.client._config import (
    API_KEY_ENV,
    BASE_URL_ENV,
    DEFAULT_BASE_URL,
    KontextPolicy,
    RetryHook,
    RetryPolicy,
    resolve_api_key,
    resolve_base_url,
)
from flux_flows.client._kontext import kontext_input_data_uri
from flux_flows.client._sync import FluxClient
from flux_flows.client._wire import (
    RETRYABLE_STATUS,
    ResponseFormat,
    api_error_message,
    error_for_status,
    parse_response,
    parse_retry_after,
    same_origin,
)
from flux_flows.inputs.sniff import image_size, sniff_image

__all__ = [
    "API_KEY_ENV",
    "BASE_URL_ENV",
    "DEFAULT_BASE_URL",
    "RETRYABLE_STATUS",
    "AsyncFluxClient",
    "FluxClient",
    "KontextPolicy",
    "ResponseFormat",
    "RetryHook",
    "RetryPolicy",
    "api_error_message",
    "error_for_status",
    "image_size",
    "kontext_input_data_uri",
    "parse_response",
    "parse_retry_after",
    "resolve_api_key",
    "resolve_base_url",
    "same_origin",
    "sniff_image",
]
