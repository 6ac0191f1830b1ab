"""Watch a folder or an S3 prefix for new unlabeled images: what triggered retraining polls.

A ``Watch`` counts the image files at the location and remembers, in a small JSON file in the
workspace, how many there were when it last reported new ones; ``poll()`` answers how many
arrived since, once at least ``min_new`` have. The first poll only records the count: images
already there when watching starts do not start a run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ssl_models.data import IMAGE_SUFFIXES
from tasks import s3


def count_images(location: str, endpoint_url: str | None = None) -> int:
    """Image files below a folder, or objects under ``s3://bucket/prefix`` (0 when there are none)."""
    if location.startswith("s3://"):
        bucket, prefix = s3.parse_url(location)
        client = s3.client(endpoint_url)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sum(
            1
            for page in pages
            for item in page.get("Contents", [])
            if Path(item["Key"]).suffix.lower() in IMAGE_SUFFIXES
        )
    root = Path(location)
    if not root.is_dir():
        raise FileNotFoundError(f"{location}: the watched folder (orchestration.watch) does not exist")
    return sum(1 for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


@dataclass(frozen=True)
class Arrival:
    location: str
    new_images: int
    images: int


class Watch:
    def __init__(self, location: str, state_dir: Path, min_new: int, endpoint_url: str | None = None):
        self.location = location
        self.endpoint_url = endpoint_url
        self.min_new = min_new
        name = hashlib.sha256(location.encode()).hexdigest()[:12]
        self.state_path = state_dir / f"watch-{name}.json"

    def _baseline(self) -> int | None:
        try:
            return int(json.loads(self.state_path.read_text())["images"])
        except FileNotFoundError:
            return None

    def _record(self, images: int) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"location": self.location, "images": images}) + "\n")
        os.replace(tmp, self.state_path)

    def poll(self) -> Arrival | None:
        """New images since the last report, once there are at least ``min_new`` of them."""
        images = count_images(self.location, self.endpoint_url)
        baseline = self._baseline()
        if baseline is None or images < baseline:  # first look, or images were removed: start over
            self._record(images)
            return None
        if images - baseline < self.min_new:
            return None
        self._record(images)
        return Arrival(self.location, images - baseline, images)
