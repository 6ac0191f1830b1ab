"""The flows: ``ssl_pretraining`` (data -> Ray Train), ``ssl_sweep`` (data + a pretraining run ->
Ray Tune sweep -> logged model) and ``ssl_pipeline`` (all of it, then the registry's promotion gate)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from tasks import data, plots, pretrain, promotion, registry, sweep, tracking, versioning
from tasks.config import PipelineConfig


def _task(fn, name: str):  # type: ignore[no-untyped-def]
    # Inputs are configs and file references: nothing worth hashing for a cache yet.
    return task(fn, name=name, cache_policy=NO_CACHE)


ingest_data = _task(data.ingest_sources, "ingest-data")
version_data = _task(versioning.version_datasets, "version-data")
prepare_data = _task(data.prepare_data, "prepare-data")
start_run = _task(tracking.start_run, "start-mlflow-run")
log_pretraining = _task(tracking.log_pretraining, "log-pretraining")
download_checkpoint = _task(tracking.download_checkpoint, "download-pretraining-checkpoint")
encoder_from_checkpoint = _task(pretrain.encoder_from_checkpoint, "encoder-from-checkpoint")
sweep_figures = _task(plots.sweep_figures, "sweep-figures")
log_sweep = _task(tracking.log_sweep, "log-sweep")
log_classifier = _task(tracking.log_classifier, "log-model")
evaluate_model = _task(promotion.evaluate_saved_predictions, "evaluate-model")
hash_weights = _task(promotion.weights_sha256, "hash-model-weights")
register_challenger = _task(registry.register_challenger, "register-challenger")
end_run = _task(tracking.end_run, "end-mlflow-run")


@task(name="pretrain", cache_policy=NO_CACHE)
def pretrain_encoder(
    cfg: PipelineConfig, prepared: data.PreparedData, run_id: str
) -> pretrain.PretrainOutput:
    """Ray Train workers pretrain; the rank-0 worker logs each epoch to the pipeline's MLflow run."""
    return pretrain.pretrain_encoder(cfg, prepared, on_epoch_end=tracking.epoch_logger(cfg, run_id))


@task(name="sweep", cache_policy=NO_CACHE)
def run_sweep(
    cfg: PipelineConfig, prepared: data.PreparedData, encoder_path: str, run_id: str
) -> sweep.SweepOutput:
    """Ray Tune trials; each one an MLflow child run of the sweep's run."""
    return sweep.run_sweep(cfg, prepared, encoder_path, tracking.trial_runs(cfg, run_id))


@dataclass(frozen=True)
class PretrainingResult:
    run_id: str
    data: data.PreparedData
    pretrain: pretrain.PretrainOutput


@dataclass(frozen=True)
class SweepResult:
    run_id: str
    pretrain_run_id: str
    data: data.PreparedData
    sweep: sweep.SweepOutput
    model_uri: str


@dataclass(frozen=True)
class PipelineResult:
    pretraining: PretrainingResult
    sweep: SweepResult
    promotion: registry.PromotionOutcome


def _versioned_data(cfg: PipelineConfig) -> data.PreparedData:
    versions = None
    if cfg.data.dvc.enabled:
        ingest_data(cfg)
        versions = version_data(cfg)
    return prepare_data(cfg, versions)


@contextmanager
def _mlflow_run(
    cfg: PipelineConfig, prepared: data.PreparedData, kind: str, tags: dict[str, str] | None = None
) -> Iterator[str]:
    """One MLflow run around the block; FAILED if the block raises (Ctrl-C included)."""
    run_id = start_run(cfg, prepared, kind, tags)
    try:
        yield run_id
    except BaseException:
        end_run(cfg, run_id, "FAILED")
        raise
    end_run(cfg, run_id)


def _pretraining(cfg: PipelineConfig, prepared: data.PreparedData) -> PretrainingResult:
    with _mlflow_run(cfg, prepared, "pretrain") as run_id:
        pretrained = pretrain_encoder(cfg, prepared, run_id)
        log_pretraining(cfg, run_id, pretrained)
    return PretrainingResult(run_id, prepared, pretrained)


@contextmanager
def _sweep(
    cfg: PipelineConfig, prepared: data.PreparedData, encoder_path: str, pretrain_run_id: str
) -> Iterator[SweepResult]:
    """The sweep's run: trials as child runs, figures, the best model logged; the caller may add
    to the run (registration) before it ends."""
    with _mlflow_run(cfg, prepared, "sweep", {"sweep.pretrain_run": pretrain_run_id}) as run_id:
        output = run_sweep(cfg, prepared, encoder_path, run_id)
        log_sweep(cfg, run_id, output, sweep_figures(output))
        model_uri = log_classifier(cfg, run_id, prepared, output.best_model_path, output.classes)
        yield SweepResult(run_id, pretrain_run_id, prepared, output, model_uri)


@flow(name="ssl_pretraining", validate_parameters=False)
def ssl_pretraining(cfg: PipelineConfig) -> PretrainingResult:
    """Data -> Ray pretraining, tracked as one MLflow run: what a cluster job runs."""
    return _pretraining(cfg, _versioned_data(cfg))


@flow(name="ssl_sweep", validate_parameters=False)
def ssl_sweep(cfg: PipelineConfig, pretrain_run_id: str) -> SweepResult:
    """Data + the encoder a pretraining run logged -> Ray Tune sweep, one parent MLflow run."""
    folder = cfg.workspace_path / "pretrain" / f"run-{pretrain_run_id}"
    checkpoint = download_checkpoint(cfg, pretrain_run_id, folder)
    encoder_path = encoder_from_checkpoint(cfg, checkpoint)
    prepared = _versioned_data(cfg)
    with _sweep(cfg, prepared, str(encoder_path), pretrain_run_id) as result:
        return result


@flow(name="ssl_pipeline", validate_parameters=False)
def ssl_pipeline(cfg: PipelineConfig) -> PipelineResult:
    prepared = _versioned_data(cfg)
    pretraining = _pretraining(cfg, prepared)
    encoder_path = pretraining.pretrain.encoder_path
    with _sweep(cfg, prepared, encoder_path, pretraining.run_id) as swept:
        tags = {
            **tracking.lineage_tags(cfg, prepared),
            "pretrain.run_id": pretraining.run_id,
            "sweep.run_id": swept.run_id,
            "sweep.best_cell": swept.sweep.best_cell,
        }
        output = swept.sweep
        evaluation = evaluate_model(output.figure_data_path, output.classes, prepared.test)
        weights = hash_weights(output.best_model_path)
        outcome = register_challenger(cfg, swept.model_uri, swept.run_id, tags, evaluation, weights)
    return PipelineResult(pretraining, swept, outcome)
