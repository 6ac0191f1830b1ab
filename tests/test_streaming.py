"""Training input through Ray Data: shards decoded in Ray tasks, streamed or materialised, in an order
fixed by (seed, epoch), split over workers without overlap, and resumable part way through an epoch."""

import threading
from pathlib import Path

import pytest
import torch

from ssl_models import create_method
from ssl_models.augment import AugmentParams
from ssl_models.train import TrainSettings, pretrain
from tasks.config import PipelineConfig, load_config
from tasks.data import PreparedData, ingest_and_prepare
from tasks.pretrain import build_encoder
from tasks.streaming import (
    StreamedBatches,
    fits_in_object_store,
    image_dataset,
    read_images,
)
from tests.conftest import REPO


def config(workspace: Path, materialize: str) -> PipelineConfig:
    """320 Fashion-MNIST images in batches of 64 (5 steps an epoch); a 100-row shuffle buffer."""
    return load_config(
        REPO / "params.yaml",
        "smoke",
        [
            f"workspace={workspace}",
            "data.dvc.enabled=false",
            "data.unlabeled_limit=320",
            f"data.streaming.materialize={materialize}",
            f"data.streaming.shuffle_buffer_mb={100 * 28 * 28 / 2**20}",
        ],
    )


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_dir: Path) -> tuple[Path, PreparedData]:
    workspace = tmp_path_factory.mktemp("streaming")
    return workspace, ingest_and_prepare(config(workspace, "auto"))


