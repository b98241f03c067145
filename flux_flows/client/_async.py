"""AsyncFluxClient: the asyncio driver of the protocol flow, over one pooled httpx.AsyncClient."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import closing
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from flux_flows.client import _protocol as protocol
from flux_flows.client._config import BaseClient
from flux_flows.models import ImageRequest
from flux_flows.results import GeneratedImage

T = TypeVar("T")
AsyncSleeper = Callable[[float], Awaitable[object]]


async def drive(
    flow: protocol.Exchange[T], http: httpx.AsyncClient, sleep: AsyncSleeper = asyncio.sleep
) -> T:
    """Run a flow to its result without blocking the loop; the same flow `_sync.drive` runs.

    Failed steps go back into the flow, as in the sync driver; a cancellation does not (it
    closes the flow instead, like any BaseException).
    """
    with closing(flow):
        step = protocol.resume(flow)
        while not isinstance(step, protocol.Done):
            step = protocol.resume(flow, *await _perform(step, http, sleep))
        return step.result


async def _perform(
    step: protocol.Step, http: httpx.AsyncClient, sleep: AsyncSleeper
) -> protocol.Outcome:
    try:
        if isinstance(step, protocol.Sleep):
            return await sleep(step.seconds), None
        if isinstance(step, protocol.Offload):
            # A file or S3 read must not stall the event loop.
            return await asyncio.to_thread(step.call), None
        if isinstance(step, protocol.Follow):
            return await http.send(step.request, follow_redirects=True), None
        return await http.send(step), None
    except Exception as exc:
        return None, exc


class AsyncFluxClient(BaseClient[httpx.AsyncBaseTransport, httpx.AsyncClient]):
    """Asynchronous twin of FluxClient for asyncio code; it drives the very same flow.

    `transport=` replaces the network, as with `httpx.AsyncClient`.

    >>> async with AsyncFluxClient() as client:
    ...     image = await client.generate(ImageRequest(prompt="a red fox in snow", seed=7))
    """

    def _open_pool(
        self, transport: httpx.AsyncBaseTransport | None, **options: Any
    ) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=transport, **options)

    async def generate(
        self, request: ImageRequest, *, aws_credentials: Any = None
    ) -> GeneratedImage:
        """Generate one image, retrying what is worth retrying; raises a FluxError subclass.

        Same behaviour as `FluxClient.generate`, Kontext included; the input image is read in
        a worker thread so the event loop never blocks on a file or S3.
        """
        flow = protocol.generation_flow(self, request, aws_credentials)
        return await drive(flow, self._http)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
