"""MLflow tracking: one run per pipeline run, with params, metrics, artifacts and the model.

Every call names its run explicitly (``MlflowClient`` and ``run_id``), so nothing depends on
MLflow's thread-local active run while steps run in Prefect's workers.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID

from ssl_models.classifier import ClassifierSpec
from tasks.config import PipelineConfig
from tasks.data import DatasetRef, PreparedData
from tasks.pretrain import CHECKPOINT_FILE, PretrainOutput
from tasks.promotion import HeldOutPredictions
from tasks.serving import log_image_classifier
from tasks.sweep import SweepOutput


def tracking_uri(cfg: PipelineConfig) -> str:
    """The configured URI, or SQLite in the workspace (the embedded default).

    Not ``MLFLOW_TRACKING_URI``: ``mlflow.set_tracking_uri`` sets that variable in-process,
    so a second configuration would silently inherit the first one's store.
    """
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    return f"sqlite:///{(cfg.workspace_path / 'mlflow.db').resolve()}"


def client_for(cfg: PipelineConfig) -> MlflowClient:
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:"):
        cfg.workspace_path.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri, registry_uri=uri)


def _experiment_id(client: MlflowClient, cfg: PipelineConfig) -> str:
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment:
        return experiment.experiment_id
    location = None
    if tracking_uri(cfg).startswith("sqlite:"):
        location = (cfg.workspace_path / "mlartifacts").resolve().as_uri()
    return client.create_experiment(cfg.tracking.experiment, artifact_location=location)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if not isinstance(value, str) else value
    return flat


def git_commit() -> str | None:
    """The commit of the checkout this code runs from (not of the working directory), if any."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def lineage_tags(cfg: PipelineConfig, data: PreparedData) -> dict[str, str]:
    """The tags that tie a run or model version to its data, code and config."""
    tags = {f"data.{name}.sha256": digest for name, digest in data.digests().items()}
    tags.update({f"data.{r.name}.dvc_md5": r.dvc_md5 for r in data.refs() if r.dvc_md5})
    tags.update(
        {
            "config.sha256": cfg.digest(),
            "ssl.method": cfg.pretrain.method,
            "ssl.backbone": cfg.model.backbone,
            "pipeline.profile": cfg.profile,
        }
    )
    if commit := git_commit():
        tags["git.commit"] = commit
    return tags


def _dataset_input(cfg: PipelineConfig, ref: DatasetRef) -> DatasetInput:
    """An MLflow dataset input: the DVC version when the data is DVC-tracked, else the content hash."""
    if ref.dvc_md5:
        source_type, source = "dvc", f"{cfg.data.dvc.folder}/{ref.name}@{ref.dvc_md5}"
    else:
        source_type, source = "local", ref.path
    profile = json.dumps({"num_images": ref.num_images, "sha256": ref.digest, "classes": list(ref.classes)})
    dataset = Dataset(ref.name, ref.dvc_md5 or ref.digest[:32], source_type, source, profile=profile[:4000])
    context = "training" if ref.name != "test" else "evaluation"
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


def start_run(
    cfg: PipelineConfig, data: PreparedData, kind: str = "pretrain", tags: dict[str, str] | None = None
) -> str:
    """A run holding the whole config, the data versions as inputs and the lineage tags."""
    client = client_for(cfg)
    run = client.create_run(
        _experiment_id(client, cfg),
        run_name=f"{kind}-{cfg.pretrain.method}-{cfg.model.backbone}-{cfg.profile}",
        tags={**lineage_tags(cfg, data), "pipeline.step": kind, **(tags or {})},
    )
    params = _flatten(cfg.model_dump(mode="json"))
    params.update(
        {f"data.{r.name}.num_images": str(r.num_images) for r in (data.unlabeled, data.labeled, data.test)}
    )
    client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
    client.log_inputs(run.info.run_id, datasets=[_dataset_input(cfg, ref) for ref in data.refs()])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(cfg.model_dump_json(indent=2))
        client.log_artifact(run.info.run_id, str(path))
    return run.info.run_id


@dataclass(frozen=True)
class EpochLogger:
    """Logs pretraining epochs to one MLflow run from wherever training runs.

    Picklable (a URI and a run id), so Ray's rank-0 worker calls it: one run per
    pretraining, not one per worker. An epoch already in the run (logged before a worker
    died and recomputed, identically, after the restart) is not logged twice.
    """

    uri: str
    run_id: str

    def __call__(self, row: dict[str, float]) -> None:
        self.log([row])

    def log(self, rows: list[dict[str, float]]) -> None:
        """Log the rows whose epoch the run does not hold yet (one read, one write)."""
        client = MlflowClient(self.uri)
        logged = {m.step for m in client.get_metric_history(self.run_id, "pretrain_loss")}
        now = int(time.time() * 1000)
        metrics = [
            Metric(f"pretrain_{key}", float(row[key]), now, int(row["epoch"]))
            for row in rows
            if int(row["epoch"]) not in logged
            for key in ("loss", "lr", "images_per_s")
        ]
        if metrics:
            client.log_batch(self.run_id, metrics=metrics)


