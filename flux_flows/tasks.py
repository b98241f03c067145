"""The three steps as Prefect tasks, usable alone in any flow, and the plain functions behind them.

Retries live in one layer, the client (which knows about `Retry-After`), so the tasks set
`retries=0`: task retries on top would multiply API calls and spend. Clients are never task
arguments: each process builds its own from the credentials and keeps it (`shared_client`).
The work itself is in `rendering.one_image` (storing) and the client (generating); these are thin.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.context import TaskRunContext
from prefect.serializers import PickleSerializer
from pydantic import Field

from flux_flows.blocks import FireworksCredentials, shared_client
from flux_flows.client import resolve_base_url
from flux_flows.inputs.images import hash_input_images
from flux_flows.models import FinishReason, ImageRequest, request_for
from flux_flows.planning.cost import estimate_cost
from flux_flows.rendering.one_image import store_with_thumbnail
from flux_flows.results import GeneratedImage, ImageRecord
from flux_flows.settings import REQUEST_FIELDS
from flux_flows.storage import open_storage

if TYPE_CHECKING:
    from prefect_aws import AwsCredentials


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
    given = credentials.base_url if credentials is not None else None
    try:
        base_url = resolve_base_url(given)
    except ValueError:  # a malformed URL: the client names it when it is built
        base_url = str(given)
    api = hashlib.sha256(base_url.encode("utf-8")).hexdigest()[:12]
    return f"flux-flows-generate-{api}-{request.cache_key}"


class CachedImageSerializer(PickleSerializer[Any]):
    """Prefect's pickle serializer, except that an image read back from the result store is
    marked `from_cache`: a Cached `generate_image` run made no API call, and its record says so.

    Only a read from the store goes through `loads`; the run that called the API returns its
    image as it came. Results stored by an older version (plain "pickle") are not marked.
    """

    type: str = Field(default="flux-flows-generated-image", frozen=True)

    def loads(self, blob: bytes) -> Any:
        value = super().loads(blob)
        if isinstance(value, GeneratedImage):
            return value.model_copy(update={"from_cache": True})
        return value


@task(name="build-request", retries=0, persist_result=False, cache_policy=None)  # type: ignore[call-overload]  # prefect annotates no None; Task() accepts it
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
    base_seed: int | None = None,
    input_image: str | None = None,
    safety_tolerance: int | None = None,
    prompt_upsampling: bool | None = None,
    aws_credentials: AwsCredentials | None = None,
) -> ImageRequest:
    """Validate one prompt into an ImageRequest with an explicit, reproducible seed.

    `seed` is the seed the API gets for variant 0; variant v gets seed + v (wrapping within
    1..2^32-1). `base_seed` instead derives the seed from (base_seed, prompt, variant); with
    neither, from (prompt, variant). A prompt dict's own "seed" wins over both. So the same
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
    given = locals()
    defaults = {name: given[name] for name in (*REQUEST_FIELDS, "input_image")}
    if seed is not None and base_seed is not None:
        raise ValueError("give seed (sent as is) or base_seed (seeds derived from it), not both")
    request = request_for(
        prompt, defaults=defaults, seed=seed, base_seed=base_seed, variant=variant
    )
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
    result_serializer=CachedImageSerializer(),
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
    no API call; that image has `from_cache=True`. Without `credentials`, FIREWORKS_API_KEY / FIREWORKS_BASE_URL are used.

    Example:
        ```python
        image = generate_image(ImageRequest(prompt="a red fox", seed=1), credentials=creds)
        ```
    """
    return shared_client(credentials).generate(
        ImageRequest.model_validate(request), aws_credentials=aws_credentials
    )


@task(name="upload-image", retries=0, persist_result=False, cache_policy=None)  # type: ignore[call-overload]  # prefect annotates no None; Task() accepts it
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
    Returns the manifest record: an image `generate_image` served from Prefect's cache is
    `cached=True` with 0 API calls and no cost; a new one has its API calls and estimated cost.

    Example:
        ```python
        record = upload_image(image, "s3://assets/products/")
        print(record.uri)
        ```
    """
    storage = open_storage(destination, aws_credentials=aws_credentials)
    uri, thumbnail = store_with_thumbnail(storage, image, flow_run_id=current_flow_run_id())
    stored = image.finish_reason is FinishReason.SUCCESS
    facts = image.facts()
    cached = getattr(image, "from_cache", False)  # results pickled before the field existed
    if cached:
        facts["api_calls"] = 0
    return ImageRecord.for_request(
        image.request,
        index=0,
        variant=0,
        uri=uri if stored else None,
        filtered_uri=None if stored else uri,
        thumbnail_uri=thumbnail,
        cached=cached,
        estimated_cost_usd=0.0 if cached else estimate_cost(image.request),
        **facts,
    )
