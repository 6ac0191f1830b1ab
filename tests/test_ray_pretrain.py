"""Pretraining on Ray Train, with real workers on this machine and real Fashion-MNIST streamed
from the dataset's shards through Ray Data.

Two gloo workers train on their dataset shards; a worker killed mid-run is restarted from the
latest checkpoint (in S3 on SeaweedFS) and ends where an uninterrupted run ends, with one MLflow
run holding each epoch once. (A driver killed mid-run and resumed by the same command: the
slow tests of tests/test_pipeline.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from tasks import tracking
from tasks.config import PipelineConfig, load_config
from tasks.data import PreparedData, ingest_and_prepare
from tasks.pretrain import (
    CHECKPOINT_FILE,
    checkpoint_step,
    latest_checkpoint,
    pretrain_encoder,
    run_name,
)
from tests.conftest import REPO, free_port


def config(workspace: Path, *overrides: str) -> PipelineConfig:
    """The smoke profile, 256 images in batches of 64 (4 steps an epoch), on 2 workers of 1 CPU."""
    return load_config(
        REPO / "params.yaml",
        "smoke",
        [
            f"workspace={workspace}",
            "data.dvc.enabled=false",
            "data.unlabeled_limit=256",
            "pretrain.batch_size=64",
            "ray.num_workers=2",
            "ray.cpus_per_worker=1",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, float]]:
    """The history of the slow tests' pretraining (4 epochs, a checkpoint every 2 steps) run without
    interruption: what a run whose worker was killed must end with."""
    cfg = config(
        tmp_path_factory.mktemp("uninterrupted"), "pretrain.epochs=4", "pretrain.checkpoint_every_steps=2"
    )
    return pretrain_encoder(cfg, ingest_and_prepare(cfg)).history


def assert_same_losses(history: list[dict[str, float]], expected: list[dict[str, float]]) -> None:
    """Equal up to float32 rounding in another order (DDP's bucketed all-reduce), which AdamW's
    early steps amplify to ~1e-4; a wrong batch, view or restored state moves the loss by whole
    percents. ``tests/test_train.py`` checks a resumed streamed run exactly, in one process."""
    assert [row["epoch"] for row in history] == [row["epoch"] for row in expected]
    for row, want in zip(history, expected, strict=True):
        assert row["loss"] == pytest.approx(want["loss"], rel=1e-3), row["epoch"]
        assert row["lr"] == pytest.approx(want["lr"], rel=1e-6)


def only_run(cfg: PipelineConfig) -> tuple[MlflowClient, str]:
    client = tracking.client_for(cfg)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0].info.run_id


def assert_each_epoch_logged_once(client: MlflowClient, run_id: str, history: list[dict[str, float]]) -> None:
    for key in ("loss", "lr", "images_per_s"):
        logged = client.get_metric_history(run_id, f"pretrain_{key}")
        assert sorted(m.step for m in logged) == [row["epoch"] for row in history], key
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "pretrain_loss")}
    assert losses == pytest.approx({row["epoch"]: row["loss"] for row in history})


def train_worker_processes() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if cmdline.startswith("ray::RayTrainWorker"):
            found.append(process)
    return found


class KillAWorkerAfterACheckpoint(threading.Thread):
    """Kills one Ray Train worker (SIGKILL) as soon as Ray has registered a checkpoint of the run."""

    def __init__(self, cfg: PipelineConfig, data: PreparedData):
        super().__init__(daemon=True)
        self.cfg, self.name = cfg, run_name(cfg, data)
        self.killed_after_step: int | None = None
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            checkpoint = latest_checkpoint(self.cfg, self.name)
            workers = train_worker_processes()
            if checkpoint and workers:
                self.killed_after_step = checkpoint_step(checkpoint)
                workers[-1].kill()
                return
            time.sleep(0.05)


def test_two_workers_train_on_their_shards_and_log_one_mlflow_run(
    ray_cluster: str, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    cfg = config(tmp_path / "ws")
    data = ingest_and_prepare(cfg)
    run_id = tracking.start_run(cfg, data)
    out = pretrain_encoder(cfg, data, on_epoch_end=tracking.epoch_logger(cfg, run_id))

    # 256 images over 2 workers, 32 each per step of the global batch of 64: 4 steps an epoch.
    assert out.steps == 8 and out.resumed_from_step == 0
    assert out.history[1]["loss"] < out.history[0]["loss"]
    assert all(0 <= row["data_wait_share"] < 1 for row in out.history)
    client, only = only_run(cfg)
    assert only == run_id
    assert_each_epoch_logged_once(client, run_id, out.history)

    state = torch.load(out.checkpoint_path, weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "step", "config"} <= state.keys()
    assert state["config"]["pretrain"]["method"] == cfg.pretrain.method
    assert Path(out.checkpoint_uri, CHECKPOINT_FILE).exists()

    # The same pretraining again: the finished checkpoint is found in storage, no worker starts.
    start = time.perf_counter()
    again = pretrain_encoder(cfg, data)
    assert time.perf_counter() - start < 5
    assert again.steps == again.resumed_from_step == 8 and again.history == out.history


@pytest.mark.slow
def test_checkpoints_in_s3_survive_a_killed_worker_and_serve_a_rerun(
    ray_cluster: str,
    uninterrupted: list[dict[str, float]],
    s3_server,
    fashion_mnist_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    s3 = s3_server.client()
    s3.create_bucket(Bucket="checkpoints")
    cfg = config(
        tmp_path / "ws",
        "pretrain.epochs=4",
        "pretrain.checkpoint_every_steps=2",
        "ray.storage_path=s3://checkpoints/ray",
        f"ray.storage_endpoint_url={s3_server.endpoint_url}",
    )
    data = ingest_and_prepare(cfg)
    run_id = tracking.start_run(cfg, data)

    killer = KillAWorkerAfterACheckpoint(cfg, data)
    killer.start()
    try:
        out = pretrain_encoder(cfg, data, on_epoch_end=tracking.epoch_logger(cfg, run_id))
    finally:
        killer.done.set()
    tracking.log_pretraining(cfg, run_id, out)
    tracking.end_run(cfg, run_id)
    assert killer.killed_after_step is not None, "no worker was killed: the run finished first"
    # Resumed from the latest checkpoint when the worker died: at most one interval (2 steps) lost.
    assert out.resumed_from_step >= killer.killed_after_step > 0 and out.steps == 16
    assert out.checkpoint_uri == f"s3://checkpoints/ray/{run_name(cfg, data)}/step-00000016"
    assert not (tmp_path / "ws" / "ray").exists()  # nothing of the run's state is local
    assert_same_losses(out.history, uninterrupted)
    client, only = only_run(cfg)
    assert only == run_id and client.get_run(run_id).info.status == "FINISHED"
    assert_each_epoch_logged_once(client, run_id, out.history)

    # A new machine (empty workspace) running the same pretraining gets the result from S3.
    fresh = config(
        tmp_path / "fresh",
        *[
            f"{k}={v}"
            for k, v in (
                ("pretrain.epochs", 4),
                ("pretrain.checkpoint_every_steps", 2),
                ("ray.storage_path", "s3://checkpoints/ray"),
                ("ray.storage_endpoint_url", s3_server.endpoint_url),
            )
        ],
    )
    again = pretrain_encoder(fresh, ingest_and_prepare(fresh))
    assert again.steps == again.resumed_from_step == 16
    assert (
        torch.load(again.encoder_path, weights_only=True).keys()
        == torch.load(out.encoder_path, weights_only=True).keys()
    )


def test_an_unreachable_ray_cluster_fails_naming_the_setting(fashion_mnist_dir: Path, tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "flows.cli", "pretrain", "--config", str(REPO / "params.yaml")]
    command += [
        "--profile",
        "smoke",
        "--set",
        f"workspace={tmp_path / 'ws'}",
        "--set",
        "data.dvc.enabled=false",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "RAY_ADDRESS"))}
    env.update(PYTHONPATH=str(REPO), COLUMNS="200", RAY_ADDRESS=address)
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 4, out.stdout + out.stderr
    assert f"cannot reach the Ray cluster at '{address}' (ray.address or RAY_ADDRESS)" in out.stdout
    assert not (tmp_path / "ws" / "ray").exists()
    assert "Starting temporary server" not in out.stdout + out.stderr  # checked before any work


def test_unreachable_checkpoint_storage_fails_naming_the_setting(
    fashion_mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {"AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    endpoint = f"http://127.0.0.1:{free_port()}"
    cfg = config(
        tmp_path / "ws", "ray.storage_path=s3://checkpoints/ray", f"ray.storage_endpoint_url={endpoint}"
    )
    with pytest.raises(
        ConnectionError, match=r"'s3://checkpoints/ray' \(ray.storage_path, ray.storage_endpoint_url\)"
    ):
        pretrain_encoder(cfg, ingest_and_prepare(cfg))
