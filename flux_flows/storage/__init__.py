"""Where images go and where inputs come from: an S3 bucket (boto3) or a local folder.

The one door to S3 and local files: `open_storage` for a destination, `read_uri`/`list_uri` for
prompt files, input images and manifests. Nothing outside this package builds an S3 client or
reads botocore errors, so credentials, retries and error wording are decided once.
"""

from flux_flows.storage.base import (
    IsAFolderError,
    NotFoundError,
    ReadError,
    Storage,
    TooLargeError,
)
from flux_flows.storage.local import LocalStorage, probe_writable, write_atomically
from flux_flows.storage.metadata import (
    FIELD_VALUE_MAX,
    PROMPT_FIELD,
    PROMPT_HASH_FIELD,
    S3_METADATA_LIMIT,
    TRUNCATION_MARKER,
    metadata_size,
    s3_metadata,
)
from flux_flows.storage.s3 import (
    DEFAULT_MAX_ATTEMPTS,
    MAX_POOL_CONNECTIONS,
    S3Storage,
    clear_s3_client_cache,
    explain_s3_error,
    get_s3_client,
)
from flux_flows.storage.uris import (
    is_s3_uri,
    iter_uri_lines,
    list_uri,
    open_storage,
    read_uri,
    split_s3_uri,
)

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "FIELD_VALUE_MAX",
    "MAX_POOL_CONNECTIONS",
    "PROMPT_FIELD",
    "PROMPT_HASH_FIELD",
    "S3_METADATA_LIMIT",
    "TRUNCATION_MARKER",
    "IsAFolderError",
    "LocalStorage",
    "NotFoundError",
    "ReadError",
    "S3Storage",
    "Storage",
    "TooLargeError",
    "clear_s3_client_cache",
    "explain_s3_error",
    "get_s3_client",
    "is_s3_uri",
    "iter_uri_lines",
    "list_uri",
    "metadata_size",
    "open_storage",
    "probe_writable",
    "read_uri",
    "s3_metadata",
    "split_s3_uri",
    "write_atomically",
]
