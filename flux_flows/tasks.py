"""The three steps as Prefect tasks, usable alone in any flow, and the plain functions behind them.

Retries live in one layer, the client (which knows about `Retry-After`), so the tasks set
`retries=0`: task retries on top would multiply API calls and spend. Clients are never task
arguments: each process builds its own from the credentials and keeps it (see `flux_client`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.context import TaskRunContext

from flux_flows import layout
from flux_flows.blocks import FireworksCredentials
from flux_flows.client import FluxClient, RetryPolicy, resolve_api_key, resolve_base_url
from flux_flows.images_in import hash_input_images
from flux_flows.models import (
    FinishReason,
    GeneratedImage,
    ImageRecord,
    ImageRequest,
    request_for,
)
from flux_flows.storage import Storage, open_storage, s3_metadata
from flux_flows.thumbnails import store_thumbnail

if TYPE_CHECKING:
    from prefect_aws import AwsCredentials


def flux_client(credentials: FireworksCredentials | None = None) -> FluxClient:
    """This process's client for these credentials: one connection pool, reused by every task."""
    if credentials is not None:
        return _cached_client(
            credentials.api_key.get_secret_value(),
            credentials.base_url,
            credentials.timeout_s,
            credentials.max_retries,
        )
    return _cached_client(resolve_api_key(None).get_secret_value(), resolve_base_url(None))


@lru_cache(maxsize=8)
def _cached_client(
    api_key: str, base_url: str, timeout_s: float = 60.0, max_retries: int = 4
) -> FluxClient:
    return FluxClient(
        api_key, base_url=base_url, timeout_s=timeout_s, retry=RetryPolicy(max_retries=max_retries)
    )


def image_metadata(image: GeneratedImage, *, flow_run_id: str | None = None) -> dict[str, str]:
    """Provenance stored on the object itself, so an image found alone still says where it came from."""
    request = image.request
    fields: dict[str, object] = {
        "seed": request.seed,
        "model": request.model,
        "finish-reason": image.finish_reason.value,
        "aspect-ratio": request.aspect_ratio,
        "cache-key": request.cache_key,
        "generator": "flux-flows",
    }
    if request.is_kontext:
        fields["safety-tolerance"] = request.safety_tolerance
        if request.input_image_sha256:  # the reference itself may be a huge data URI
            fields["input-image-sha256"] = request.input_image_sha256
    else:
        fields["steps"] = request.num_inference_steps
        fields["guidance-scale"] = request.guidance_scale
    if image.request_id:
        fields["request-id"] = image.request_id
    if flow_run_id:
        fields["flow-run-id"] = flow_run_id
    fields["prompt"] = request.prompt
    return s3_metadata(fields)


def store_image(
    storage: Storage, image: GeneratedImage, *, flow_run_id: str | None = None
) -> tuple[str, str]:
    """Write one answer where its cache key says; filtered answers never land beside real images."""
    key = layout.image_key(image.request, image.finish_reason)
    uri = storage.put(
        key,
        image.data,
        content_type=image.content_type,
        metadata=image_metadata(image, flow_run_id=flow_run_id),
    )
    return key, uri


def current_flow_run_id() -> str | None:
    context = TaskRunContext.get()
    return str(context.task_run.flow_run_id) if context and context.task_run.flow_run_id else None


def _request_cache_key(_context: Any, parameters: Mapping[str, Any]) -> str | None:
    """Prefect cache key of a generation: the request's pixels and which API made them.

    Never the key itself. The base URL is in it so images from the emulator (or a staging
    endpoint) can never answer, as cached, for the real API: Prefect's result store is shared by
    every project on the machine. None (not cached) for an edit whose S3/URL input was never
    hashed: its pixels' identity is unknown, and keying on the name could serve a stale image.
    `build_request` hashes it.
    """
    request = ImageRequest.model_validate(parameters["request"])
    if request.needs_input_hash:
        return None
    credentials = parameters.get("credentials")
    base_url = credentials.base_url if credentials is not None else resolve_base_url(None)
    api = hashlib.sha256(base_url.encode("utf-8")).hexdigest()[:12]
    return f"flux-flows-generate-{api}-{request.cache_key}"


