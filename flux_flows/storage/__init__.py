"""Where images go and where inputs come from: an S3 bucket (boto3) or a local folder.

The one door to S3 and local files: `open_storage` for a destination, `read_uri`/`list_uri` for
prompt files, input images and manifests. Nothing outside this package builds an S3 client or
reads botocore errors, so credentials, retries and error wording are decided once.
"""

from flux_flows.storage.base import IsAFolderError, NotFoundError, ReadError, Storage, TooLargeError
from flux_flows.storage.local import LocalStorage, probe_writable, write_atomically
from flux_flows.storage.metadata import s3_metadata
from flux_flows.storage.s3 import S3Storage
from flux_flows.storage.uris import (
    is_s3_uri,
    iter_uri_lines,
    list_uri,
    open_storage,
    read_uri,
    split_s3_uri,
)

__all__ = [
    "IsAFolderError",
    "LocalStorage",
    "NotFoundError",
    "ReadError",
    "S3Storage",
    "Storage",
    "TooLargeError",
    "is_s3_uri",
    "iter_uri_lines",
    "list_uri",
    "open_storage",
    "probe_writable",
    "read_uri",
    "s3_metadata",
    "split_s3_uri",
    "write_atomically",
]
