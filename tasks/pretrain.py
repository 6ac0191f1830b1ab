"""Self-supervised pretraining as a Ray Train run: data-parallel workers, checkpoints in storage.

The task only builds Ray's configs from the typed config (``scaling_config``,
``run_config``) and the unlabeled images as a Ray Dataset (``tasks.streaming``); each worker
runs ``train_worker``, which is ``ssl_models.train.pretrain`` on its dataset shard plus the
hand-off of checkpoints to Ray. Local by default (``ray.init()`` on this machine,
checkpoints under the workspace); ``RAY_ADDRESS`` or ``ray.address`` joins a cluster and
``ray.storage_path: s3://...`` keeps checkpoints in S3, with no code change.

The run is named after the data and the pretraining config, so the same pretraining run
again resumes from its latest checkpoint (or returns at once when it had finished), and a
worker that dies is restarted from the latest checkpoint (``ray.max_failures``).
"""

from __future__ import annotations

import logging
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from pyarrow import fs as pafs
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    Result,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from ssl_models import Encoder, create_backbone, create_method
from ssl_models.methods import get_method
from ssl_models.train import load_checkpoint, pretrain
from tasks import streaming
from tasks.cluster import connect
from tasks.config import PipelineConfig
from tasks.data import PreparedData
from tasks.s3 import arrow_filesystem

ENTRYPOINT = "ssl-pipeline pretrain"  # what a cluster job runs (infra/ray/)
CLUSTER_IMAGE = "ghcr.io/ssl-pipeline/ssl-pipeline:0.1.0"
CHECKPOINT_FILE = "checkpoint.pt"


def progress_logger() -> logging.Logger:
    """Epoch lines on the worker's stdout, which Ray forwards to the driver's console."""
    logger = logging.getLogger("ssl_pipeline.progress")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


@dataclass(frozen=True)
class PretrainOutput:
    checkpoint_path: str  # a local copy of the final training checkpoint
    encoder_path: str
    steps: int
    resumed_from_step: int
    history: list[dict[str, float]] = field(default_factory=list)
    run_name: str = ""
    checkpoint_uri: str = ""  # where Ray stored the final checkpoint (a folder or s3://...)


def build_encoder(cfg: PipelineConfig, mean: float, std: float) -> Encoder:
    """A randomly initialised encoder of the configured backbone.

    Seeds the global RNG with ``cfg.seed``, so the method's heads built right after it are
    seeded too (and every worker builds the same model).
    """
    torch.manual_seed(cfg.seed)
    backbone = create_backbone(cfg.model.backbone, cfg.data.channels, cfg.data.image_size, cfg.model.weights)
    return Encoder(backbone, mean, std)


def load_encoder(cfg: PipelineConfig, data: PreparedData, encoder_path: str) -> Encoder:
    encoder = build_encoder(cfg, data.mean, data.std)
    encoder.load_state_dict(torch.load(encoder_path, map_location="cpu", weights_only=True))
    return encoder


def run_name(cfg: PipelineConfig, data: PreparedData) -> str:
    """Same data and pretraining config, same name: what makes a rerun resume."""
    return f"pretrain-{cfg.digest('seed', 'model', 'augment', 'pretrain')}-{data.unlabeled.digest[:8]}"


def run_dir(cfg: PipelineConfig, data: PreparedData) -> Path:
    return cfg.workspace_path / "pretrain" / run_name(cfg, data).removeprefix("pretrain-")


def storage(cfg: PipelineConfig) -> tuple[str, pafs.FileSystem | None]:
    """Ray's ``storage_path`` and, for an S3-compatible endpoint, the filesystem to reach it;
    credentials come from the environment (or an instance profile), never from the config."""
    path = cfg.ray.storage_path
    if not path:
        return str((cfg.workspace_path / "ray").resolve()), None
    if not path.startswith("s3://"):
        return str(Path(path).resolve()), None
    filesystem = arrow_filesystem(cfg.ray.storage_endpoint_url)
    return (path.removeprefix("s3://"), filesystem) if filesystem else (path, None)


