"""A dataset version on disk: immutable Parquet shards of the images' original bytes, and a manifest.

    <folder>/dataset.json               {"format": "ssl-pipeline-shards/1", "mode": "L" or "RGB"}
    <folder>/shards/00001-0000.parquet  one row per image: id, image (the bytes as ingested), label,
                                        source, size, width, height, pixel_mean, pixel_sq_mean
    <folder>/manifest/00001.parquet     the same rows without the bytes, plus shard and row
    <folder>/ingests/00001.json         what ingest 1 read, added and left out

``id`` is the SHA-256 of the image's bytes. Ingest N only adds files numbered N and never
rewrites one, so DVC (which hashes whole files) uploads only what is new. Its manifest part is
written last and is what commits it: shards that no manifest part names are what an ingest that
did not finish left behind, and the next ingest removes them. Parquet because Ray Data reads it
natively (``read_parquet``, column projection: training reads ``image`` alone, a manifest query
never touches the bytes) and the manifest is a table any Arrow tool can query.

Rows are spread over the shards of an ingest by their id, so every shard is a uniform sample of
what the ingest read (a source sorted by class gives shards of every class, which the bounded
shuffle of streamed training needs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FORMAT = "ssl-pipeline-shards/1"
ID_BYTES = 32

MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.binary(ID_BYTES)),
        ("label", pa.string()),
        ("source", pa.string()),
        ("size", pa.int64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("pixel_mean", pa.float32()),  # in [0, 1], in the dataset's mode, at the stored resolution
        ("pixel_sq_mean", pa.float32()),
    ]
)
SHARD_SCHEMA = MANIFEST_SCHEMA.insert(1, pa.field("image", pa.binary()))
MANIFEST_PART_SCHEMA = MANIFEST_SCHEMA.append(pa.field("shard", pa.string())).append(
    pa.field("row", pa.int64())
)


class ShardFormatError(ValueError):
    """A dataset folder is not in the shard format, or is inconsistent; the message names it."""


@dataclass(frozen=True)
class ImageRecord:
    """One validated image, ready to be stored."""

    id: bytes  # SHA-256 of ``data``
    data: bytes  # the encoded image, as it was read
    label: str | None
    source: str
    width: int
    height: int
    pixel_mean: float
    pixel_sq_mean: float


def _shard_name(ingest_no: int, index: int) -> str:
    return f"shards/{ingest_no:05d}-{index:04d}.parquet"


def _write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def is_dataset(folder: Path) -> bool:
    return (folder / "dataset.json").is_file()


def dataset_mode(folder: Path) -> str | None:
    """The image mode ("L" or "RGB") the folder's images were validated in; None if it holds none."""
    if not is_dataset(folder):
        return None
    info = json.loads((folder / "dataset.json").read_text())
    if info.get("format") != FORMAT:
        raise ShardFormatError(f"{folder}/dataset.json: format {info.get('format')!r}, expected {FORMAT!r}")
    return str(info["mode"])


def manifest_parts(folder: Path) -> list[Path]:
    return sorted((folder / "manifest").glob("*.parquet"))


def read_manifest(folder: Path, columns: list[str] | None = None) -> pa.Table:
    """Every committed image of the folder (the manifest parts in ingest order), without the bytes."""
    parts = manifest_parts(folder)
    if not parts:
        return MANIFEST_PART_SCHEMA.empty_table().select(columns or MANIFEST_PART_SCHEMA.names)
    return pa.concat_tables(pq.read_table(p, columns=columns) for p in parts)


def next_ingest_no(folder: Path) -> int:
    parts = manifest_parts(folder)
    return int(parts[-1].stem) + 1 if parts else 1


def remove_uncommitted(folder: Path) -> list[str]:
    """Delete what an ingest that stopped before its commit left: its staging folder, and the shards
    and ingest records no manifest part commits; their names."""
    for staging in folder.parent.glob(f".{folder.name}.ingest-*"):
        shutil.rmtree(staging, ignore_errors=True)
    committed = {int(p.stem) for p in manifest_parts(folder)}
    removed = []
    for path in sorted([*folder.glob("shards/*.parquet"), *folder.glob("ingests/*.json")]):
        if int(path.stem.split("-")[0]) not in committed:  # 00001-0000.parquet, 00001.json: ingest 1
            path.unlink()
            removed.append(str(path.relative_to(folder)))
    return removed


