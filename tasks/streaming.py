"""Datasets of decoded images through Ray Data: the shards of a dataset version, read, decoded and
resized to the training resolution in Ray Data tasks, streamed or kept materialised.

``image_dataset`` reads a version's shards (local, or ``s3://`` through the DVC remote) with
``read_parquet``, decodes and resizes in ``map_batches`` tasks (a cluster's CPU nodes run them),
and, when the decoded set fits in half the object store (``data.streaming.materialize: auto``),
decodes it once and keeps the blocks there. The driver holds block references, not images. Order
is preserved (``preserve_order``), so a dataset's rows, and the split of them over Ray Train
workers, are the same in every epoch and every run; each epoch's order is a local shuffle seeded
by (seed, epoch) (``StreamedBatches``).

What comes back to the driver is small: ids and labels (``ids_and_labels``), frozen features
(``features``), or a bounded subset of images (``read_images`` with ``only``).
"""

from __future__ import annotations

import io
import itertools
import logging
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import numpy as np
import ray
import ray.data
import torch
from PIL import Image
from ray.data import DataContext, ExecutionOptions, ExecutionResources
from ray.data._internal.execution.execution_callback import ExecutionCallback

from ssl_models.augment import to_float
from ssl_models.data import DataError, ImageSet
from tasks.cluster import connect
from tasks.config import PipelineConfig
from tasks.data import DatasetRef
from tasks.s3 import arrow_filesystem

MATERIALIZE_SHARE = 0.5  # of the object store, at most, that a materialised dataset may take
DECODE_BATCH = 256
IDLE_WAIT_S = 0.05


def decode_images(
    batch: dict[str, Any],
    mode: str,
    size: int,
    classes: tuple[str, ...],
    only: frozenset[bytes] | None = None,
) -> dict[str, np.ndarray]:
    """A batch of shard rows to uint8 images (B, size, size, C) and, with ``classes``, class indices;
    with ``only``, just the rows whose id it holds.

    JPEGs decode at the smallest scale at least ``size`` (``Image.draft``), then every image is
    resized (bilinear) to ``size`` x ``size``, as the served model does.
    """
    rows = [i for i in range(len(batch["image"])) if only is None or bytes(batch["id"][i]) in only]
    channels = 1 if mode == "L" else 3
    images = np.empty((len(rows), size, size, channels), dtype=np.uint8)
    for out, i in enumerate(rows):
        try:
            with Image.open(io.BytesIO(batch["image"][i])) as file:
                file.draft(mode, (size, size))
                img = file.convert(mode)
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR)
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"image {bytes(batch['id'][i]).hex()}: cannot decode ({e})") from e
        images[out] = np.asarray(img).reshape(size, size, channels)
    decoded = {"image": images}
    if classes:
        index = {name: i for i, name in enumerate(classes)}
        decoded["label"] = np.array([index[batch["label"][i]] for i in rows], dtype=np.int64)
    return decoded


def shard_locations(cfg: PipelineConfig, ref: DatasetRef) -> tuple[list[str], Any]:
    """The shard files to read and the filesystem to read them with (None: local or PyArrow's default)."""
    locations = list(ref.shard_uris) if ref.shard_uris else ref.shard_paths()
    if locations and locations[0].startswith("s3://"):
        filesystem = arrow_filesystem(cfg.data.dvc.endpoint_url)
        if filesystem is not None:  # with an explicit filesystem, paths carry no scheme
            return [loc.removeprefix("s3://") for loc in locations], filesystem
    return locations, None


def fits_in_object_store(cfg: PipelineConfig, num_images: int) -> bool:
    """Whether ``num_images`` decoded images are kept materialised (``data.streaming.materialize``)."""
    setting = cfg.data.streaming.materialize
    if setting != "auto":
        return setting == "always"
    capacity = ray.cluster_resources().get("object_store_memory", 0)
    return num_images * cfg.data.image_size**2 * cfg.data.channels <= MATERIALIZE_SHARE * capacity


def require_spare_cpu(cfg: PipelineConfig, num_images: int, held: float, setting: str) -> None:
    """A streamed (not materialised) dataset decodes while its readers (training workers, trials)
    run: it needs a CPU they do not hold, or Ray Data waits for one for ever. ``held``: their CPUs."""
    if fits_in_object_store(cfg, num_images):
        return
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus - held < 1:
        raise ValueError(
            f"{setting}: the readers of {num_images} streamed images hold {held:g} of the cluster's"
            f" {cpus:g} CPUs, and decoding them needs one more: lower {setting}, add a CPU node,"
            " or set data.streaming.materialize"
        )


