"""Prepare the datasets a run uses: read, validate, content-hash and store them in the workspace.

Each dataset is identified by the SHA-256 of its decoded content (images, labels, class
names), so the same images give the same hash wherever they came from. With
``data.dvc.enabled`` the configured sources are first ingested into the dataset folders that
DVC versions (``ingest_sources``), and the run reads those folders, so what it trained on is
exactly a DVC version (``DatasetRef.dvc_md5``).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl_models.data import DataError, ImageSet, load_fashion_mnist, load_image_folder
from tasks.config import PipelineConfig
from tasks.ingest import ImageRules, IngestReport, SourceItem, class_folder, ingest

DATASETS = ("unlabeled", "labeled", "test")


@dataclass(frozen=True)
class DatasetRef:
    name: str  # unlabeled | labeled | test
    path: str
    digest: str
    num_images: int
    classes: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    dvc_md5: str | None = None  # the DVC version of the dataset folder it was read from


@dataclass(frozen=True)
class PreparedData:
    unlabeled: DatasetRef
    labeled: DatasetRef
    test: DatasetRef
    mean: float
    std: float

    def refs(self) -> tuple[DatasetRef, DatasetRef, DatasetRef]:
        return self.unlabeled, self.labeled, self.test

    def digests(self) -> dict[str, str]:
        return {ref.name: ref.digest for ref in self.refs()}

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


def _store(name: str, images: ImageSet, folder: Path, dvc_md5: str | None = None) -> DatasetRef:
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
    return DatasetRef(name, str(path), digest, len(images), images.classes, tuple(images.skipped), dvc_md5)


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


def dataset_folders(cfg: PipelineConfig) -> dict[str, Path]:
    """The DVC-tracked folder of each dataset, relative to ``data.dvc.root``."""
    return {name: Path(cfg.data.dvc.folder) / name for name in DATASETS}


def _items(images: ImageSet, name: str) -> list[SourceItem]:
    pixels = images.images.permute(0, 2, 3, 1).numpy()
    if pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    labels: list[int | None] = images.labels.tolist() if images.labels is not None else [None] * len(images)
    return [
        SourceItem(
            f"{name}[{i}]",
            functools.partial(np.asarray, array),
            None if label is None else class_folder(images.classes[label]),
        )
        for i, (array, label) in enumerate(zip(pixels, labels, strict=True))
    ]


def ingest_sources(cfg: PipelineConfig) -> dict[str, IngestReport]:
    """Add the configured sources' images (after the limits) to the DVC-tracked dataset folders."""
    unlabeled, labeled, test = _limited(cfg, *read_sources(cfg))
    root = Path(cfg.data.dvc.root)
    rules = ImageRules(channels=cfg.data.channels, min_side=1, max_side=1 << 16)  # read_sources checked them
    reports = {}
    for (name, folder), images in zip(dataset_folders(cfg).items(), (unlabeled, labeled, test), strict=True):
        reports[name] = ingest(
            _items(images, name),
            "unlabeled" if name == "unlabeled" else "labeled",
            root / folder,
            cfg.workspace_path / "quarantine" / name,
            rules,
            allow_new_classes=True,
            source=cfg.data.source,
        )
    return reports


def _limited(cfg: PipelineConfig, *sets: ImageSet) -> list[ImageSet]:
    d = cfg.data
    return [
        _head(s, limit)
        for s, limit in zip(sets, (d.unlabeled_limit, d.labeled_limit, d.test_limit), strict=True)
    ]


def _read_folders(cfg: PipelineConfig) -> tuple[ImageSet, ImageSet, ImageSet]:
    d = cfg.data
    root = Path(d.dvc.root)
    folders = {name: root / folder for name, folder in dataset_folders(cfg).items()}
    kwargs = {"channels": d.channels, "image_size": d.image_size}
    unlabeled = load_image_folder(folders["unlabeled"], labeled=False, **kwargs)  # type: ignore[arg-type]
    labeled = load_image_folder(folders["labeled"], labeled=True, **kwargs)  # type: ignore[arg-type]
    test = load_image_folder(folders["test"], labeled=True, classes=labeled.classes, **kwargs)  # type: ignore[arg-type]
    return unlabeled, labeled, test


def prepare_data(cfg: PipelineConfig, dvc_versions: dict[str, str] | None = None) -> PreparedData:
    """The run's datasets as stored tensors: from the DVC-tracked folders when ``dvc_versions``
    (dataset name -> DVC hash) is given, else straight from the configured sources."""
    raw = _read_folders(cfg) if dvc_versions is not None else read_sources(cfg)
    unlabeled, labeled, test = _limited(cfg, *raw)
    d = cfg.data
    for name, images in (("unlabeled", unlabeled), ("labeled", labeled), ("test", test)):
        if images.images.shape[1] != d.channels:
            raise DataError(
                f"{name} images have {images.images.shape[1]} channels, data.channels is {d.channels}"
            )
    pixels = unlabeled.images.float().div_(255)
    folder = cfg.workspace_path / "data"
    versions = dvc_versions or {}
    return PreparedData(
        unlabeled=_store("unlabeled", unlabeled, folder, versions.get("unlabeled")),
        labeled=_store("labeled", labeled, folder, versions.get("labeled")),
        test=_store("test", test, folder, versions.get("test")),
        mean=pixels.mean().item(),
        std=pixels.std().item(),
    )