def latest_checkpoint(cfg: PipelineConfig, name: str) -> Checkpoint | None:
    """The latest checkpoint Ray registered for run ``name`` in the configured storage, if any.

    Registered, not merely written: a checkpoint folder whose report the controller never
    received (a worker died right after writing it) is not one a restart resumes from.
    """
    path, filesystem = storage(cfg)
    try:
        return Result.from_path(f"{path}/{name}", storage_filesystem=filesystem).checkpoint
    except RuntimeError:  # no such run, or no checkpoint registered yet
        return None
    except OSError as e:
        where = cfg.ray.storage_path or path
        raise ConnectionError(
            f"cannot read checkpoints at {where!r} (ray.storage_path, ray.storage_endpoint_url): {e}"
        ) from None


def checkpoint_step(checkpoint: Checkpoint) -> int:
    return int(checkpoint.path.rstrip("/").rsplit("step-", 1)[1])


def global_batch(cfg: PipelineConfig, num_images: int) -> int:
    """The configured batch, or every image a worker's equal share allows when there are fewer."""
    world = cfg.ray.num_workers
    return min(cfg.pretrain.batch_size, num_images // world * world)


def total_steps(cfg: PipelineConfig, num_images: int) -> int:
    """Optimiser steps of the run: each worker gets ``num_images // world`` images an epoch
    (Ray's equal split) and takes full batches of its share of the global batch."""
    world = cfg.ray.num_workers
    return num_images // world // (global_batch(cfg, num_images) // world) * cfg.pretrain.epochs


def finished_checkpoint(cfg: PipelineConfig, data: PreparedData) -> dict[str, Any] | None:
    """The final training state of this pretraining if a previous run finished it, else None."""
    checkpoint = latest_checkpoint(cfg, run_name(cfg, data))
    steps = total_steps(cfg, data.unlabeled.num_images)
    if checkpoint is None or checkpoint_step(checkpoint) != steps:
        return None
    with checkpoint.as_directory() as folder:
        return load_checkpoint(Path(folder) / CHECKPOINT_FILE)


def checkpoint_uri(cfg: PipelineConfig, name: str, step: int) -> str:
    """Where a run's checkpoint lives, as a user names it: a folder, or s3://bucket/prefix/..."""
    configured = cfg.ray.storage_path or ""
    base = configured if configured.startswith("s3://") else storage(cfg)[0]
    return f"{base}/{name}/{checkpoint_dir_name(step)}"


def scaling_config(cfg: PipelineConfig) -> ScalingConfig:
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = 1
    return ScalingConfig(
        num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu, resources_per_worker=resources
    )


def run_config(cfg: PipelineConfig, name: str) -> RunConfig:
    storage_path, filesystem = storage(cfg)
    return RunConfig(
        name=name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.keep_checkpoints),
    )


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the plain ``ssl_models`` loop, checkpoints reported to Ray.

    Every worker resumes from Ray's latest checkpoint when there is one; only rank 0 writes
    checkpoints and calls ``on_epoch_end`` (one MLflow run, not one per worker).
    """
    cfg: PipelineConfig = config["cfg"]
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    # Ray Train logs two INFO lines per checkpoint from each worker, Ray Data one per epoch; the
    # epoch lines say enough.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    streaming.quiet()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    num_images = config["num_images"]
    images = streaming.StreamedBatches(
        ray.train.get_dataset_shard("unlabeled"),
        rows=num_images // world,
        batch_size=global_batch(cfg, num_images),
        world=world,
        seed=cfg.seed,
        shuffle_rows=streaming.shuffle_rows(cfg, num_images // world),
        prefetch_batches=cfg.data.streaming.prefetch_batches,
    )
    encoder = build_encoder(cfg, config["mean"], config["std"])
    method = create_method(cfg.pretrain.method, encoder, cfg.pretrain.method_params)
    resume_from = None
    if checkpoint := ray.train.get_checkpoint():
        with checkpoint.as_directory() as folder:
            resume_from = load_checkpoint(Path(folder) / CHECKPOINT_FILE)
    resumed_from_step = resume_from["step"] if resume_from else 0
    ray.train.report({"step": resumed_from_step, "resumed_from_step": resumed_from_step})

    def report(state: dict[str, Any]) -> None:
        metrics = {"step": state["step"], "resumed_from_step": resumed_from_step}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                torch.save({**state, "config": cfg.model_dump(mode="json")}, Path(tmp) / CHECKPOINT_FILE)
                checkpoint = Checkpoint.from_directory(tmp)
            ray.train.report(
                metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(state["step"])
            )

    on_epoch_end: Callable[[dict[str, float]], None] | None = config.get("on_epoch_end")

    def epoch_end(row: dict[str, float]) -> None:
        progress_logger().info(
            "pretrain epoch %d/%d  loss %.4f  %.0f images/s  waiting for data %.0f%%",
            row["epoch"],
            cfg.pretrain.epochs,
            row["loss"],
            row["images_per_s"],
            100 * row["data_wait_share"],
        )
        if on_epoch_end:
            on_epoch_end(row)

    pretrain(
        method,
        images,
        cfg.augment.params(),
        cfg.pretrain.settings(cfg.seed),
        device=ray.train.torch.get_device(),
        resume_from=resume_from,
        on_checkpoint=report,
        on_epoch_end=epoch_end if rank == 0 else None,
    )


def pretrain_encoder(
    cfg: PipelineConfig,
    data: PreparedData,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
) -> PretrainOutput:
    """Pretrain (or resume, or return the finished run) on Ray; the encoder lands in the workspace.

    ``on_epoch_end`` runs in the rank-0 worker, so it must be picklable (e.g.
    ``tracking.EpochLogger``).
    """
    name = run_name(cfg, data)
    state = finished_checkpoint(cfg, data)
    if state is not None:  # nothing left to train: skip starting workers
        resumed_from_step = state["step"]
    else:
        connect(cfg)
        streaming.quiet()
        held = cfg.ray.num_workers * cfg.ray.cpus_per_worker
        streaming.require_spare_cpu(cfg, data.unlabeled.num_images, held, "ray.cpus_per_worker")
        images = streaming.image_dataset(cfg, data.unlabeled)
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={
                "cfg": cfg,
                "num_images": data.unlabeled.num_images,
                "mean": data.mean,
                "std": data.std,
                "on_epoch_end": on_epoch_end,
            },
            scaling_config=scaling_config(cfg),
            run_config=run_config(cfg, name),
            datasets={"unlabeled": images},
            dataset_config=DataConfig(execution_options=streaming.ingest_options(cfg)),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"pretraining run {name!r} finished without a checkpoint")
        with result.checkpoint.as_directory() as checkpoint_folder:
            state = load_checkpoint(Path(checkpoint_folder) / CHECKPOINT_FILE)
        resumed_from_step = int((result.metrics or {}).get("resumed_from_step", 0))
    folder = run_dir(cfg, data)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint_path = folder / CHECKPOINT_FILE
    torch.save(state, checkpoint_path)
    return PretrainOutput(
        checkpoint_path=str(checkpoint_path),
        encoder_path=str(save_encoder(state, folder / "encoder.pt", encoder_module(cfg))),
        steps=state["step"],
        resumed_from_step=resumed_from_step,
        history=state["history"],
        run_name=name,
        checkpoint_uri=checkpoint_uri(cfg, name, state["step"]),
    )


def encoder_module(cfg: PipelineConfig) -> str:
    return get_method(cfg.pretrain.method).encoder_module


def save_encoder(state: dict[str, Any], path: Path, module: str = "backbone") -> Path:
    """The encoder's weights (normalisation included) out of a training checkpoint's model: those of
    its ``module`` (the method's ``encoder_module``: DINO's teacher, every other method's backbone)."""
    prefix = f"{module}."
    encoder = {k.removeprefix(prefix): v for k, v in state["model"].items() if k.startswith(prefix)}
    torch.save(encoder, path)
    return path


def encoder_from_checkpoint(cfg: PipelineConfig, checkpoint_path: Path) -> Path:
    """The encoder of a pretraining checkpoint, checked against this config's model and images."""
    state = load_checkpoint(checkpoint_path)
    trained = state.get("config", {})
    checked = (("pretrain", "method"), ("model", "backbone"), ("data", "channels"), ("data", "image_size"))
    for section, key in checked:
        then, now = trained.get(section, {}).get(key), getattr(getattr(cfg, section), key)
        if then != now:
            raise ValueError(f"{section}.{key}: the pretraining run used {then!r}, this config says {now!r}")
    return save_encoder(state, checkpoint_path.with_name("encoder.pt"), encoder_module(cfg))
