"""Read images from an S3 prefix (AWS or any S3-compatible store) with boto3.

Credentials and the endpoint come from the environment as for every AWS tool
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``) or from arguments;
they are never written anywhere by this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from ssl_models.data import IMAGE_SUFFIXES, DataError
from tasks.ingest import Kind, SourceItem


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` to (bucket, prefix)."""
    if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
        raise DataError(f"{url}: expected s3://bucket/prefix")
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix


def client(endpoint_url: str | None = None, **kwargs: Any) -> Any:
    config = Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=32)
    return boto3.client("s3", endpoint_url=endpoint_url, config=config, **kwargs)


def list_images(url: str, s3: Any) -> list[str]:
    """Keys of the image files under the prefix, every page of the listing."""
    bucket, prefix = parse_url(url)
    keys: list[str] = []
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", []) if _is_image(o["Key"])]
    except (BotoCoreError, ClientError) as e:
        raise DataError(f"{url}: cannot list ({e})") from e
    if not keys:
        raise DataError(f"{url}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return sorted(keys)


def _is_image(key: str) -> bool:
    return any(key.lower().endswith(suffix) for suffix in IMAGE_SUFFIXES)


def reader(url: str, key: str, s3: Any) -> Callable[[], bytes]:
    """A function that downloads one object; errors name the object."""
    bucket, _ = parse_url(url)

    def read() -> bytes:
        try:
            body: bytes = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            return body
        except (BotoCoreError, ClientError) as e:
            raise DataError(f"s3://{bucket}/{key}: cannot download ({e})") from e

    return read


def s3_items(url: str, kind: Kind, s3: Any) -> list[SourceItem]:
    """The images under an S3 prefix as ingest items; for ``labeled``, the class is the first
    path component below the prefix. Objects are downloaded when ingest reads them (in parallel)."""
    bucket, prefix = parse_url(url)
    base = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    items = []
    for key in list_images(url, s3):
        relative = key[len(base) :] if key.startswith(base) else key[len(prefix) :].lstrip("/")
        parts = relative.split("/")
        if kind == "labeled" and len(parts) < 2:
            raise DataError(f"s3://{bucket}/{key}: labeled data holds images in one folder per class")
        items.append(
            SourceItem(f"s3://{bucket}/{key}", reader(url, key, s3), parts[0] if kind == "labeled" else None)
        )
    return items
