"""flux-flows: FLUX.1 image generation on Fireworks AI as Prefect tasks and flows.

Only public names live here; each is defined in the module named after its job.
"""

from flux_flows._version import __version__
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
    PromptSourceError,
    RateLimitError,
    ResponseError,
    ServerError,
    StorageError,
)
from flux_flows.flows import generate_images, generate_images_from_file
from flux_flows.models import (
    BatchReport,
    FinishReason,
    GeneratedImage,
    ImageRecord,
    ImageRequest,
    derive_seed,
)
from flux_flows.tasks import build_request, generate_image, upload_image

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
    "upload_image",
]
