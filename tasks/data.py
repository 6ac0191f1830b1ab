"""Prepare the datasets a run uses: read, validate, content-hash and store them in the workspace.

Each dataset is identified by the SHA-256 of its decoded content (images, labels, class
names), so the same images give the same hash wherever they came from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ssl_models.data import DataError, ImageSet, load_fashion_mnist, load_image_folder
from tasks.config import PipelineConfig


@dataclass(frozen=True)
class DatasetRef:
    name: str  # unlabeled | labeled | test
    path: str
    digest: str
    num_images: int
    classes: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class PreparedData:
    unlabeled: DatasetRef
    labeled: DatasetRef
    test: DatasetRef
    mean: float
    std: float

    def digests(self) -> dict[str, str]:
        return {ref.name: ref.digest for ref in (self.unlabeled, self.labeled, self.test)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreparedData:
        """The inverse of ``dataclasses.asdict`` after a JSON round trip."""

        def ref(r: dict[str, Any]) -> DatasetRef:
            skipped = tuple((str(f), str(why)) for f, why in r["skipped"])
            return DatasetRef(**{**r, "classes": tuple(r["classes"]), "skipped": skipped})

        return cls(ref(d["unlabeled"]), ref(d["labeled"]), ref(d["test"]), d["mean"], d["std"])


def content_digest(images: ImageSet) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([list(images.images.shape), list(images.classes)]).encode())
    h.update(images.images.contiguous().numpy().tobytes())
    if images.labels is not None:
        h.update(images.labels.numpy().tobytes())
    return h.hexdigest()


def _store(name: str, images: ImageSet, folder: Path) -> DatasetRef:
    digest = content_digest(images)
    path = folder / f"{name}-{digest[:16]}.pt"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        payload = {"images": images.images}
        if images.labels is not None:
            payload["labels"] = images.labels
        torch.save(payload, tmp)
        tmp.replace(path)
    return DatasetRef(name, str(path), digest, len(images), images.classes, tuple(images.skipped))


def load_dataset(ref: DatasetRef) -> ImageSet:
    """The images (and labels) a ``DatasetRef`` points at."""
    payload = torch.load(ref.path, map_location="cpu", weights_only=True)
    return ImageSet(images=payload["images"], labels=payload.get("labels"), classes=ref.classes)


def _head(images: ImageSet, limit: int | None) -> ImageSet:
    if limit is None or limit >= len(images):
        return images
    labels = images.labels[:limit] if images.labels is not None else None
    return ImageSet(images.images[:limit], labels, images.classes, images.skipped)


def read_sources(cfg: PipelineConfig) -> tuple[ImageSet, ImageSet, ImageSet]:
    """(unlabeled, labeled, test) as configured, before any limit is applied."""
    d = cfg.data
    if d.source == "fashion_mnist":
        train, test = load_fashion_mnist(d.fashion_mnist_dir)
        # The standard SSL protocol: the training images without labels are the unlabeled pool.
        return ImageSet(train.images), train, test
    kwargs = {"channels": d.channels, "image_size": d.image_size, "skip_corrupt": d.skip_corrupt}
    unlabeled = load_image_folder(d.unlabeled_dir, labeled=False, **kwargs)  # type: ignore[arg-type]
    labeled = load_image_folder(d.labeled_dir, labeled=True, **kwargs)  # type: ignore[arg-type]
    test = load_image_folder(d.test_dir, labeled=True, **kwargs)  # type: ignore[arg-type]
    if test.classes != labeled.classes:
        raise DataError(
            f"{d.test_dir}: classes {list(test.classes)} differ from {d.labeled_dir}: {list(labeled.classes)}"
        )
    return unlabeled, labeled, test


def prepare_data(cfg: PipelineConfig) -> PreparedData:
    unlabeled, labeled, test = read_sources(cfg)
    d = cfg.data
    unlabeled = _head(unlabeled, d.unlabeled_limit)
    labeled = _head(labeled, d.labeled_limit)
    test = _head(test, d.test_limit)
    for name, images in (("unlabeled", unlabeled), ("labeled", labeled), ("test", test)):
        if images.images.shape[1] != d.channels:
            raise DataError(
                f"{name} images have {images.images.shape[1]} channels, data.channels is {d.channels}"
            )
    pixels = unlabeled.images.float().div_(255)
    folder = cfg.workspace_path / "data"
    return PreparedData(
        unlabeled=_store("unlabeled", unlabeled, folder),
        labeled=_store("labeled", labeled, folder),
        test=_store("test", test, folder),
        mean=pixels.mean().item(),
        std=pixels.std().item(),
    )