@dataclass(frozen=True)
class KnownImages:
    """The ids already in a dataset (sorted) and their labels, for dedup without a Python object each."""

    ids: np.ndarray  # dtype S32, sorted
    labels: np.ndarray  # object: str or None, aligned with ids
    folder: Path | None = None

    @classmethod
    def of(cls, folder: Path) -> KnownImages:
        table = read_manifest(folder, ["id", "label"])
        ids = np.array(table.column("id").to_pylist(), dtype=f"S{ID_BYTES}")
        order = np.argsort(ids, kind="stable")
        labels = np.array(table.column("label").to_pylist(), dtype=object)
        return cls(ids[order], labels[order], folder)

    def __len__(self) -> int:
        return len(self.ids)

    def label_of(self, image_id: bytes) -> tuple[bool, str | None]:
        """(present, its label)."""
        key = image_id.rstrip(b"\0")  # a numpy S32 array drops trailing zero bytes: compare in its terms
        i = int(np.searchsorted(self.ids, key))
        if i < len(self.ids) and self.ids[i] == key:
            return True, self.labels[i]
        return False, None

    def overlap(self, other: KnownImages) -> list[bytes]:
        """The ids both hold."""
        shared = np.intersect1d(self.ids, other.ids, assume_unique=True)
        return [bytes(i).ljust(ID_BYTES, b"\0") for i in shared]

    def sources(self, ids: list[bytes]) -> list[str]:
        """Where the images ``ids`` came from (their manifest rows' ``source``), in that order."""
        assert self.folder is not None
        table = read_manifest(self.folder, ["id", "source"])
        table = table.filter(pc.is_in(table.column("id"), value_set=pa.array(ids, pa.binary(ID_BYTES))))
        by_id = dict(zip(table.column("id").to_pylist(), table.column("source").to_pylist(), strict=True))
        return [by_id[i] for i in ids]