def batches(cfg: PipelineConfig, data: PreparedData, world: int = 1, shard: object = None) -> StreamedBatches:
    shard = shard if shard is not None else image_dataset(cfg, data.unlabeled).iterator()
    return StreamedBatches(shard, 320 // world, 64, world, seed=0, shuffle_rows=100, prefetch_batches=2)


@pytest.mark.parametrize("materialize", ["never", "always"])
def test_an_epoch_order_is_fixed_by_seed_and_epoch_and_resumes_part_way(
    ray_cluster: str, prepared: tuple[Path, PreparedData], materialize: str
) -> None:
    workspace, data = prepared
    cfg = config(workspace, materialize)
    assert fits_in_object_store(cfg, data.unlabeled.num_images) == (materialize == "always")
    source = batches(cfg, data)
    epoch0, epoch1 = list(source.epoch(0, 0)), list(source.epoch(1, 0))
    assert len(epoch0) == len(epoch1) == source.steps_per_epoch == 5
    assert epoch0[0].shape == (64, 1, 28, 28) and epoch0[0].dtype == torch.uint8
    assert epoch0[0].is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(torch.cat(epoch0), torch.cat(epoch1))  # another order each epoch
    again = batches(cfg, data)  # a new dataset and iterator: another run, or a restarted worker
    assert all(torch.equal(a, b) for a, b in zip(epoch0, again.epoch(0, 0), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(epoch1[3:], again.epoch(1, 3), strict=True))
    # Every image of the dataset once an epoch, decoded as it was stored.
    sums = torch.cat(epoch0).flatten(1).sum(1).sort().values
    assert torch.equal(sums, read_images(cfg, data.unlabeled).images.flatten(1).sum(1).sort().values)


def test_two_workers_get_disjoint_halves_of_every_epoch(
    ray_cluster: str, prepared: tuple[Path, PreparedData]
) -> None:
    workspace, data = prepared
    cfg = config(workspace, "never")
    shards = image_dataset(cfg, data.unlabeled).streaming_split(2, equal=True)
    seen: list[list[torch.Tensor]] = [[], []]

    def consume(rank: int) -> None:
        seen[rank] = list(batches(cfg, data, world=2, shard=shards[rank]).epoch(0, 0))

    threads = [threading.Thread(target=consume, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [len(s) for s in seen] == [5, 5]  # 160 rows each, in batches of 32
    rows = [{tuple(img.flatten().tolist()) for batch in s for img in batch} for s in seen]
    assert not rows[0] & rows[1] and len(rows[0] | rows[1]) == 320


def test_a_streamed_run_resumed_mid_epoch_equals_an_uninterrupted_one(
    ray_cluster: str, prepared: tuple[Path, PreparedData], tmp_path: Path
) -> None:
    workspace, data = prepared
    cfg = config(workspace, "never")
    settings = TrainSettings(epochs=2, batch_size=64, checkpoint_every_steps=0)

    def method():  # type: ignore[no-untyped-def]
        return create_method("simclr", build_encoder(cfg, data.mean, data.std))

    whole = method()
    whole_result = pretrain(whole, batches(cfg, data), AugmentParams(), settings)
    checkpoint = tmp_path / "ckpt.pt"
    first = pretrain(method(), batches(cfg, data), AugmentParams(), settings, checkpoint, stop_at_step=7)
    assert first.steps == 7  # stopped in the second epoch, after 2 of its 5 batches
    resumed = method()
    second = pretrain(resumed, batches(cfg, data), AugmentParams(), settings, checkpoint)
    assert second.resumed_from_step == 7 and second.steps == 10
    assert [(r["epoch"], r["loss"]) for r in second.history] == [
        (r["epoch"], r["loss"]) for r in whole_result.history
    ]
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


@pytest.mark.parametrize(("budget", "limit"), [("2", 2 * 2**20), ("null", float("inf"))])
def test_a_streamed_read_holds_at_most_its_object_store_budget(
    ray_cluster: str, prepared: tuple[Path, PreparedData], budget: str, limit: float
) -> None:
    """What bounds a streamed epoch's memory whatever the dataset's size (bench.scale measures it):
    Ray Data keeps at most data.streaming.object_store_mb of blocks in flight; null leaves Ray's default."""
    workspace, data = prepared
    cfg = load_config(
        REPO / "params.yaml", "smoke", [f"workspace={workspace}", f"data.streaming.object_store_mb={budget}"]
    )
    dataset = image_dataset(cfg, data.unlabeled)
    assert dataset.context.execution_options.resource_limits.object_store_memory == limit
    assert dataset.context.execution_options.preserve_order
    assert sum(len(batch["image"]) for batch in dataset.iter_batches(batch_size=100)) == 320


def test_a_read_held_back_by_its_budget_waits_instead_of_spinning(ray_cluster: str, tmp_path: Path) -> None:
    """With every operator held back by the object-store budget and no task running, Ray Data's
    scheduling loop would spin a CPU until the consumer takes a block (WaitWhenIdle)."""
    import time

    import numpy as np
    import ray.data

    from tasks.streaming import WaitWhenIdle, read_options

    overrides = [f"workspace={tmp_path}", "data.streaming.object_store_mb=1"]
    cfg = load_config(REPO / "params.yaml", "smoke", overrides)

    def executor_cpu_seconds_while_the_consumer_sleeps(wait: bool) -> float:
        dataset = ray.data.range(400, override_num_blocks=100).map_batches(
            lambda batch: {"x": np.zeros((len(batch["id"]), 100_000), np.uint8)}, batch_size=None
        )  # 100 blocks of 400 KB against a 1 MB budget
        read_options(cfg, dataset.context)
        if not wait:
            dataset.context.custom_execution_callback_classes.remove(WaitWhenIdle)
        batches = iter(dataset.iter_batches(batch_size=4, prefetch_batches=0))
        next(batches)
        time.sleep(1.0)  # the budget fills; then nothing runs until the consumer reads on
        start = time.process_time()
        time.sleep(3.0)
        spent = time.process_time() - start
        assert sum(len(b["x"]) for b in batches) == 396
        return spent

    assert executor_cpu_seconds_while_the_consumer_sleeps(wait=False) > 1.5  # the spin, measured
    assert executor_cpu_seconds_while_the_consumer_sleeps(wait=True) < 0.5


def test_a_read_goes_through_ray_datas_v1_parquet_reader(
    ray_cluster: str, prepared: tuple[Path, PreparedData]
) -> None:
    """V2 (Ray 2.60's default) plans a pool of footer-reading actor processes for every read: a
    third of a smoke run's worker processes. V1 reads footers in its read tasks."""
    from ray.data import DataContext

    workspace, data = prepared
    before = DataContext.get_current().use_datasource_v2
    op = image_dataset(config(workspace, "never"), data.unlabeled)._logical_plan.dag
    while op.input_dependencies:
        op = op.input_dependencies[0]
    assert op.name == "ReadParquet"  # V2's is ReadFilesParquetV2
    assert DataContext.get_current().use_datasource_v2 == before
