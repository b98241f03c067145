"""FireworksCredentials: where the API key lives when Prefect runs the code on another machine.

A block keeps the key in Prefect's encrypted storage, so deployments reference it by name instead
of carrying it in parameters (which Prefect stores and shows in the UI).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from prefect.blocks.abstract import CredentialsBlock
from pydantic import Field, HttpUrl, SecretStr

from flux_flows.client import (
    BASE_URL_ENV,
    DEFAULT_BASE_URL,
    AsyncFluxClient,
    FluxClient,
    RetryPolicy,
    resolve_api_key,
    resolve_base_url,
)


class FireworksCredentials(CredentialsBlock):
    """Fireworks AI API key and endpoint.

    Example:
        Save once, load anywhere:
        ```python
        from flux_flows import FireworksCredentials

        FireworksCredentials(api_key="fw-...").save("fireworks", overwrite=True)
        credentials = FireworksCredentials.load("fireworks")
        with credentials.get_client() as client:
            ...
        ```
    """

    _block_type_name = "Fireworks Credentials"
    _block_type_slug = "fireworks-credentials"
    _logo_url = HttpUrl("https://avatars.githubusercontent.com/u/121359744")
    _documentation_url = HttpUrl("https://github.com/flux-flows/flux-flows#configuration")
    _description = "API key and base URL for FLUX.1 image generation on Fireworks AI."

    api_key: SecretStr = Field(
        default=..., title="API key", description="A Fireworks API key (fw-...)."
    )
    # Unset (None) stays unset in the saved document: it is resolved where the client is built,
    # from that machine's FIREWORKS_BASE_URL, else the public API. An explicit value wins.
    base_url: str | None = Field(
        default=None,
        title="Base URL",
        description=(
            f"Inference base URL; unset: {BASE_URL_ENV} where the flow runs, else "
            f"{DEFAULT_BASE_URL}. Point it at `flux-flows emulator` to work offline."
        ),
    )
    timeout_s: float = Field(
        default=60.0, gt=0, description="Seconds to wait for one answer before retrying it."
    )
    max_retries: int = Field(
        default=4, ge=0, description="Retries of a 429, 5xx, timeout or network error per image."
    )

    def resolved_base_url(self) -> str:
        """The base URL a client built here and now uses: `base_url` if set, else
        FIREWORKS_BASE_URL, else the public API."""
        return resolve_base_url(self.base_url)

    def client_options(self) -> dict[str, Any]:
        return {"timeout_s": self.timeout_s, "retry": RetryPolicy(max_retries=self.max_retries)}

    def get_client(self, **kwargs: Any) -> FluxClient:
        """A synchronous FluxClient; keyword arguments go to FluxClient (timeouts, retries)."""
        return FluxClient(
            self.api_key, base_url=self.resolved_base_url(), **{**self.client_options(), **kwargs}
        )

    def get_async_client(self, **kwargs: Any) -> AsyncFluxClient:
        """An AsyncFluxClient with the same settings."""
        return AsyncFluxClient(
            self.api_key, base_url=self.resolved_base_url(), **{**self.client_options(), **kwargs}
        )


def shared_client(credentials: FireworksCredentials | None = None) -> FluxClient:
    """This process's client for these credentials: one connection pool, reused by every image.

    Clients are never task arguments (they cannot be pickled to a Dask worker): each process
    builds its own from the block, or from FIREWORKS_API_KEY / FIREWORKS_BASE_URL without one.
    """
    if credentials is None:
        return _cached_client(resolve_api_key(None).get_secret_value(), resolve_base_url(None))
    return _cached_client(
        credentials.api_key.get_secret_value(),
        credentials.resolved_base_url(),
        credentials.timeout_s,
        credentials.max_retries,
    )


@lru_cache(maxsize=8)
def _cached_client(
    api_key: str, base_url: str, timeout_s: float = 60.0, max_retries: int = 4
) -> FluxClient:
    block = FireworksCredentials(
        api_key=SecretStr(api_key), base_url=base_url, timeout_s=timeout_s, max_retries=max_retries
    )
    return block.get_client()