class ShardWriter:
    """Writes one ingest's images into new shards, staged beside the folder until ``commit``.

    Each image goes to shard ``id mod shards`` of the current round; a shard's rows are flushed
    as a row group every ``row_group_bytes``, so memory holds at most one row group per shard.
    A round ends when its shards together hold ``shards * shard_bytes``; the next opens new ones.
    """

    def __init__(self, folder: Path, mode: str, shards: int, shard_bytes: int, row_group_bytes: int) -> None:
        self.folder = folder
        self.mode = mode
        self.ingest_no = next_ingest_no(folder)
        self.staging = folder.parent / f".{folder.name}.ingest-{self.ingest_no:05d}-{os.getpid()}"
        shutil.rmtree(self.staging, ignore_errors=True)
        (self.staging / "shards").mkdir(parents=True)
        self.shards_per_round = max(1, shards)
        self.shard_bytes = shard_bytes
        self.row_group_bytes = row_group_bytes
        self._round_start = 0  # index of the first shard of the current round
        self._round_bytes = 0
        self._writers: dict[int, pq.ParquetWriter] = {}
        self._buffers: dict[int, list[ImageRecord]] = {}
        self._buffer_bytes: dict[int, int] = {}
        self._rows: dict[int, int] = {}  # rows written per shard index
        self._manifest = pq.ParquetWriter(self.staging / "manifest.parquet", MANIFEST_PART_SCHEMA)
        self.rows_written = 0
        self.shards_written: set[str] = set()
        self.bytes_written = 0

    def add(self, record: ImageRecord) -> None:
        index = self._round_start + int.from_bytes(record.id[:8], "big") % self.shards_per_round
        self._buffers.setdefault(index, []).append(record)
        self._buffer_bytes[index] = self._buffer_bytes.get(index, 0) + len(record.data)
        self._round_bytes += len(record.data)
        if self._buffer_bytes[index] >= self.row_group_bytes:
            self._flush(index)
        if self._round_bytes >= self.shards_per_round * self.shard_bytes:
            self._end_round()

    def __len__(self) -> int:
        return self.rows_written + sum(len(b) for b in self._buffers.values())

    def _flush(self, index: int) -> None:
        records = self._buffers.pop(index, [])
        self._buffer_bytes.pop(index, None)
        if not records:
            return
        name = _shard_name(self.ingest_no, index)
        if index not in self._writers:
            self._writers[index] = pq.ParquetWriter(self.staging / name, SHARD_SCHEMA, compression="none")
        table = pa.table(
            {
                "id": [r.id for r in records],
                "image": [r.data for r in records],
                "label": [r.label for r in records],
                "source": [r.source for r in records],
                "size": [len(r.data) for r in records],
                "width": [r.width for r in records],
                "height": [r.height for r in records],
                "pixel_mean": [r.pixel_mean for r in records],
                "pixel_sq_mean": [r.pixel_sq_mean for r in records],
            },
            schema=SHARD_SCHEMA,
        )
        self._writers[index].write_table(table)
        first_row = self._rows.get(index, 0)
        rows = pa.array(range(first_row, first_row + len(records)), pa.int64())
        entries = table.drop_columns(["image"]).append_column("shard", pa.array([name] * len(records)))
        self._manifest.write_table(entries.append_column("row", rows))
        self.rows_written += len(records)
        self._rows[index] = first_row + len(records)
        self.shards_written.add(name)
        self.bytes_written += sum(len(r.data) for r in records)

    def _end_round(self) -> None:
        for index in list(self._buffers):
            self._flush(index)
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
        self._round_start += self.shards_per_round
        self._round_bytes = 0

    def commit(self, record: dict[str, Any]) -> int:
        """Move the shards into the folder, then the manifest part (the commit); the images added."""
        self._end_round()
        self._manifest.close()
        if not self.rows_written:
            self.abort()
            return 0
        if dataset_mode(self.folder) is None:
            _write_json_atomic(self.folder / "dataset.json", {"format": FORMAT, "mode": self.mode})
        (self.folder / "shards").mkdir(parents=True, exist_ok=True)
        for shard in sorted((self.staging / "shards").glob("*.parquet")):
            os.replace(shard, self.folder / "shards" / shard.name)
        _write_json_atomic(self.folder / "ingests" / f"{self.ingest_no:05d}.json", record)
        (self.folder / "manifest").mkdir(parents=True, exist_ok=True)
        os.replace(
            self.staging / "manifest.parquet", self.folder / "manifest" / f"{self.ingest_no:05d}.parquet"
        )
        shutil.rmtree(self.staging, ignore_errors=True)
        return self.rows_written

    def abort(self) -> None:
        for writer in [*self._writers.values(), self._manifest]:
            writer.close()
        self._writers.clear()
        shutil.rmtree(self.staging, ignore_errors=True)


@dataclass(frozen=True)
class DatasetSummary:
    """What a run needs to know of a dataset folder, read from its manifest alone."""

    folder: str
    mode: str
    num_images: int
    classes: tuple[str, ...]  # sorted labels; () for unlabeled data
    digest: str  # SHA-256 of the (id, label) pairs in id order, the mode and the classes
    mean: float  # pixel statistics over the images, each weighted equally
    std: float
    shards: tuple[str, ...] = field(default=())  # relative to the folder, in ingest order
    bytes: int = 0


def summarize(folder: Path) -> DatasetSummary:
    mode = dataset_mode(folder)
    if mode is None:
        raise ShardFormatError(f"{folder}: no dataset here (ingest images into it first)")
    table = read_manifest(folder, ["id", "label", "size", "pixel_mean", "pixel_sq_mean", "shard"])
    if table.num_rows == 0:
        raise ShardFormatError(f"{folder}: the dataset holds no images")
    table = table.sort_by("id")
    labels = table.column("label").to_pylist()
    classes = tuple(sorted({label for label in labels if label is not None}))
    h = hashlib.sha256(json.dumps([FORMAT, mode, list(classes)]).encode())
    h.update(b"".join(table.column("id").to_pylist()))
    h.update("\n".join("" if label is None else label for label in labels).encode())
    means = table.column("pixel_mean").to_numpy().astype(np.float64)
    squares = table.column("pixel_sq_mean").to_numpy().astype(np.float64)
    mean = float(means.mean())
    std = float(np.sqrt(max(squares.mean() - mean**2, 0.0)))
    shards = tuple(sorted(pc.unique(table.column("shard")).to_pylist()))
    size = int(pc.sum(table.column("size")).as_py())
    return DatasetSummary(str(folder), mode, table.num_rows, classes, h.hexdigest(), mean, std, shards, size)
