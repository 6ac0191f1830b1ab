"""Where images come from, listed lazily: a folder, an S3 prefix, a label table, or an IDX file.

A source is an iterator of ``SourceItem``: a name (a path, ``s3://bucket/key``, ``file[i]``), a
label, the size and a stamp from the listing. Nothing here reads an image's bytes (except IDX,
whose images are in one file): the ingest's workers do, in parallel. Listing holds one directory's
names (or one S3 page, or one table batch) at a time, so a source of any size lists in bounded
memory.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ssl_models.data import FASHION_MNIST_CLASSES, IMAGE_SUFFIXES, DataError, read_idx

Kind = Literal["unlabeled", "labeled"]
TABLE_SUFFIXES = (".csv", ".parquet")


@dataclass(frozen=True)
class SourceItem:
    name: str  # a local path, s3://bucket/key, or images-file[index]
    label: str | None
    size: int = 0  # bytes, as listed (0: unknown)
    stamp: str = ""  # what changes when the image changes: size and mtime, an ETag, an IDX file's stat
    pixels: np.ndarray | None = None  # IDX only: the image itself (H, W) uint8
    skipped: str = ""  # why the listing knows this entry is no image to read ("": it may be one)

    def read(self, s3_client: object | None = None) -> bytes:
        """The image's bytes as stored at the source (an IDX image is encoded as PNG)."""
        if self.pixels is not None:
            from PIL import Image

            buffer = io.BytesIO()
            Image.fromarray(self.pixels).save(buffer, format="PNG")
            return buffer.getvalue()
        if self.name.startswith("s3://"):
            from tasks.s3 import download

            return download(self.name, s3_client)
        return Path(self.name).read_bytes()


def image_format(item: SourceItem, endpoint_url: str | None = None) -> tuple[str, int, int]:
    """(PIL mode, width, height) of one image of a source, read from its header."""
    from PIL import Image

    s3_client = None
    if item.name.startswith("s3://"):
        from tasks.s3 import shared_client

        s3_client = shared_client(endpoint_url)
    with Image.open(io.BytesIO(item.read(s3_client))) as image:
        return image.mode, image.size[0], image.size[1]


def class_folder(name: str) -> str:
    """A class name as one folder name: Fashion-MNIST's "T-shirt/top" becomes "T-shirt_top"."""
    return name.replace("/", "_").replace("\\", "_").lstrip(".") or "_"


def is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _walk(folder: str) -> Iterator[tuple[str, str]]:
    """Every entry below ``folder`` in sorted order, with why it is skipped ("" for an image file);
    one directory's entries in memory at a time. Links to folders are not followed (no loops)."""
    try:
        with os.scandir(folder) as entries:
            ordered = sorted(entries, key=lambda e: e.name)
    except OSError as e:
        yield folder, f"a folder that cannot be listed ({e.strerror})"
        return
    for entry in ordered:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(entry.path)
        else:
            yield entry.path, _why_not_an_image(entry)


def _why_not_an_image(entry: os.DirEntry[str]) -> str:
    if entry.is_symlink() and not os.path.exists(entry.path):
        return "a broken link"
    if entry.is_dir():
        return "a link to a folder (not followed)"
    if not entry.is_file():
        return "not a regular file"
    if not is_image(entry.name):
        return f"not an image file name ({os.path.splitext(entry.name)[1] or 'no suffix'})"
    return ""


def folder_items(root: Path, kind: Kind) -> Iterator[SourceItem]:
    """Every entry below ``root``: image files, and the rest marked with why they are skipped; for
    ``labeled``, the class is an image's first sub-folder."""
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    found = False
    for path, skipped in _walk(str(root)):
        if skipped:
            yield SourceItem(path, None, skipped=skipped)
            continue
        relative = Path(path).relative_to(root)
        if kind == "labeled" and len(relative.parts) < 2:
            raise DataError(f"{path}: a labeled folder holds images in one sub-folder per class")
        stat = os.stat(path)
        label = relative.parts[0] if kind == "labeled" else None
        yield SourceItem(path, label, stat.st_size, f"{stat.st_size}:{stat.st_mtime_ns}")
        found = True
    if not found:
        raise DataError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")


