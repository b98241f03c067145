"""The batch flows' Flow class: Prefect's start-up failure told in this library's words, and
parameters of any size (see `staging`).

A Python user with no Prefect server configured gets Prefect's temporary one, which must create and
migrate a database within 20 s; a small machine can miss that and the user then sees only "Timed out
while attempting to connect to ephemeral Prefect API server". The batch flows are `FluxFlow`s, a
Prefect `Flow` that turns that one error into `PrefectStartupError` with the ways out. Everything
else about the flow (deployments, `with_options`, task runners) is Prefect's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import Flow

from flux_flows.errors import PrefectStartupError

_PREFECT_TIMEOUT_TEXT = "attempting to connect to ephemeral Prefect API server"

STARTUP_HELP = (
    "Prefect's temporary API server did not start in time (it creates and migrates a database "
    "on first use, which can take 30 s or more on a small machine). Either start a server once "
    "and point Prefect at it: `prefect server start` in another terminal, then "
    "`export PREFECT_API_URL=http://127.0.0.1:4200/api`; or give the temporary server longer: "
    "`export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120`. The `flux-flows` command "
    "does the first for you. See README, 'Troubleshooting'."
)


def explain_startup_error(exc: BaseException) -> PrefectStartupError | None:
    """The library's error for Prefect's start-up timeout, or None for any other error."""
    if isinstance(exc, RuntimeError) and _PREFECT_TIMEOUT_TEXT in str(exc):
        return PrefectStartupError(STARTUP_HELP)
    return None


class FluxFlow(Flow[Any, Any]):
    """A Prefect flow whose start-up timeout says what to do, and whose parameters, when too
    big for a flow run together, are staged as files before the run is created (see `staging`)."""

    def __call__(
        self, *args: Any, return_state: bool = False, wait_for: Any = None, **kwargs: Any
    ) -> Any:
        from flux_flows.planning.staging import staged_arguments

        with staged_arguments(self.fn, args, kwargs) as (args, kwargs):
            try:
                return super().__call__(
                    *args, return_state=return_state, wait_for=wait_for, **kwargs
                )
            except RuntimeError as exc:
                error = explain_startup_error(exc)
                if error is None:
                    raise
                raise error from exc

    def with_options(self, *args: Any, **kwargs: Any) -> FluxFlow:
        # Prefect builds a plain Flow here; keep the class so the README's scale-out call
        # (`generate_images.with_options(task_runner=...)`) explains a start-up timeout too.
        new_flow = super().with_options(*args, **kwargs)
        new_flow.__class__ = type(self)
        return new_flow  # type: ignore[return-value]  # its class was set to ours just above


def flux_flow(**options: Any) -> Callable[[Callable[..., Any]], FluxFlow]:
    """`@flow(**options)` that makes a FluxFlow."""

    def decorate(fn: Callable[..., Any]) -> FluxFlow:
        return FluxFlow(fn=fn, **options)

    return decorate