@task(name="build-request", retries=0, persist_result=False, cache_policy=None)
def build_request(
    prompt: str | Mapping[str, Any],
    *,
    model: str | None = None,
    aspect_ratio: str | None = None,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    seed: int | None = None,
    safety_check: bool | None = None,
    output_format: str | None = None,
    variant: int = 0,
    input_image: str | None = None,
    safety_tolerance: int | None = None,
    prompt_upsampling: bool | None = None,
    aws_credentials: AwsCredentials | None = None,
) -> ImageRequest:
    """Validate one prompt into an ImageRequest with an explicit, reproducible seed.

    `seed` is a base: the image's seed is derived from (seed, prompt, variant), so the same
    inputs always make the same request, and so the same cache key. For a FLUX Kontext edit
    (`input_image`), an `s3://` or URL input is read once here to hash its content (with
    `aws_credentials` for S3), so the cache key depends on the image, not its name.

    Example:
        ```python
        @flow
        def my_flow():
            request = build_request("a lighthouse at dusk", aspect_ratio="16:9", seed=7)
            image = generate_image(request)
            upload_image(image, "s3://my-bucket/renders/")
        ```
    """
    defaults = {
        "model": model,
        "aspect_ratio": aspect_ratio,
        "guidance_scale": guidance_scale,
        "num_inference_steps": num_inference_steps,
        "safety_check": safety_check,
        "output_format": output_format,
        "input_image": input_image,
        "safety_tolerance": safety_tolerance,
        "prompt_upsampling": prompt_upsampling,
    }
    request = request_for(prompt, defaults=defaults, base_seed=seed, variant=variant)
    if request.needs_input_hash and request.input_image is not None:
        digest = hash_input_images([request.input_image], aws_credentials)[request.input_image]
        request = request.model_copy(update={"input_image_sha256": digest})
    return request


@task(
    name="generate-image",
    retries=0,
    cache_key_fn=_request_cache_key,
    cache_result_in_memory=False,
    persist_result=True,
)
def generate_image(
    request: ImageRequest,
    credentials: FireworksCredentials | None = None,
    aws_credentials: AwsCredentials | None = None,
) -> GeneratedImage:
    """Call the API once for this request (the client retries 429/5xx/timeouts itself).

    FLUX Kontext models are submitted and polled until ready; a moderated task comes back
    CONTENT_FILTERED with no bytes. `aws_credentials` reads an `s3://` input image.

    Cached by the request's cache key: running the same request again, in any flow run that
    shares this Prefect result storage, returns the stored image in a Cached state and makes
    no API call. Without `credentials`, FIREWORKS_API_KEY / FIREWORKS_BASE_URL are used.

    Example:
        ```python
        image = generate_image(ImageRequest(prompt="a red fox", seed=1), credentials=creds)
        ```
    """
    return flux_client(credentials).generate(
        ImageRequest.model_validate(request), aws_credentials=aws_credentials
    )


@task(name="upload-image", retries=0, persist_result=False, cache_policy=None)
def upload_image(
    image: GeneratedImage,
    destination: str,
    *,
    aws_credentials: AwsCredentials | None = None,
) -> ImageRecord:
    """Store one generated image under `destination` (s3://bucket/prefix or a local folder).

    The object's name comes from the request's cache key, so a batch run into the same
    destination finds it and never pays for it again. A SUCCESS image also gets its thumbnail
    (thumbs/<cache_key>.jpg), made from the bytes in hand; a thumbnail failure is only logged.
    Returns the manifest record.

    Example:
        ```python
        record = upload_image(image, "s3://assets/products/")
        print(record.uri)
        ```
    """
    storage = open_storage(destination, aws_credentials=aws_credentials)
    _, uri = store_image(storage, image, flow_run_id=current_flow_run_id())
    stored = image.finish_reason is FinishReason.SUCCESS
    thumbnail = store_thumbnail(storage, image.request.cache_key, image.data) if stored else None
    return ImageRecord.for_request(
        image.request,
        index=0,
        variant=0,
        finish_reason=image.finish_reason,
        uri=uri if stored else None,
        filtered_uri=None if stored else uri,
        thumbnail_uri=thumbnail[1] if thumbnail else None,
        width=image.width,
        height=image.height,
        content_type=image.content_type,
        size_bytes=len(image.data),
        request_id=image.request_id,
        latency_s=image.latency_s,
        api_calls=image.attempts,
    )