def idx_items(
    images_path: Path, labels_path: Path | None, classes: tuple[str, ...] = FASHION_MNIST_CLASSES
) -> Iterator[SourceItem]:
    """Images of an IDX file, with class names from an IDX labels file when given."""
    images = read_idx(images_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected images of shape (N, H, W), got {images.shape}")
    labels: list[str | None] = [None] * len(images)
    if labels_path is not None:
        raw = read_idx(labels_path)
        if raw.ndim != 1:
            raise DataError(f"{labels_path}: expected labels of shape (N,), got {raw.shape}")
        if len(raw) != len(images):
            raise DataError(f"{labels_path}: {len(raw)} labels for {len(images)} images in {images_path}")
        if len(raw) and raw.max() >= len(classes):
            raise DataError(f"{labels_path}: label {raw.max()} outside 0-{len(classes) - 1}")
        labels = [class_folder(classes[i]) for i in raw]
    stat = images_path.stat()
    stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    size = images.shape[1] * images.shape[2]
    for i, label in enumerate(labels):
        yield SourceItem(f"{images_path}[{i}]", label, size, f"{stamp}:{i}", images[i])


def _table_batches(table: Path) -> Iterator[pa.RecordBatch]:
    try:
        if table.suffix.lower() == ".parquet":
            yield from pq.ParquetFile(table).iter_batches(batch_size=10_000)
        else:
            yield from pacsv.open_csv(table, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"{table}: cannot read the label table ({e})") from e


def _inside(location: str, root: str) -> bool:
    if root.startswith("s3://"):
        base = root.rstrip("/") + "/"
        return location.startswith(base) and "/../" not in location and not location.endswith("/..")
    return os.path.commonpath([os.path.realpath(location), os.path.realpath(root)]) == os.path.realpath(root)


SPLITS = ("unlabeled", "labeled", "test")


def table_items(
    table: Path, kind: Kind, root: str | None = None, split: str | None = None
) -> Iterator[SourceItem]:
    """Rows of a CSV or Parquet table with a ``path`` column (relative to ``root``, or an absolute
    path or ``s3://`` URI under it), for labeled data a ``label`` column, and optionally a
    ``split`` column (unlabeled, labeled or test): with ``split`` given, only its rows.

    ``root`` defaults to the table's folder. A row that points outside it, an unknown split, and
    (in labeled data) a path listed twice are refused, naming the row.
    """
    root = root or str(table.parent)
    row = 0
    first_row: dict[str, int] = {}  # labeled data only: labels are few, the check's memory too
    for batch in _table_batches(table):
        names = batch.schema.names
        if "path" not in names or (kind == "labeled" and "label" not in names):
            wanted = "path and label" if kind == "labeled" else "path"
            raise DataError(f"{table}: a label table needs the columns {wanted}; it has {names}")
        paths = batch.column("path").to_pylist()
        labels = batch.column("label").to_pylist() if "label" in names else [None] * len(paths)
        splits = batch.column("split").to_pylist() if "split" in names else [None] * len(paths)
        for path, label, row_split in zip(paths, labels, splits, strict=True):
            row += 1
            if row_split is not None and str(row_split) not in SPLITS:
                raise DataError(f"{table}: row {row}: split {row_split!r} is none of {', '.join(SPLITS)}")
            if split is not None and row_split is not None and str(row_split) != split:
                continue
            if not path:
                raise DataError(f"{table}: row {row}: empty path")
            if kind == "labeled" and (label is None or str(label) == ""):
                raise DataError(f"{table}: row {row}: no label for {path}")
            location = str(path) if "://" in str(path) or os.path.isabs(path) else os.path.join(root, path)
            if "://" in location and not location.startswith("s3://"):
                raise DataError(f"{table}: row {row}: {path!r}: only local paths and s3:// URIs are read")
            if not _inside(location, root):
                raise DataError(f"{table}: row {row}: {path!r} points outside the source root {root}")
            if kind == "labeled":
                if location in first_row:
                    raise DataError(
                        f"{table}: row {row}: {path!r} is listed again (first at row {first_row[location]})"
                    )
                first_row[location] = row
            stamp = ""
            size = 0
            if not location.startswith("s3://"):
                try:
                    stat = os.stat(location)
                except OSError as e:
                    raise DataError(f"{table}: row {row}: {path!r}: {e.strerror}") from None
                size, stamp = stat.st_size, f"{stat.st_size}:{stat.st_mtime_ns}"
            yield SourceItem(location, None if label is None else str(label), size, stamp)
    if row == 0:
        raise DataError(f"{table}: the label table has no rows")


def first_images(items: Iterator[SourceItem], limit: int | None) -> Iterator[SourceItem]:
    """``items`` up to and including the ``limit``-th image (skipped entries do not count)."""
    images = 0
    for item in items:
        if limit is not None and images >= limit:
            return
        yield item
        images += not item.skipped


def source_items(
    location: str, kind: Kind, endpoint_url: str | None = None, split: str | None = None
) -> Iterator[SourceItem]:
    """The images at ``location``: ``s3://bucket/prefix``, a .csv/.parquet label table (only the
    rows of ``split`` when it has a split column), or a folder."""
    if location.startswith("s3://"):
        from tasks.s3 import s3_items

        return s3_items(location, kind, endpoint_url)
    path = Path(location)
    if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        return table_items(path, kind, split=split)
    return folder_items(path, kind)


@dataclass(frozen=True)
class SourceListing:
    """A pass over a source's listing: what it holds, without reading an image."""

    fingerprint: str  # changes when any name, label, size or stamp does
    count: int
    bytes: int


def list_source(items: Iterator[SourceItem]) -> SourceListing:
    h = hashlib.sha256()
    count = size = 0
    for item in items:
        if item.skipped:  # not data: a README beside the images changes no version
            continue
        h.update(f"{item.name}\0{item.label}\0{item.size}\0{item.stamp}\n".encode())
        count += 1
        size += item.size
    return SourceListing(h.hexdigest(), count, size)
