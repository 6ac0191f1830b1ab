"""Ingesting images into a dataset folder of shards: validation, quarantine, labels, dedup, tables,
appends that never rewrite a file, and memory bounded whatever the size of the source."""

import csv
import io
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bench.photos import write_photo_folder
from ssl_models.data import DataError, read_idx
from tasks.ingest import ImageRules, IngestLimits, ingest
from tasks.shards import KnownImages, read_manifest, remove_uncommitted, summarize
from tasks.sources import first_images, folder_items, idx_items, list_source, source_items, table_items


def write_png(path: Path, seed: int, size: int = 28, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size) if mode == "L" else (size, size, 3))
    Image.fromarray(pixels.astype(np.uint8), mode).save(path)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def stored_bytes(folder: Path) -> list[bytes]:
    return [
        b
        for shard in sorted((folder / "shards").glob("*.parquet"))
        for b in pq.read_table(shard)["image"].to_pylist()
    ]


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels (and holds almost none)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def test_files_the_image_library_refuses_are_quarantined_with_a_plain_reason(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_png(src / "ok.png", seed=1)
    (src / "bomb.png").write_bytes(png_claiming(60_000, 60_000))  # PIL's decompression-bomb check
    (src / "notes.png").write_text("not an image at all")
    report = ingest(folder_items(src, "unlabeled"), "unlabeled", tmp_path / "data", quarantine=tmp_path / "q")
    assert (report.added, report.num_quarantined) == (1, 2)
    reasons = dict(report.quarantined)
    assert (
        "PIL refuses it for safety (Image size (3600000000 pixels) exceeds limit"
        in reasons[str(src / "bomb.png")]
    )
    assert (
        reasons[str(src / "notes.png")] == "cannot decode image: its bytes are in no image format PIL reads"
    )


def test_every_entry_of_a_folder_is_read_or_skipped_with_a_reason(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_png(src / "a.png", seed=1)
    write_png(src / "sub" / "b.png", seed=2)
    (src / "README.txt").write_text("about these scans")
    (src / ".DS_Store").write_bytes(b"\0")
    (src / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (src / "sub" / "loop").symlink_to(src)  # a link to a folder above it: not followed, no loop
    (src / "linked.png").symlink_to(src / "a.png")  # a link to a file is read (a duplicate here)
    os.mkfifo(src / "pipe.png")  # reading it would block for ever
    report = ingest(folder_items(src, "unlabeled"), "unlabeled", tmp_path / "data", quarantine=tmp_path / "q")
    assert (report.added, report.duplicates_in_source, report.num_quarantined) == (2, 1, 0)
    assert report.skipped == {
        "not an image file name (.txt)": 1,
        "not an image file name (no suffix)": 1,
        "a broken link": 1,
        "a link to a folder (not followed)": 1,
        "not a regular file": 1,
    }
    assert dict(report.skipped_files)[str(src / "sub" / "loop")] == "a link to a folder (not followed)"
    listing = list_source(folder_items(src, "unlabeled"))
    assert (listing.count, listing.bytes) == (
        3,
        sum((src / n).stat().st_size for n in ("a.png", "sub/b.png", "linked.png")),
    )
    # A limit counts images, not the entries skipped on the way.
    assert [i.name for i in first_images(folder_items(src, "unlabeled"), 1) if not i.skipped] == [
        str(src / "a.png")
    ]


def test_folder_ingest_keeps_the_original_bytes_and_quarantines_bad_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(5):
        write_png(src / f"img{i}.png", seed=i)
    write_png(src / "z_copy_of_0.png", seed=0)  # after img0.png: the duplicate
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    write_png(src / "tiny.png", seed=9, size=4)
    report = ingest(folder_items(src, "unlabeled"), "unlabeled", tmp_path / "data", quarantine=tmp_path / "q")
    assert (report.added, report.duplicates_in_source, report.total, report.num_quarantined) == (5, 1, 5, 2)
    reasons = dict(report.quarantined)
    assert "cannot decode image" in reasons[str(src / "broken.png")]
    assert "size 4x4 outside 8-8192" in reasons[str(src / "tiny.png")]
    assert (tmp_path / "q" / f"{str(src / 'broken.png').replace('/', '__')}.reason.txt").exists()
    # One folder: shards of the files' own bytes (never re-encoded), the manifest, the ingest's record.
    assert sorted(stored_bytes(tmp_path / "data")) == sorted(
        (src / f"img{i}.png").read_bytes() for i in range(5)
    )
    assert {p.parent.name for p in (tmp_path / "data").rglob("*.*")} == {
        "data",
        "shards",
        "manifest",
        "ingests",
    }
    manifest = read_manifest(tmp_path / "data").to_pylist()
    assert {(row["source"], row["size"], row["width"]) for row in manifest} == {
        (str(src / f"img{i}.png"), (src / f"img{i}.png").stat().st_size, 28) for i in range(5)
    }


def test_a_bad_image_fails_the_ingest_naming_it_and_writes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(3):
        write_png(src / f"img{i}.png", seed=i)
    ingest(folder_items(src, "unlabeled"), "unlabeled", tmp_path / "data")
    before = tree(tmp_path / "data")
    write_png(src / "new.png", seed=7)
    (src / "z_truncated.png").write_bytes((src / "img0.png").read_bytes()[:60])
    with pytest.raises(DataError, match=r"z_truncated\.png: cannot decode image"):
        ingest(folder_items(src, "unlabeled"), "unlabeled", tmp_path / "data", on_bad="fail")
    assert tree(tmp_path / "data") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "src"]  # no staging left behind


def test_what_an_uncommitted_ingest_left_is_removed_and_committed_files_stay(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(3):
        write_png(src / f"img{i}.png", seed=i)
    ingest(folder_items(src, "unlabeled"), "unlabeled", tmp_path / "data")
    committed = tree(tmp_path / "data")
    data = tmp_path / "data"
    (data / "shards" / "00002-0000.parquet").write_bytes(b"half a shard")
    (data / "ingests" / "00002.json").write_text("{}")
    (tmp_path / ".data.ingest-2").mkdir()
    assert remove_uncommitted(data) == ["ingests/00002.json", "shards/00002-0000.parquet"]
    assert tree(data) == committed
    assert not (tmp_path / ".data.ingest-2").exists()


def test_dedup_within_and_across_ingests_appends_new_shards_and_rewrites_none(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for i in range(4):
        write_png(first / f"a{i}.png", seed=i)
    for i in range(2, 7):  # two images already ingested, under other names
        write_png(second / f"b{i}.png", seed=i)
    dest = tmp_path / "data"
    ingest(folder_items(first, "unlabeled"), "unlabeled", dest)
    before = tree(dest)
    report = ingest(folder_items(second, "unlabeled"), "unlabeled", dest)
    assert (report.added, report.already_present, report.total) == (3, 2, 7)
    after = tree(dest)
    assert {name: after[name] for name in before} == before  # nothing rewritten
    assert sorted(set(after) - set(before)) == [
        "ingests/00002.json",
        "manifest/00002.parquet",
        "shards/00002-0000.parquet",
    ]
    assert summarize(dest).num_images == 7
    assert ingest(folder_items(second, "unlabeled"), "unlabeled", dest).added == 0
    assert tree(dest) == after  # an ingest that adds nothing writes nothing


def test_images_are_spread_over_shards_by_id_and_the_digest_ignores_order(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_photo_folder(src, 300, classes=3)
    items = list(folder_items(src, "labeled"))
    size = list_source(iter(items)).bytes
    limits = IngestLimits(shard_mb=size / 3.9 / 2**20)  # four shards
    ingest(iter(items), "labeled", tmp_path / "a", ImageRules(3), limits=limits, expected_bytes=size)
    shards = sorted((tmp_path / "a" / "shards").glob("*.parquet"))
    assert len(shards) == 4
    for shard in shards:  # every shard a sample of every class, though the source is sorted by class
        assert set(pq.read_table(shard, columns=["label"])["label"].to_pylist()) == {
            "class_0000",
            "class_0001",
            "class_0002",
        }
    ingest(reversed(items), "labeled", tmp_path / "b", ImageRules(3))
    a, b = summarize(tmp_path / "a"), summarize(tmp_path / "b")
    assert a.digest == b.digest and a.bytes == b.bytes == size
    assert (a.mean, a.std) == pytest.approx((b.mean, b.std))
    assert 0.2 < a.mean < 0.8 and 0.1 < a.std < 0.45


def test_rgb_images_enter_a_grayscale_dataset_checked_in_its_mode(tmp_path: Path) -> None:
    write_png(tmp_path / "src" / "rgb.png", seed=1, mode="RGB")
    ingest(folder_items(tmp_path / "src", "unlabeled"), "unlabeled", tmp_path / "d", ImageRules(1))
    assert summarize(tmp_path / "d").mode == "L"
    with pytest.raises(DataError, match="the dataset holds L images; this ingest converts to RGB"):
        ingest(folder_items(tmp_path / "src", "unlabeled"), "unlabeled", tmp_path / "d", ImageRules(3))


def test_labeled_folder_keeps_classes_and_rejects_an_image_under_two_classes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_png(src / "cat" / "1.png", seed=1)
    write_png(src / "dog" / "nested" / "2.png", seed=2)
    dest = tmp_path / "data"
    report = ingest(folder_items(src, "labeled"), "labeled", dest)
    assert report.classes == ["cat", "dog"] and report.total == 2

    conflicting = tmp_path / "conflict"
    write_png(conflicting / "dog" / "new.png", seed=3)
    write_png(conflicting / "dog" / "same_as_cat.png", seed=1)
    before = tree(dest)
    with pytest.raises(DataError, match="already in the dataset as class 'cat'"):
        ingest(folder_items(conflicting, "labeled"), "labeled", dest)
    assert tree(dest) == before  # nothing written, not even the new image before it

    unknown = tmp_path / "unknown"
    write_png(unknown / "bird" / "b.png", seed=4)
    with pytest.raises(DataError, match="class 'bird' is not one of the dataset's classes"):
        ingest(folder_items(unknown, "labeled"), "labeled", dest)
    assert tree(dest) == before


def test_a_label_table_reads_paths_under_its_root_and_refuses_a_row_outside_it(tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_png(root / "scans" / "a.png", seed=1)
    write_png(root / "scans" / "b.png", seed=2)
    write_png(tmp_path / "secret.png", seed=3)
    table = root / "labels.csv"
    rows = [("scans/a.png", "healthy"), (str(root / "scans" / "b.png"), "sick")]
    with table.open("w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    report = ingest(source_items(str(table), "labeled"), "labeled", tmp_path / "data")
    assert (report.added, report.classes) == (2, ["healthy", "sick"])

    with table.open("w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows, ("../secret.png", "sick")])
    with pytest.raises(
        DataError, match=rf"{table}: row 3: '../secret.png' points outside the source root {root}"
    ):
        list(table_items(table, "labeled"))
    (root / "escape.png").symlink_to(tmp_path / "secret.png")
    pq.write_table(
        pa.table({"path": ["scans/a.png", "escape.png"], "label": ["healthy", "sick"]}),
        root / "labels.parquet",
    )
    with pytest.raises(DataError, match=r"row 2: 'escape.png' points outside the source root"):
        list(table_items(root / "labels.parquet", "labeled"))


def test_one_table_with_a_split_column_serves_each_dataset_its_rows(tmp_path: Path) -> None:
    root = tmp_path / "images"
    rows = [("path", "label", "split")]
    for i, split in enumerate(["labeled", "labeled", "test", "unlabeled"]):
        write_png(root / f"{i}.png", seed=i)
        rows.append((f"{i}.png", "" if split == "unlabeled" else f"class_{i % 2}", split))
    table = root / "labels.csv"
    with table.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    names = {
        split: [Path(item.name).name for item in source_items(str(table), kind, split=split)]
        for split, kind in (("labeled", "labeled"), ("test", "labeled"), ("unlabeled", "unlabeled"))
    }
    assert names == {"labeled": ["0.png", "1.png"], "test": ["2.png"], "unlabeled": ["3.png"]}

    with table.open("a", newline="") as f:
        csv.writer(f).writerow(("0.png", "class_1", "labeled"))
    with pytest.raises(DataError, match=rf"{table}: row 5: '0.png' is listed again \(first at row 1\)"):
        list(source_items(str(table), "labeled", split="labeled"))
    with table.open("a", newline="") as f:
        csv.writer(f).writerow(("1.png", "class_1", "validation"))
    with pytest.raises(DataError, match=r"row 6: split 'validation' is none of unlabeled, labeled, test"):
        list(source_items(str(table), "unlabeled", split="unlabeled"))


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
        ingest(idx_items(images, labels), "labeled", dest)
    assert not dest.exists()

    labels.write_bytes(bytes([0, 0, 8, 1]) + len(truth).to_bytes(4, "big") + truth.tobytes())
    report = ingest(idx_items(images, labels), "labeled", dest)
    assert report.added + report.duplicates_in_source == 50 and not report.quarantined
    stored = read_manifest(dest).to_pylist()
    assert len(stored) == report.total == report.added
    first = next(row for row in stored if row["source"] == f"{images}[0]")
    png = Image.open(io.BytesIO(stored_bytes(dest)[[r["source"] for r in stored].index(f"{images}[0]")]))
    assert first["label"] == "Ankle boot" and np.array_equal(np.asarray(png), pixels[0])


def test_ingest_memory_stays_bounded_on_a_source_larger_than_the_cap(tmp_path: Path) -> None:
    """10,000 real JPEG photos (about 110 MB) through a 16 MB cap: the process grows by a bounded
    amount, far less than the source (holding it would add 110 MB)."""
    src = tmp_path / "photos"
    source_bytes = write_photo_folder(src, 10_000)
    assert source_bytes > 6 * 16 * 2**20
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        report = ingest(
            folder_items(src, "unlabeled"),
            "unlabeled",
            tmp_path / "data",
            ImageRules(3),
            limits=IngestLimits(shard_mb=16, memory_mb=16),
            expected_bytes=source_bytes,
        )
    finally:
        done.set()
        sampler.join()
    assert report.added == 10_000 and report.bytes_written == source_bytes
    growth = (peak[0] - baseline) / 2**20
    assert growth < 60, f"the ingest grew the process by {growth:.0f} MB for a 16 MB cap"


def test_known_ids_ending_in_zero_bytes_are_found() -> None:
    """numpy's fixed-width bytes drop trailing zero bytes; one id in 256 ends in one."""
    ids = [b"a" * 31 + b"\0", b"b" * 30 + b"\0\0", b"c" * 32]
    known = KnownImages(np.array(sorted(ids), dtype="S32"), np.array(["x", "y", "z"], dtype=object))
    assert [known.label_of(i) for i in ids] == [(True, "x"), (True, "y"), (True, "z")]
    assert known.label_of(b"a" * 32) == (False, None) and known.label_of(b"a" * 30 + b"\0\0") == (False, None)
