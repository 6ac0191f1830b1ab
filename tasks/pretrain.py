"""Self-supervised pretraining as a Ray Train run: data-parallel workers, checkpoints in storage.

The task only builds Ray's configs from the typed config (``scaling_config``,
``run_config``); each worker runs ``train_worker``, which is ``ssl_models.train.pretrain``
plus the hand-off of checkpoints to Ray. Local by default (``ray.init()`` on this machine,
checkpoints under the workspace); ``RAY_ADDRESS`` or ``ray.address`` joins a cluster and
``ray.storage_path: s3://...`` keeps checkpoints in S3, with no code change.

The run is named after the data and the pretraining config, so the same pretraining run
again resumes from its latest checkpoint (or returns at once when it had finished), and a
worker that dies is restarted from the latest checkpoint (``ray.max_failures``).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import ray
import ray.train
import torch
from pyarrow import fs as pafs
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ssl_models import Encoder, create_backbone, create_method
from ssl_models.train import load_checkpoint, pretrain, total_steps
from tasks.config import PipelineConfig
from tasks.data import PreparedData, load_dataset

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
    backbone = create_backbone(cfg.model.backbone, cfg.data.channels, cfg.data.image_size)
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


def connect(cfg: PipelineConfig) -> None:
    """Join the configured Ray cluster (``ray.address``, else ``RAY_ADDRESS``), or start one here.

    An unreachable address fails at once, naming the setting; Ray itself would retry for minutes.
    """
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    if address and address not in ("auto", "local"):
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except (OSError, ValueError) as e:
            raise ConnectionError(
                f"cannot reach the Ray cluster at {address!r} (ray.address or RAY_ADDRESS): {e}"
            ) from None
    # Ray's own INFO/WARNING lines (and, without the dashboard package, a state-API warning
    # every few seconds) drown the training progress; errors still show.
    ray.init(
        address=address,
        include_dashboard=False,
        logging_level=logging.WARNING,
        logging_config=ray.LoggingConfig(log_level="ERROR"),
    )


def storage(cfg: PipelineConfig) -> tuple[str, pafs.FileSystem | None]:
    """Ray's ``storage_path`` and, for an S3-compatible endpoint, the filesystem to reach it.

    PyArrow ignores ``AWS_ENDPOINT_URL_S3``, so an endpoint is passed as ``endpoint_override``;
    credentials come from the environment (or an instance profile), never from the config.
    """
    path = cfg.ray.storage_path
    if not path:
        return str((cfg.workspace_path / "ray").resolve()), None
    if not path.startswith("s3://"):
        return str(Path(path).resolve()), None
    if not cfg.ray.storage_endpoint_url:
        return path, None
    endpoint = urlparse(cfg.ray.storage_endpoint_url)
    keys = {}
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        # The driver's keys travel with the filesystem to workers whose environment lacks them.
        keys = {
            "access_key": os.environ["AWS_ACCESS_KEY_ID"],
            "secret_key": os.environ["AWS_SECRET_ACCESS_KEY"],
            "session_token": os.environ.get("AWS_SESSION_TOKEN"),
        }
    filesystem = pafs.S3FileSystem(
        endpoint_override=endpoint.netloc,
        scheme=endpoint.scheme or "https",
        region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        **keys,
    )
    return path.removeprefix("s3://"), filesystem


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


def finished_checkpoint(cfg: PipelineConfig, data: PreparedData) -> dict[str, Any] | None:
    """The final training state of this pretraining if a previous run finished it, else None."""
    checkpoint = latest_checkpoint(cfg, run_name(cfg, data))
    steps = total_steps(data.unlabeled.num_images, cfg.pretrain.settings(cfg.seed))
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
    # Ray Train logs two INFO lines per checkpoint from each worker; the epoch lines say enough.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    rank = ray.train.get_context().get_world_rank()
    images = torch.from_numpy(ray.get(config["images"]).copy())  # the object store's copy is read-only
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
            "pretrain epoch %d/%d  loss %.4f  %.0f images/s",
            row["epoch"],
            cfg.pretrain.epochs,
            row["loss"],
            row["images_per_s"],
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
        images = load_dataset(data.unlabeled).images
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={
                "cfg": cfg,
                "images": ray.put(images.numpy()),
                "mean": data.mean,
                "std": data.std,
                "on_epoch_end": on_epoch_end,
            },
            scaling_config=scaling_config(cfg),
            run_config=run_config(cfg, name),
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
        encoder_path=str(save_encoder(state, folder / "encoder.pt")),
        steps=state["step"],
        resumed_from_step=resumed_from_step,
        history=state["history"],
        run_name=name,
        checkpoint_uri=checkpoint_uri(cfg, name, state["step"]),
    )


def save_encoder(state: dict[str, Any], path: Path) -> Path:
    """The encoder's weights (normalisation included) out of a training checkpoint's model."""
    encoder = {k.removeprefix("backbone."): v for k, v in state["model"].items() if k.startswith("backbone.")}
    torch.save(encoder, path)
    return path


def encoder_from_checkpoint(cfg: PipelineConfig, checkpoint_path: Path) -> Path:
    """The encoder of a pretraining checkpoint, checked against this config's model and images."""
    state = load_checkpoint(checkpoint_path)
    trained = state.get("config", {})
    for section, key in (("model", "backbone"), ("data", "channels"), ("data", "image_size")):
        then, now = trained.get(section, {}).get(key), getattr(getattr(cfg, section), key)
        if then != now:
            raise ValueError(f"{section}.{key}: the pretraining run used {then!r}, this config says {now!r}")
    return save_encoder(state, checkpoint_path.with_name("encoder.pt"))
