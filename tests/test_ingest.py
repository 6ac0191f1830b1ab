"""Ingesting images into the canonical layout: validation, quarantine, labels, incremental adds."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_models.data import FASHION_MNIST_CLASSES, DataError, read_idx
from tasks.ingest import ImageRules, folder_items, idx_items, ingest


def write_png(path: Path, seed: int, size: int = 28, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size) if mode == "L" else (size, size, 3))
    Image.fromarray(pixels.astype(np.uint8), mode).save(path)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_folder_ingest_quarantines_bad_files_with_the_reason(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(5):
        write_png(src / f"img{i}.png", seed=i)
    write_png(src / "copy_of_0.png", seed=0)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    write_png(src / "tiny.png", seed=9, size=4)
    report = ingest(
        folder_items(src, "unlabeled"), "unlabeled", tmp_path / "data", tmp_path / "q", source=str(src)
    )
    assert (report.added, report.duplicates_in_source, report.total) == (5, 1, 5)
    reasons = dict(report.quarantined)
    assert set(reasons) == {str(src / "broken.png"), str(src / "tiny.png")}
    assert "cannot decode image" in reasons[str(src / "broken.png")]
    assert "size 4x4 outside 8-4096" in reasons[str(src / "tiny.png")]
    assert len(list((tmp_path / "data").glob("*.png"))) == 5
    assert (tmp_path / "q" / f"{str(src / 'broken.png').replace('/', '__')}.reason.txt").exists()


def test_ingest_is_content_addressed_and_incremental(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for i in range(4):
        write_png(first / f"a{i}.png", seed=i)
    for i in range(2, 7):  # two images already ingested, under other names
        write_png(second / f"b{i}.png", seed=i)
    dest = tmp_path / "data"
    ingest(folder_items(first, "unlabeled"), "unlabeled", dest, tmp_path / "q")
    before = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    report = ingest(folder_items(second, "unlabeled"), "unlabeled", dest, tmp_path / "q")
    assert (report.added, report.already_present, report.total) == (3, 2, 7)
    after = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    assert {name: after[name] for name in before} == before  # nothing rewritten


def test_rgb_images_are_converted_to_the_dataset_mode(tmp_path: Path) -> None:
    write_png(tmp_path / "src" / "rgb.png", seed=1, mode="RGB")
    ingest(
        folder_items(tmp_path / "src", "unlabeled"),
        "unlabeled",
        tmp_path / "d",
        tmp_path / "q",
        ImageRules(1),
    )
    (stored,) = (tmp_path / "d").glob("*.png")
    assert Image.open(stored).mode == "L"


def test_labeled_folder_keeps_classes_and_rejects_an_image_under_two_classes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_png(src / "cat" / "1.png", seed=1)
    write_png(src / "dog" / "2.png", seed=2)
    dest = tmp_path / "data"
    report = ingest(folder_items(src, "labeled"), "labeled", dest, tmp_path / "q")
    assert report.classes == ["cat", "dog"] and report.total == 2

    conflicting = tmp_path / "conflict"
    write_png(conflicting / "dog" / "same_as_cat.png", seed=1)
    write_png(conflicting / "dog" / "new.png", seed=3)
    before = tree(dest)
    with pytest.raises(DataError, match="already in the dataset as class 'cat'"):
        ingest(folder_items(conflicting, "labeled"), "labeled", dest, tmp_path / "q")
    assert tree(dest) == before  # nothing written

    unknown = tmp_path / "unknown"
    write_png(unknown / "bird" / "b.png", seed=4)
    with pytest.raises(DataError, match="class 'bird' is not one of the dataset's classes"):
        ingest(folder_items(unknown, "labeled"), "labeled", dest, tmp_path / "q", source=str(unknown))
    assert tree(dest) == before


def test_idx_pair_with_a_wrong_labels_file_fails_naming_it_and_writes_nothing(
    fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    images = tmp_path / "images-idx3-ubyte"
    labels = tmp_path / "labels-idx1-ubyte"
    pixels = read_idx(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz")[:50]
    truth = read_idx(fashion_mnist_dir / "t10k-labels-idx1-ubyte.gz")[:50]
    images.write_bytes(
        bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in pixels.shape) + pixels.tobytes()
    )
    short = truth[:40]
    labels.write_bytes(bytes([0, 0, 8, 1]) + len(short).to_bytes(4, "big") + short.tobytes())
    dest = tmp_path / "data"
    with pytest.raises(DataError, match=f"{labels}: 40 labels for 50 images"):
        ingest(idx_items(images, labels), "labeled", dest, tmp_path / "q")
    assert not dest.exists()

    labels.write_bytes(bytes([0, 0, 8, 1]) + len(truth).to_bytes(4, "big") + truth.tobytes())
    report = ingest(idx_items(images, labels), "labeled", dest, tmp_path / "q")
    assert report.added + report.duplicates_in_source == 50 and not report.quarantined
    stored = sorted(dest.glob("*/*.png"))
    assert len(stored) == report.total == report.added
    assert {p.parent.name for p in stored} == {FASHION_MNIST_CLASSES[i].replace("/", "_") for i in truth}
