"""flux-flows: FLUX.1 image generation on Fireworks AI as Prefect tasks and flows.

Only public names live here; each is defined in the module named after its job. They are imported
on first use (PEP 562), so `flux-flows --help` and the emulator start without importing Prefect.
Everything else (the stage packages `planning`, `rendering`, `records`, ...) is internal: it may
change between releases; import from here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flux_flows._version import __version__

if TYPE_CHECKING:
    from flux_flows.blocks import FireworksCredentials
    from flux_flows.client import AsyncFluxClient, FluxClient, KontextPolicy, RetryPolicy
    from flux_flows.errors import (
        APIConnectionError,
        APITimeoutError,
        AuthenticationError,
        BatchFailedError,
        FluxError,
        InvalidRequestError,
        MissingCredentialsError,
        PrefectStartupError,
        PromptSourceError,
        RateLimitError,
        ResponseError,
        ServerError,
        StorageError,
    )
    from flux_flows.flows import generate_images, generate_images_from_file, replay_failed
    from flux_flows.models import FinishReason, ImageRequest, derive_seed, step_seed
    from flux_flows.results import BatchReport, GeneratedImage, ImageRecord
    from flux_flows.tasks import build_request, generate_image, upload_image

_MODULE_OF = {
    "FireworksCredentials": "blocks",
    **dict.fromkeys(("AsyncFluxClient", "FluxClient", "KontextPolicy", "RetryPolicy"), "client"),
    **dict.fromkeys(
        (
            "APIConnectionError",
            "APITimeoutError",
            "AuthenticationError",
            "BatchFailedError",
            "FluxError",
            "InvalidRequestError",
            "MissingCredentialsError",
            "PrefectStartupError",
            "PromptSourceError",
            "RateLimitError",
            "ResponseError",
            "ServerError",
            "StorageError",
        ),
        "errors",
    ),
    **dict.fromkeys(("generate_images", "generate_images_from_file", "replay_failed"), "flows"),
    **dict.fromkeys(("FinishReason", "ImageRequest", "derive_seed", "step_seed"), "models"),
    **dict.fromkeys(("BatchReport", "GeneratedImage", "ImageRecord"), "results"),
    **dict.fromkeys(("build_request", "generate_image", "upload_image"), "tasks"),
}

# The public names, as type checkers need them written out (a literal __all__ and the imports
# above); tests/test_public_api.py fails if these, the imports and _MODULE_OF ever differ.
__all__ = [
    "APIConnectionError",
    "APITimeoutError",
    "AsyncFluxClient",
    "AuthenticationError",
    "BatchFailedError",
    "BatchReport",
    "FinishReason",
    "FireworksCredentials",
    "FluxClient",
    "FluxError",
    "GeneratedImage",
    "ImageRecord",
    "ImageRequest",
    "InvalidRequestError",
    "KontextPolicy",
    "MissingCredentialsError",
    "PrefectStartupError",
    "PromptSourceError",
    "RateLimitError",
    "ResponseError",
    "RetryPolicy",
    "ServerError",
    "StorageError",
    "__version__",
    "build_request",
    "derive_seed",
    "generate_image",
    "generate_images",
    "generate_images_from_file",
    "replay_failed",
    "step_seed",
    "upload_image",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'flux_flows' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"flux_flows.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