class WaitWhenIdle(ExecutionCallback):  # type: ignore[misc]
    """Ray Data's scheduling loop (Ray 2.60) blocks in ``ray.wait`` until a running task has output;
    when every operator is held back by the object-store budget, that output is already there and
    stays unread, so the loop spins a CPU until the consumer takes a block (measured: the split
    coordinator at 75-95% of a core for a whole streamed epoch). A step that moved nothing (no
    task submitted, no output generated or taken) sleeps ``IDLE_WAIT_S``, a delay the consumer's
    prefetched batches hide."""

    def __init__(self) -> None:
        self._progress = -1

    def on_execution_step(self, executor: Any) -> None:
        metrics = [op.metrics for op in executor._topology]
        progress = sum(
            m.num_tasks_submitted + m.num_task_outputs_generated + m.num_outputs_taken for m in metrics
        )
        if progress == self._progress:
            time.sleep(IDLE_WAIT_S)
        self._progress = progress


def quiet(context: DataContext | None = None) -> None:
    """Ray Data's progress bars and per-execution INFO lines would drown the epoch lines."""
    context = context or DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _read(cfg: PipelineConfig, ref: DatasetRef, columns: list[str]) -> ray.data.Dataset:
    paths, filesystem = shard_locations(cfg, ref)
    context = DataContext.get_current()
    quiet(context)
    # Ray 2.60's Parquet datasource V2 reads footers on a pool of actors it starts for each read
    # (a process each, seconds apiece to start on a small machine: 8 of a smoke run's 27 worker
    # processes) and keeps only *.parquet files even when told not to filter, where the DVC
    # remote's objects are named by their md5 alone. V1 reads the footers in its read tasks (on
    # pooled workers) and honours file_extensions=None: every read goes through V1.
    v2 = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        dataset = ray.data.read_parquet(paths, filesystem=filesystem, file_extensions=None)
    finally:
        context.use_datasource_v2 = v2
    dataset = dataset.select_columns(columns)
    read_options(cfg, dataset.context)
    return dataset


def image_dataset(
    cfg: PipelineConfig, ref: DatasetRef, labeled: bool = False, only: frozenset[bytes] | None = None
) -> ray.data.Dataset:
    """The version's images (and class indices when ``labeled``; with ``only``, just the images of
    those ids) as a Ray Dataset, materialised when it fits; rows in the dataset's fixed order."""
    dataset = _read(cfg, ref, ["id", "image", *(["label"] if labeled else [])])
    mode = "L" if cfg.data.channels == 1 else "RGB"
    classes = ref.classes if labeled else ()
    decode = partial(decode_images, mode=mode, size=cfg.data.image_size, classes=classes, only=only)
    dataset = dataset.map_batches(decode, batch_size=DECODE_BATCH, batch_format="numpy")
    if fits_in_object_store(cfg, ref.num_images if only is None else len(only)):
        dataset = dataset.materialize()
    return dataset


def read_options(cfg: PipelineConfig, context: DataContext) -> None:
    """How every read of a dataset version executes: quietly, rows in order, at most
    ``data.streaming.object_store_mb`` in flight, and no busy loop while that holds it back."""
    quiet(context)
    context.execution_options = ingest_options(cfg)
    callbacks = context.custom_execution_callback_classes  # may be the global context's list: not mutated
    if WaitWhenIdle not in callbacks:
        context.custom_execution_callback_classes = [*callbacks, WaitWhenIdle]


def ingest_options(cfg: PipelineConfig) -> ExecutionOptions:
    """How a dataset is read, by the driver and by Ray Train for its workers' shards: rows in their
    fixed order, and at most ``data.streaming.object_store_mb`` of blocks in the object store at
    once, so a streamed epoch holds as much memory at 10^7 images as at 10^4."""
    budget = cfg.data.streaming.object_store_mb
    limits = ExecutionResources.for_limits(object_store_memory=None if budget is None else budget * 2**20)
    return ExecutionOptions(preserve_order=True, resource_limits=limits)


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

    def epoch(self, epoch: int, skip: int) -> Generator[torch.Tensor, None, None]:
        batches = shuffled_images(
            self.shard,
            self.batch_size // self.world,
            self.shuffle_rows,
            self.seed,
            epoch,
            self.prefetch_batches,
        )
        for i, batch in enumerate(batches):
            if i >= skip:
                yield batch


