"""Ingest images into a dataset folder of shards (``tasks.shards``), streaming, validating every image.

The source is read as a stream of ``SourceItem``: worker threads (one per core) download or read
each image, decode it fully, check it (it decodes, its mode converts to the dataset's, its sides
are within bounds), hash its bytes and measure its pixels; this process keeps what is new and
writes it to new shards. Memory holds a bounded window of images in flight and one row group per
open shard, whatever the size of the source.

Duplicates are dropped by id (the SHA-256 of the bytes), within the source and against what the
folder already holds. Label problems fail the ingest, naming the file: an image without a class
in labeled data, a class the dataset lacks (unless ``allow_new_classes``), one image under two
classes. A bad image fails it too (``on_bad="fail"``), or is copied to the quarantine folder with
its reason (``"quarantine"``). A failed or interrupted ingest leaves the folder as it was: its
shards are staged beside it and its manifest part, written last, commits them.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from ssl_models.data import DataError
from tasks.shards import ImageRecord, KnownImages, ShardWriter, dataset_mode, remove_uncommitted
from tasks.sources import Kind, SourceItem

OnBad = Literal["fail", "quarantine"]
MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "I;16", "I", "CMYK", "YCbCr"}
CHUNK = 32  # images a worker checks per task
MAX_OPEN_SHARDS = 64
LISTED_QUARANTINE = 1000  # quarantined files named in a report (all are counted)


@dataclass(frozen=True)
class ImageRules:
    """What an image must be to enter a dataset."""

    channels: Literal[1, 3] = 1
    min_side: int = 8
    max_side: int = 8192

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"


@dataclass(frozen=True)
class IngestLimits:
    """How an ingest uses the machine: workers, shard size, and the memory it may hold."""

    workers: int = 0  # threads that read, decode and check images; 0: one per core
    shard_mb: float = 128
    memory_mb: float = 512  # images in flight plus the open shards' row groups

    @property
    def threads(self) -> int:
        return self.workers or os.cpu_count() or 1


@dataclass
class IngestReport:
    kind: str
    source: str
    dest: str
    added: int = 0
    already_present: int = 0
    duplicates_in_source: int = 0
    quarantined: list[tuple[str, str]] = field(default_factory=list)  # (source file, reason), the first 1,000
    num_quarantined: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> entries of the source not read
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (entry, reason), the first 1,000
    classes: list[str] = field(default_factory=list)
    total: int = 0  # images in the dataset after the ingest
    shards_written: int = 0
    bytes_written: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class BadImage(Exception):
    """An image that cannot enter the dataset; the message is the reason."""


@dataclass(frozen=True)
class Checked:
    """A worker's verdict on one item: a record, or the reason it is bad (and its bytes, if read)."""

    record: ImageRecord | None
    reason: str = ""
    data: bytes = b""


def decode(data: bytes, rules: ImageRules) -> Image.Image:
    """The image in the dataset's mode; ``BadImage`` says why not."""
    try:
        with Image.open(io.BytesIO(data)) as file:
            file.load()
            if file.mode not in MODES:
                raise BadImage(f"unsupported image mode {file.mode}")
            img = file.convert(rules.mode)
    except UnidentifiedImageError as e:  # PIL's message names its BytesIO object, not the file
        raise BadImage("cannot decode image: its bytes are in no image format PIL reads") from e
    except Image.DecompressionBombError as e:
        raise BadImage(f"cannot decode image: PIL refuses it for safety ({e})") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"cannot decode image ({type(e).__name__}: {e})") from e
    width, height = img.size
    if min(height, width) < rules.min_side or max(height, width) > rules.max_side:
        raise BadImage(f"size {width}x{height} outside {rules.min_side}-{rules.max_side} px per side")
    return img


def pixel_moments(img: Image.Image) -> tuple[float, float]:
    """Mean and mean square of the pixels scaled to [0, 1], from PIL's histogram (no pixel copy)."""
    counts = np.asarray(img.histogram(), dtype=np.float64).reshape(-1, 256).sum(0)
    values = np.arange(256) / 255.0
    total = counts.sum()
    return float(counts @ values / total), float(counts @ values**2 / total)


def check(item: SourceItem, rules: ImageRules, s3_endpoint: str | None = None) -> Checked:
    """Read, decode, validate, hash and measure one image (runs in a worker thread)."""
    if item.skipped:
        return Checked(None, item.skipped)
    s3_client = None
    if item.name.startswith("s3://"):
        from tasks.s3 import shared_client

        s3_client = shared_client(s3_endpoint)
    try:
        data = item.read(s3_client)
    except (OSError, DataError) as e:
        return Checked(None, f"cannot read ({e})")
    try:
        img = decode(data, rules)
    except BadImage as e:
        return Checked(None, str(e), data)
    mean, square = pixel_moments(img)
    record = ImageRecord(
        id=hashlib.sha256(data).digest(),
        data=data,
        label=item.label,
        source=item.name,
        width=img.size[0],
        height=img.size[1],
        pixel_mean=mean,
        pixel_sq_mean=square,
    )
    return Checked(record)


def _check_chunk(items: list[SourceItem], rules: ImageRules, s3_endpoint: str | None) -> list[Checked]:
    return [check(item, rules, s3_endpoint) for item in items]


