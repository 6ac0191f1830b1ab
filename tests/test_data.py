import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_models.data import (
    DataError,
    load_fashion_mnist,
    load_idx_pair,
    read_idx,
    stratified_subset,
)


def test_fashion_mnist_loads_from_debian_files(fashion_mnist_dir: Path) -> None:
    train, test = load_fashion_mnist(fashion_mnist_dir)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert train.classes[9] == "Ankle boot"


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def test_truncated_idx_names_the_file(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "images.gz", np.zeros((10, 4, 4)))
    raw = gzip.decompress(path.read_bytes())[:-7]
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(DataError, match=rf"{path}: IDX header says \(10, 4, 4\)"):
        read_idx(path)


def test_corrupt_gzip_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "labels.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=f"{path}: cannot read IDX"):
        read_idx(path)


def test_wrong_labels_file_is_named(tmp_path: Path) -> None:
    images = write_idx(tmp_path / "images.gz", np.zeros((10, 4, 4)))
    short = write_idx(tmp_path / "short-labels.gz", np.zeros(9))
    with pytest.raises(DataError, match=f"{short}: 9 labels for 10 images"):
        load_idx_pair(images, short)
    swapped = write_idx(tmp_path / "labels-as-images.gz", np.zeros((10, 4, 4)))
    with pytest.raises(DataError, match=f"{swapped}: expected labels of shape"):
        load_idx_pair(images, swapped)
    out_of_range = write_idx(tmp_path / "bad-labels.gz", np.full(10, 12))
    with pytest.raises(DataError, match=f"{out_of_range}: label 12 outside"):
        load_idx_pair(images, out_of_range)


def save_png(path: Path, value: int, size: int = 28) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path)


def test_stratified_subset_is_stratified_seeded_and_in_range(fashion_mnist_dir: Path) -> None:
    train, _ = load_fashion_mnist(fashion_mnist_dir)
    idx = stratified_subset(train.labels, 0.01, seed=0)
    assert len(idx) == 600 and len(idx.unique()) == 600
    assert torch.bincount(train.labels[idx]).tolist() == [60] * 10
    assert torch.equal(idx, stratified_subset(train.labels, 0.01, seed=0))
    assert not torch.equal(idx, stratified_subset(train.labels, 0.01, seed=1))
    assert len(stratified_subset(train.labels, 1.0, seed=0)) == 60000
    tiny = stratified_subset(torch.tensor([0, 0, 0, 1]), 0.01, seed=0)
    assert sorted(torch.tensor([0, 0, 0, 1])[tiny].tolist()) == [0, 1]  # at least one per class


def test_label_fraction_must_be_a_fraction() -> None:
    with pytest.raises(ValueError, match="label fraction"):
        stratified_subset(torch.tensor([0, 1]), 0.0, seed=0)


def test_copies_of_the_debian_files_load_unzipped_too(fashion_mnist_dir: Path, tmp_path: Path) -> None:
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(fashion_mnist_dir / f"{name}.gz") as src, open(tmp_path / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    data = load_idx_pair(tmp_path / "t10k-images-idx3-ubyte", tmp_path / "t10k-labels-idx1-ubyte")
    assert len(data) == 10000


def test_label_splits_are_disjoint_from_the_test_set(fashion_mnist_dir: Path) -> None:
    train, test = load_fashion_mnist(fashion_mnist_dir)
    test_images = {image.numpy().tobytes() for image in test.images}
    for fraction in (0.01, 0.1):
        idx = stratified_subset(train.labels, fraction, seed=0)
        assert int(idx.max()) < len(train)
        assert not any(train.images[i].numpy().tobytes() in test_images for i in idx.tolist())
