"""S3 (AWS or any S3-compatible store): list and download images with boto3, and the Arrow
filesystem that Ray (checkpoints, dataset shards) reads and writes through.

Credentials and the endpoint come from the environment as for every AWS tool
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``) or from arguments;
they are never written anywhere by this module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from pyarrow import fs as pafs

from ssl_models.data import IMAGE_SUFFIXES, DataError
from tasks.sources import Kind, SourceItem, is_image

_clients: dict[str | None, Any] = {}  # one per endpoint and process (ingest workers download in parallel)


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` to (bucket, prefix)."""
    if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
        raise DataError(f"{url}: expected s3://bucket/prefix")
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix


def client(endpoint_url: str | None = None, **kwargs: Any) -> Any:
    config = Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=32)
    return boto3.client("s3", endpoint_url=endpoint_url, config=config, **kwargs)


def shared_client(endpoint_url: str | None = None) -> Any:
    if endpoint_url not in _clients:
        _clients[endpoint_url] = client(endpoint_url)
    return _clients[endpoint_url]


def s3_items(url: str, kind: Kind, endpoint_url: str | None = None) -> Iterator[SourceItem]:
    """The images under an S3 prefix, a listing page at a time; for ``labeled``, the class is the
    first path component below the prefix. Workers download them when the ingest reads them."""
    bucket, prefix = parse_url(url)
    base = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    s3 = shared_client(endpoint_url)
    found = False
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if not is_image(key):
                    if not key.endswith("/"):  # a folder marker is no file
                        suffix = os.path.splitext(key)[1] or "no suffix"
                        skipped = f"not an image file name ({suffix})"
                        yield SourceItem(f"s3://{bucket}/{key}", None, int(obj["Size"]), skipped=skipped)
                    continue
                relative = key[len(base) :] if key.startswith(base) else key[len(prefix) :].lstrip("/")
                parts = relative.split("/")
                if kind == "labeled" and len(parts) < 2:
                    raise DataError(f"s3://{bucket}/{key}: labeled data holds images in one folder per class")
                label = parts[0] if kind == "labeled" else None
                yield SourceItem(f"s3://{bucket}/{key}", label, int(obj["Size"]), str(obj.get("ETag", "")))
                found = True
    except (BotoCoreError, ClientError) as e:
        raise DataError(f"{url}: cannot list ({e})") from e
    if not found:
        raise DataError(f"{url}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")


def download(uri: str, s3: Any | None = None) -> bytes:
    """One object's bytes; errors name the object."""
    bucket, key = parse_url(uri)
    s3 = s3 or shared_client()
    try:
        return bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except (BotoCoreError, ClientError) as e:
        raise DataError(f"{uri}: cannot download ({e})") from e


def arrow_filesystem(endpoint_url: str | None) -> pafs.S3FileSystem | None:
    """PyArrow's S3 filesystem for an S3-compatible endpoint (None: PyArrow's own defaults reach AWS).

    PyArrow ignores ``AWS_ENDPOINT_URL_S3``, so an endpoint is passed as ``endpoint_override``; the
    driver's keys travel with the filesystem to Ray workers whose environment lacks them.
    """
    if not endpoint_url:
        return None
    endpoint = urlparse(endpoint_url)
    keys = {}
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        keys = {
            "access_key": os.environ["AWS_ACCESS_KEY_ID"],
            "secret_key": os.environ["AWS_SECRET_ACCESS_KEY"],
            "session_token": os.environ.get("AWS_SESSION_TOKEN"),
        }
    return pafs.S3FileSystem(
        endpoint_override=endpoint.netloc,
        scheme=endpoint.scheme or "https",
        region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        **keys,
    )