def shuffled_images(
    rows: Any,
    batch_size: int,
    shuffle_rows: int,
    seed: int,
    epoch: int,
    prefetch_batches: int,
    drop_last: bool = True,
) -> Iterator[torch.Tensor]:
    """One epoch of uint8 image batches (B, C, H, W) of a Ray Dataset or DataIterator (``rows``),
    through a local shuffle buffer of ``shuffle_rows`` seeded by (seed, epoch)."""
    batches = rows.iter_torch_batches(
        batch_size=batch_size,
        drop_last=drop_last,
        dtypes=torch.uint8,
        device="cpu",
        prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=shuffle_rows if shuffle_rows > 1 else None,
        local_shuffle_seed=seed * 1_000_003 + epoch,
    )
    for batch in batches:
        yield batch["image"].permute(0, 3, 1, 2)  # NHWC rows: a channels_last NCHW view


@dataclass(frozen=True)
class LabeledBatches:
    """A labeled dataset's (uint8 images (B, C, H, W), class indices) batches as a function any
    process can call: how sweep trials read the test set, streamed or from the object store."""

    dataset: Any  # ray.data.Dataset
    batch_size: int = 1024

    def __call__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.dataset.iter_torch_batches(batch_size=self.batch_size, device="cpu"):
            yield batch["image"].permute(0, 3, 1, 2), batch["label"]


@dataclass(frozen=True)
class UnlabeledBatches:
    """Endless uint8 batches (B, C, H, W) of an unlabeled dataset, epoch after epoch through a local
    shuffle buffer seeded by (seed, epoch): what a distillation trial's student learns on."""

    dataset: Any  # ray.data.Dataset
    rows: int
    batch_size: int
    shuffle_rows: int
    prefetch_batches: int

    def __call__(self, seed: int) -> Iterator[torch.Tensor]:
        if self.rows < 1:
            raise ValueError("distillation needs unlabeled images: the unlabeled dataset is empty")
        drop_last = self.rows >= self.batch_size  # no batch of one for BatchNorm
        for epoch in itertools.count():
            yield from shuffled_images(
                self.dataset,
                self.batch_size,
                self.shuffle_rows,
                seed,
                epoch,
                self.prefetch_batches,
                drop_last,
            )


def ids_and_labels(cfg: PipelineConfig, ref: DatasetRef) -> tuple[list[bytes], torch.Tensor]:
    """Every image's id and class index, in the dataset's order, read without touching an image."""
    connect(cfg)
    index = {name: i for i, name in enumerate(ref.classes)}
    ids: list[bytes] = []
    labels: list[int] = []
    for batch in _read(cfg, ref, ["id", "label"]).iter_batches(batch_size=65536, batch_format="numpy"):
        ids += [bytes(i) for i in batch["id"]]
        labels += [index[label] for label in batch["label"]]
    return ids, torch.tensor(labels, dtype=torch.int64)


class _Encode:
    """A Ray Data actor: the encoder's features of batches of decoded images."""

    def __init__(self, encoder: torch.nn.Module, device: str) -> None:
        self.encoder, self.device = encoder.to(device).eval(), device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2)
        with torch.no_grad():
            features = self.encoder(to_float(images.to(self.device)))
        return {"feature": features.cpu().numpy()}


def features(
    cfg: PipelineConfig, ref: DatasetRef, encoder: torch.nn.Module, use_gpu: bool = False
) -> torch.Tensor:
    """The frozen features (N, D) of every image, in the dataset's order: Ray Data tasks decode, an
    actor runs the encoder, and only the features come back here."""
    connect(cfg)
    encoded = image_dataset(cfg, ref).map_batches(
        _Encode,
        fn_constructor_kwargs={"encoder": encoder, "device": "cuda" if use_gpu else "cpu"},
        batch_size=1024,
        batch_format="numpy",
        concurrency=1,
        num_gpus=1 if use_gpu else 0,
    )
    return torch.cat([torch.from_numpy(b["feature"].copy()) for b in encoded.iter_batches(batch_size=None)])


def read_images(cfg: PipelineConfig, ref: DatasetRef, only: frozenset[bytes] | None = None) -> ImageSet:
    """Images decoded by Ray Data tasks and gathered here as uint8 (N, C, H, W), with class indices
    for a labeled set, in the dataset's fixed order: the images of the ids ``only`` (a bounded
    subset: the sweep's labeled splits), or a whole dataset for benchmarks' in-process loops."""
    connect(cfg)
    labeled = bool(ref.classes)
    images, labels = [], []
    for batch in image_dataset(cfg, ref, labeled, only).iter_batches(batch_size=4096, batch_format="numpy"):
        images.append(torch.from_numpy(batch["image"].copy()))
        if labeled:
            labels.append(torch.from_numpy(batch["label"].copy()))
    return ImageSet(
        images=torch.cat(images).permute(0, 3, 1, 2).contiguous(),
        labels=torch.cat(labels) if labeled else None,
        classes=ref.classes,
    )
