"""What a client is configured with: key, endpoint, timeouts, pool, and the two waiting policies.

Both clients take exactly these settings (`BaseClient` is their common base), so the sync and
async constructors cannot drift apart; each only says which httpx client it pools.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx
from pydantic import SecretStr

from flux_flows._version import __version__
from flux_flows.client._wire import ResponseFormat
from flux_flows.errors import FluxError, MissingCredentialsError

DEFAULT_BASE_URL = "https://api.fireworks.ai/inference/v1"
API_KEY_ENV = "FIREWORKS_API_KEY"
BASE_URL_ENV = "FIREWORKS_BASE_URL"

# on_retry(attempt, delay_s, error class name), called before each retry's wait.
RetryHook = Callable[[int, float, str], None]


def resolve_api_key(api_key: str | SecretStr | None) -> SecretStr:
    """The key from the argument, else the environment; raising before any request is sent."""
    if isinstance(api_key, SecretStr):
        api_key = api_key.get_secret_value()
    key = (api_key or os.environ.get(API_KEY_ENV, "")).strip()
    if not key:
        raise MissingCredentialsError(
            f"No Fireworks API key: set {API_KEY_ENV}, pass api_key=..., or load a "
            "FireworksCredentials block (FireworksCredentials.load('name')). For offline use, "
            "run `flux-flows emulator` and point FIREWORKS_BASE_URL at it."
        )
    return SecretStr(key)


def resolve_base_url(base_url: str | None) -> str:
    url = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {url!r}")
    return url


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, as the official SDK does (0.5 s doubling up to 8 s).

    A server's `Retry-After` wins over the computed delay, capped by `max_retry_after_s` so a
    misbehaving proxy cannot park a pipeline for an hour.
    """

    max_retries: int = 4
    initial_delay_s: float = 0.5
    max_delay_s: float = 8.0
    max_retry_after_s: float = 60.0

    def delay(self, retry_index: int, retry_after_s: float | None = None) -> float:
        """Seconds to wait before retry number `retry_index` (0-based)."""
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), self.max_retry_after_s)
        ceiling = min(self.initial_delay_s * 2**retry_index, self.max_delay_s)
        # "Equal jitter": never less than half the backoff, so a storm of clients still spreads out
        # without any of them hammering again almost at once.
        return ceiling / 2 + random.uniform(0, ceiling / 2)


@dataclass(frozen=True)
class KontextPolicy:
    """How a Kontext task is waited for: polls from 0.5 s apart backing off to 2 s, for 2 min.

    Those are the figures working clients use. An early `Task not found` is tolerated, because a
    task may not be visible to get_result the instant submit answers: it means the task is lost
    only once `not_found_grace_s` have passed since submit *and* at least `not_found_min_polls`
    polls said so (a process paused past the grace period still asks a few times).
    """

    poll_initial_s: float = 0.5
    poll_max_s: float = 2.0
    poll_backoff: float = 1.5
    timeout_s: float = 120.0
    not_found_grace_s: float = 10.0
    not_found_min_polls: int = 3

    def __post_init__(self) -> None:
        if self.poll_initial_s <= 0 or self.poll_max_s < self.poll_initial_s:
            raise ValueError("need 0 < poll_initial_s <= poll_max_s")
        if self.poll_backoff < 1:
            raise ValueError("poll_backoff must be >= 1")
        if self.timeout_s <= 0 or self.not_found_grace_s < 0 or self.not_found_min_polls < 1:
            raise ValueError(
                "need timeout_s > 0, not_found_grace_s >= 0 and not_found_min_polls >= 1"
            )

    def delay(self, polls_done: int) -> float:
        return min(self.poll_initial_s * self.poll_backoff**polls_done, self.poll_max_s)


def auth_headers(api_key: SecretStr) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {api_key.get_secret_value()}",
        "User-Agent": f"flux-flows/{__version__}",
    }


TransportT = TypeVar("TransportT", httpx.BaseTransport, httpx.AsyncBaseTransport)
PoolT = TypeVar("PoolT", httpx.Client, httpx.AsyncClient)


class BaseClient(Generic[TransportT, PoolT]):
    """The settings both clients share, and their one pooled httpx client.

    The protocol reads the settings live, so `retry` or `on_retry` set after construction count.
    `transport=` replaces the network under the pool, as it does for `httpx.Client`.
    """

    def __init__(
        self,
        api_key: str | SecretStr | None = None,
        *,
        base_url: str | None = None,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 5.0,
        retry: RetryPolicy | None = None,
        response_format: ResponseFormat = "image",
        max_connections: int = 64,
        on_retry: RetryHook | None = None,
        kontext: KontextPolicy | None = None,
        transport: TransportT | None = None,
    ) -> None:
        if response_format not in ("image", "json"):
            raise ValueError(f"response_format must be 'image' or 'json', got {response_format!r}")
        self._api_key = resolve_api_key(api_key)
        self.base_url = resolve_base_url(base_url)
        self.timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self.retry = retry or RetryPolicy()
        self.response_format: ResponseFormat = response_format
        self.limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self.on_retry = on_retry
        self.kontext = kontext or KontextPolicy()
        self._http: PoolT = self._open_pool(
            transport,
            base_url=self.base_url,
            timeout=self.timeout,
            limits=self.limits,
            headers=auth_headers(self._api_key),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def _open_pool(self, transport: TransportT | None, **options: Any) -> PoolT:
        """The mode's own httpx client: one connection set per FluxClient."""
        raise NotImplementedError

    def _redact(self, error: FluxError) -> FluxError:
        """A server that echoes the key must not make us print it."""
        secret = self._api_key.get_secret_value()
        # Very short "keys" (the emulator takes any) would mangle ordinary words if replaced.
        if len(secret) >= 8 and secret in error.message:
            error.message = error.message.replace(secret, "***")
            error.args = (error.message,)
        return error
