"""Datasets of decoded images through Ray Data: the shards of a dataset version, read, decoded and
resized to the training resolution in Ray Data tasks, streamed or kept materialised.

``image_dataset`` reads a version's shards (local, or ``s3://`` through the DVC remote) with
``read_parquet``, decodes and resizes in ``map_batches`` tasks (a cluster's CPU nodes run them),
and, when the decoded set fits in half the object store (``data.streaming.materialize: auto``),
decodes it once and keeps the blocks there. Nothing passes through the driver: it holds block
references only. Order is preserved (``preserve_order``), so a dataset's rows, and the split of
them over Ray Train workers, are the same in every epoch and every run; each epoch's order is a
local shuffle seeded by (seed, epoch) (``StreamedBatches``).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import numpy as np
import ray
import ray.data
import torch
from PIL import Image
from ray.data import DataContext, ExecutionOptions

from ssl_models.data import DataError, ImageSet
from tasks.cluster import connect
from tasks.config import PipelineConfig
from tasks.data import DatasetRef
from tasks.s3 import arrow_filesystem

MATERIALIZE_SHARE = 0.5  # of the object store, at most, that a materialised dataset may take
DECODE_BATCH = 256


def decode_images(
    batch: dict[str, Any], mode: str, size: int, classes: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """A batch of shard rows to uint8 images (B, size, size, C) and, with ``classes``, class indices.

    JPEGs decode at the smallest scale at least ``size`` (``Image.draft``), then every image is
    resized (bilinear) to ``size`` x ``size``, as the served model does.
    """
    channels = 1 if mode == "L" else 3
    images = np.empty((len(batch["image"]), size, size, channels), dtype=np.uint8)
    for i, data in enumerate(batch["image"]):
        try:
            with Image.open(io.BytesIO(data)) as file:
                file.draft(mode, (size, size))
                img = file.convert(mode)
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"image {bytes(batch['id'][i]).hex()}: cannot decode ({e})") from e
        images[i] = np.asarray(img).reshape(size, size, channels)
    decoded = {"image": images}
    if classes:
        index = {name: i for i, name in enumerate(classes)}
        decoded["label"] = np.array([index[label] for label in batch["label"]], dtype=np.int64)
    return decoded


def shard_locations(cfg: PipelineConfig, ref: DatasetRef) -> tuple[list[str], Any]:
    """The shard files to read and the filesystem to read them with (None: local or PyArrow's default)."""
    locations = list(ref.shard_uris) if ref.shard_uris else ref.shard_paths()
    if locations and locations[0].startswith("s3://"):
        filesystem = arrow_filesystem(cfg.data.dvc.endpoint_url)
        if filesystem is not None:  # with an explicit filesystem, paths carry no scheme
            return [loc.removeprefix("s3://") for loc in locations], filesystem
    return locations, None


def decoded_bytes(cfg: PipelineConfig, ref: DatasetRef) -> int:
    return ref.num_images * cfg.data.image_size**2 * cfg.data.channels


def fits_in_object_store(cfg: PipelineConfig, ref: DatasetRef) -> bool:
    setting = cfg.data.streaming.materialize
    if setting != "auto":
        return setting == "always"
    capacity = ray.cluster_resources().get("object_store_memory", 0)
    return decoded_bytes(cfg, ref) <= MATERIALIZE_SHARE * capacity


def image_dataset(cfg: PipelineConfig, ref: DatasetRef, labeled: bool = False) -> ray.data.Dataset:
    """The version's images (and class indices when ``labeled``) as a Ray Dataset, materialised
    when it fits (see ``fits_in_object_store``); rows in a fixed order."""
    paths, filesystem = shard_locations(cfg, ref)
    columns = ["id", "image", *(["label"] if labeled else [])]
    dataset = ray.data.read_parquet(paths, filesystem=filesystem, file_extensions=None).select_columns(
        columns
    )
    quiet(dataset.context)
    dataset.context.execution_options.preserve_order = True
    mode = "L" if cfg.data.channels == 1 else "RGB"
    decode = partial(
        decode_images, mode=mode, size=cfg.data.image_size, classes=ref.classes if labeled else ()
    )
    dataset = dataset.map_batches(decode, batch_size=DECODE_BATCH, batch_format="numpy")
    if fits_in_object_store(cfg, ref):
        dataset = dataset.materialize()
    return dataset


def ingest_options() -> ExecutionOptions:
    """Ray Train's options for the workers' dataset shards: rows in their fixed order."""
    return ExecutionOptions(preserve_order=True)


def quiet(context: DataContext | None = None) -> None:
    """Ray Data's progress bars and per-execution INFO lines would drown the epoch lines."""
    context = context or DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def shuffle_rows(cfg: PipelineConfig, rows: int) -> int:
    """Rows of each worker's local shuffle buffer: ``data.streaming.shuffle_buffer_mb`` of decoded images."""
    row_bytes = cfg.data.image_size**2 * cfg.data.channels
    return max(1, min(rows, int(cfg.data.streaming.shuffle_buffer_mb * 2**20 // row_bytes)))


@dataclass(frozen=True)
class StreamedBatches:
    """A Ray Train worker's share of a dataset, as ``ssl_models.train.BatchSource``: its own batches
    of ``batch_size / world`` images, ``steps_per_epoch`` each epoch, through a local shuffle
    buffer seeded by (seed, epoch). Resuming an epoch part way skips its first batches (the
    order is the same), as Ray's own benchmarks do; Ray Data has no iterator checkpoints."""

    shard: Any  # ray.data.DataIterator
    rows: int  # this worker's rows per epoch (streaming_split(equal=True) gives every worker as many)
    batch_size: int  # the global batch
    world: int
    seed: int
    shuffle_rows: int
    prefetch_batches: int
    global_batches: ClassVar[bool] = False

    @property
    def steps_per_epoch(self) -> int:
        return self.rows // (self.batch_size // self.world)

    def epoch(self, epoch: int, skip: int) -> Iterator[torch.Tensor]:
        batches = self.shard.iter_torch_batches(
            batch_size=self.batch_size // self.world,
            drop_last=True,
            dtypes=torch.uint8,
            device="cpu",
            prefetch_batches=self.prefetch_batches,
            local_shuffle_buffer_size=self.shuffle_rows if self.shuffle_rows > 1 else None,
            local_shuffle_seed=self.seed * 1_000_003 + epoch,
        )
        for i, batch in enumerate(batches):
            if i >= self.steps_per_epoch:
                return
            if i >= skip:
                yield batch["image"].permute(0, 3, 1, 2)  # NHWC rows: a channels_last NCHW view


def read_images(cfg: PipelineConfig, ref: DatasetRef) -> ImageSet:
    """A dataset decoded by Ray Data tasks and gathered here as uint8 images (N, C, H, W), with
    class indices for a labeled set, in the dataset's fixed order.

    A whole dataset in one process: for benchmarks' in-process loops, and for the sweep, which does
    not stream its labeled and test sets yet."""
    connect(cfg)
    labeled = bool(ref.classes)
    images, labels = [], []
    for batch in image_dataset(cfg, ref, labeled).iter_batches(batch_size=4096, batch_format="numpy"):
        images.append(torch.from_numpy(batch["image"]))
        if labeled:
            labels.append(torch.from_numpy(batch["label"]))
    return ImageSet(
        images=torch.cat(images).permute(0, 3, 1, 2).contiguous(),
        labels=torch.cat(labels) if labeled else None,
        classes=ref.classes,
    )
