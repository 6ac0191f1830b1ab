"""Image datasets as in-memory uint8 tensors (N, C, H, W), and Fashion-MNIST's IDX files."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class DataError(ValueError):
    """A dataset file is missing, corrupt or inconsistent; the message names the file."""


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor | None = None  # int64 (N,)
    classes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.images.shape[0]


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes, checking its header."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read IDX file ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise DataError(f"{path}: IDX data type 0x{raw[2]:02x} is not unsigned byte (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(f"{path}: IDX header says {shape} ({expected} bytes), file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_idx_pair(images_path: str | Path, labels_path: str | Path) -> ImageSet:
    """An IDX image file (N, H, W) and its label file (N,), checked against each other."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected images of shape (N, H, W), got {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected labels of shape (N,), got {labels.shape}")
    if len(labels) != len(images):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")
    if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{labels_path}: label {labels.max()} outside 0-9")
    return ImageSet(
        images=torch.from_numpy(images.copy()).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=FASHION_MNIST_CLASSES,
    )


def idx_file(root: Path, stem: str) -> Path:
    """``root/stem.gz`` or ``root/stem``: Debian ships the files gzipped."""
    for name in (f"{stem}.gz", stem):
        if (root / name).exists():
            return root / name
    raise DataError(f"{root / stem}[.gz]: file not found (apt-get install dataset-fashion-mnist)")


def load_fashion_mnist(root: str | Path) -> tuple[ImageSet, ImageSet]:
    """Fashion-MNIST (train, test) from the four IDX files in ``root``; nothing is downloaded."""
    root = Path(root)
    train = load_idx_pair(
        idx_file(root, "train-images-idx3-ubyte"), idx_file(root, "train-labels-idx1-ubyte")
    )
    test = load_idx_pair(idx_file(root, "t10k-images-idx3-ubyte"), idx_file(root, "t10k-labels-idx1-ubyte"))
    return train, test


def stratified_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded, class-stratified ``fraction`` of ``labels`` (>= 1 per class)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    return _each_class(labels, seed, lambda members: max(1, round(fraction * members)))


def per_class_subset(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``count`` seeded images of each class of ``labels`` (every one of a class
    with fewer). With the same seed it is nested with ``stratified_subset``'s draws."""
    if count < 1:
        raise ValueError(f"labels per class must be at least 1, got {count}")
    return _each_class(labels, seed, lambda members: min(count, members))


def _each_class(labels: torch.Tensor, seed: int, size: Callable[[int], int]) -> torch.Tensor:
    """The first ``size(n)`` of a seeded permutation of each class's ``n`` members, sorted."""
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=g)[: size(len(members))]])
    return torch.cat(chosen).sort().values