def checked(
    items: Iterable[SourceItem], rules: ImageRules, workers: int, s3_endpoint: str | None = None
) -> Iterator[tuple[SourceItem, Checked]]:
    """Every item with its verdict, in source order, checked by ``workers`` threads with at most two
    chunks each in flight. Threads, not processes: decoding (PIL) and hashing release the GIL, and
    nothing (the images' bytes) has to be copied between processes."""
    iterator = iter(items)
    with ThreadPoolExecutor(workers, thread_name_prefix="ingest") as pool:
        pending: deque[tuple[list[SourceItem], Future[list[Checked]]]] = deque()
        try:
            while True:
                while len(pending) < 2 * workers and (chunk := list(islice(iterator, CHUNK))):
                    pending.append((chunk, pool.submit(_check_chunk, chunk, rules, s3_endpoint)))
                if not pending:
                    return
                chunk, future = pending.popleft()
                yield from zip(chunk, future.result(), strict=True)
        finally:
            for _, future in pending:
                future.cancel()


def _shard_count(expected_bytes: int, limits: IngestLimits) -> int:
    return max(1, min(MAX_OPEN_SHARDS, math.ceil(expected_bytes / (limits.shard_mb * 2**20))))


def ingest(
    items: Iterable[SourceItem],
    kind: Kind,
    dest: str | Path,
    rules: ImageRules = ImageRules(),
    *,
    on_bad: OnBad = "quarantine",
    quarantine: str | Path | None = None,
    allow_new_classes: bool = False,
    source: str = "",
    limits: IngestLimits = IngestLimits(),
    expected_bytes: int = 0,
    s3_endpoint: str | None = None,
    forbidden: dict[str, KnownImages] | None = None,
) -> IngestReport:
    """Validate ``items`` and add the new, good ones to the dataset folder ``dest`` as new shards.

    ``expected_bytes`` (the source's size, from its listing) sets how many shards the images are
    spread over, so that each holds about ``limits.shard_mb``. An image that one of the
    ``forbidden`` datasets (name -> its images) holds fails the ingest: a test image must not
    become a training image, nor the reverse.
    """
    start = time.perf_counter()
    dest = Path(dest)
    report = IngestReport(kind=kind, source=source, dest=str(dest))
    remove_uncommitted(dest)
    mode = dataset_mode(dest)
    if mode is not None and mode != rules.mode:
        raise DataError(f"{dest}: the dataset holds {mode} images; this ingest converts to {rules.mode}")
    known = KnownImages.of(dest)
    known_classes = {str(label) for label in known.labels if label is not None}
    shards = _shard_count(expected_bytes, limits)
    memory = limits.memory_mb * 2**20
    # Half the budget for the open shards' row groups, the rest for images in flight.
    writer = ShardWriter(
        dest, rules.mode, shards, int(limits.shard_mb * 2**20), max(2**20, int(memory / 2 / shards))
    )
    seen: dict[bytes, str | None] = {}  # this ingest's ids and labels
    classes = set(known_classes)
    try:
        for item, verdict in checked(items, rules, limits.threads, s3_endpoint):
            if item.skipped:
                report.skipped[item.skipped] = report.skipped.get(item.skipped, 0) + 1
                if len(report.skipped_files) < LISTED_QUARANTINE:
                    report.skipped_files.append((item.name, item.skipped))
                continue
            if kind == "labeled":
                if item.label is None:
                    raise DataError(f"{item.name}: labeled data needs a class for every image")
                if item.label not in classes:
                    if known_classes and not allow_new_classes:
                        raise DataError(
                            f"{item.name}: class {item.label!r} is not one of the dataset's classes"
                            f" {sorted(known_classes)} (allow_new_classes to add it)"
                        )
                    classes.add(item.label)
            record = verdict.record
            if record is None:
                if on_bad == "fail":
                    raise DataError(f"{item.name}: {verdict.reason}")
                _quarantine(item, verdict, Path(quarantine or dest.parent / f".{dest.name}.quarantine"))
                report.num_quarantined += 1
                if len(report.quarantined) < LISTED_QUARANTINE:
                    report.quarantined.append((item.name, verdict.reason))
                continue
            if record.id in seen:
                if seen[record.id] != item.label:
                    raise DataError(
                        f"{item.name}: the same image is earlier in the source as class {seen[record.id]!r}"
                    )
                report.duplicates_in_source += 1
                continue
            present, label = known.label_of(record.id)
            if present:
                if label != item.label:
                    raise DataError(
                        f"{item.name}: the same image is already in the dataset as class {label!r}"
                    )
                report.already_present += 1
                continue
            for other, images in (forbidden or {}).items():
                if images.label_of(record.id)[0]:
                    (where,) = images.sources([record.id])
                    raise DataError(
                        f"{item.name}: the same image is in the {other} set ({where}); test images must not"
                        " be training images: remove it from the source, or set data.allow_test_overlap: true"
                    )
            seen[record.id] = item.label
            writer.add(record)
        report.added = len(writer)
        report.seconds = time.perf_counter() - start
        record_of_ingest = {**report.as_dict(), "quarantined": report.quarantined[:100]}
        writer.commit(record_of_ingest)
    except BaseException:
        writer.abort()
        raise
    report.shards_written = len(writer.shards_written)
    report.bytes_written = writer.bytes_written
    report.total = len(known) + report.added
    report.classes = sorted(classes) if kind == "labeled" else []
    return report


def _quarantine(item: SourceItem, verdict: Checked, quarantine: Path) -> None:
    quarantine.mkdir(parents=True, exist_ok=True)
    safe = item.name.replace(os.sep, "__").replace(":", "_")[-200:]
    (quarantine / safe).write_bytes(verdict.data)
    (quarantine / f"{safe}.reason.txt").write_text(verdict.reason + "\n")