def logged_epochs(cfg: PipelineConfig, run_id: str) -> int:
    """How many pretraining epochs the run holds (what the rank-0 worker logged so far)."""
    return len(client_for(cfg).get_metric_history(run_id, "pretrain_loss"))


def epoch_logger(cfg: PipelineConfig, run_id: str) -> EpochLogger:
    client_for(cfg)
    return EpochLogger(tracking_uri(cfg), run_id)


def log_pretraining(cfg: PipelineConfig, run_id: str, out: PretrainOutput) -> None:
    """The pretraining's outcome: steps, where it resumed from, and its final checkpoint.

    Epochs missing from the run (a pretraining that had finished before this run, so no
    worker logged them) are logged here.
    """
    epoch_logger(cfg, run_id).log(out.history)
    client = client_for(cfg)
    client.log_batch(
        run_id,
        metrics=[Metric("pretrain_steps", float(out.steps), 0, 0)],
        tags=[
            RunTag("pretrain.resumed_from_step", str(out.resumed_from_step)),
            RunTag("pretrain.ray_run", out.run_name),
            RunTag("pretrain.checkpoint_uri", out.checkpoint_uri),
        ],
    )
    client.log_artifact(run_id, out.checkpoint_path, "pretrain")


@dataclass(frozen=True)
class TrialRuns:
    """MLflow child runs of one sweep run: one per Ray Tune trial, written by the driver."""

    uri: str
    experiment_id: str
    parent_run_id: str

    def start(self, name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        client = MlflowClient(self.uri)
        run = client.create_run(
            self.experiment_id, run_name=name, tags={MLFLOW_PARENT_RUN_ID: self.parent_run_id, **tags}
        )
        flat = _flatten(params)
        client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in flat.items()])
        return run.info.run_id

    def log(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        MlflowClient(self.uri).log_batch(
            run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()]
        )

    def end(self, run_id: str, status: str, tags: dict[str, str]) -> None:
        client = MlflowClient(self.uri)
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        client.set_terminated(run_id, status)


def trial_runs(cfg: PipelineConfig, parent_run_id: str) -> TrialRuns:
    client = client_for(cfg)
    return TrialRuns(tracking_uri(cfg), client.get_run(parent_run_id).info.experiment_id, parent_run_id)


def log_sweep(cfg: PipelineConfig, run_id: str, output: SweepOutput, figures: list[Path]) -> None:
    """Per cell mean/std and gains, the selected configs, the figures; selected trials tagged."""
    client = client_for(cfg)
    params = {f"best.{c.cell}.{k}": json.dumps(v) for c in output.cells for k, v in c.params.items()}
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, 0, 0) for k, v in output.metrics().items()],
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag("sweep.name", output.name), RunTag("sweep.best_cell", output.best_cell)],
    )
    selected = {run_id for c in output.cells for run_id in c.run_ids}
    for trial in output.trials:
        if trial.run_id and trial.test_accuracy is not None:
            client.set_tag(trial.run_id, "sweep.selected", str(trial.run_id in selected).lower())
    for path in figures:
        client.log_artifact(run_id, str(path), "sweep")
    client.log_artifact(run_id, str(Path(output.folder) / "label_splits.json"), "sweep")
    client.log_artifact(run_id, str(output.test_predictions_path), HeldOutPredictions.ARTIFACT_DIR)


def log_classifier(
    cfg: PipelineConfig,
    run_id: str,
    data: PreparedData,
    state_path: str | Path,
    classes: tuple[str, ...],
    backbone: str,
) -> str:
    """Log encoder + linear head as the image pyfunc (``tasks.serving``); returns its ``models:/`` URI."""
    client_for(cfg)
    spec = ClassifierSpec(
        backbone, cfg.data.channels, cfg.data.image_size, data.mean, data.std, tuple(classes)
    )
    return log_image_classifier(run_id, state_path, spec)


def download_checkpoint(cfg: PipelineConfig, run_id: str, folder: Path) -> Path:
    """The final pretraining checkpoint a pipeline run logged (``pretrain/checkpoint.pt``)."""
    client = client_for(cfg)
    try:
        client.get_run(run_id)
    except MlflowException as e:
        raise ValueError(f"--pretrain-run {run_id}: no such MLflow run at {tracking_uri(cfg)}") from e
    folder.mkdir(parents=True, exist_ok=True)
    try:
        path = client.download_artifacts(run_id, f"pretrain/{CHECKPOINT_FILE}", str(folder))
    except (MlflowException, OSError) as e:
        raise ValueError(
            f"--pretrain-run {run_id}: the run has no pretraining checkpoint (pretrain/{CHECKPOINT_FILE})"
        ) from e
    return Path(path)


def end_run(cfg: PipelineConfig, run_id: str, status: str = "FINISHED") -> None:
    client_for(cfg).set_terminated(run_id, status)
