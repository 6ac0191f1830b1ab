"""The ``ssl_pipeline`` flow: data -> pretraining -> evaluation -> MLflow run -> registered model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from tasks import data, evaluate, pretrain, registry, tracking, versioning
from tasks.config import PipelineConfig


@dataclass(frozen=True)
class PipelineResult:
    run_id: str
    model_version: str
    champion_version: str
    evaluation: evaluate.EvaluationOutput
    data: data.PreparedData
    pretrain: pretrain.PretrainOutput


def _task(fn, name: str):  # type: ignore[no-untyped-def]
    # Inputs are configs and file references: nothing worth hashing for a cache yet.
    return task(fn, name=name, cache_policy=NO_CACHE)


ingest_data = _task(data.ingest_sources, "ingest-data")
version_data = _task(versioning.version_datasets, "version-data")
prepare_data = _task(data.prepare_data, "prepare-data")
start_run = _task(tracking.start_run, "start-mlflow-run")
log_pretraining = _task(tracking.log_pretraining, "log-pretraining")
evaluate_encoder = _task(evaluate.evaluate_encoder, "evaluate")
log_evaluation = _task(tracking.log_evaluation, "log-evaluation")
log_classifier = _task(tracking.log_classifier, "log-model")
register_model = _task(registry.register_model, "register-model")
alias_champion_if_none = _task(registry.alias_champion_if_none, "alias-champion-if-none")
end_run = _task(tracking.end_run, "end-mlflow-run")


@task(name="pretrain", cache_policy=NO_CACHE)
def pretrain_encoder(
    cfg: PipelineConfig, prepared: data.PreparedData, run_id: str
) -> pretrain.PretrainOutput:
    """Ray Train workers pretrain; the rank-0 worker logs each epoch to the pipeline's MLflow run."""
    return pretrain.pretrain_encoder(cfg, prepared, on_epoch_end=tracking.epoch_logger(cfg, run_id))


@dataclass(frozen=True)
class PretrainingResult:
    run_id: str
    data: data.PreparedData
    pretrain: pretrain.PretrainOutput


def _versioned_data(cfg: PipelineConfig) -> data.PreparedData:
    versions = None
    if cfg.data.dvc.enabled:
        ingest_data(cfg)
        versions = version_data(cfg)
    return prepare_data(cfg, versions)


@contextmanager
def _mlflow_run(cfg: PipelineConfig, prepared: data.PreparedData) -> Iterator[str]:
    """One MLflow run around the block; FAILED if the block raises (Ctrl-C included)."""
    run_id = start_run(cfg, prepared)
    try:
        yield run_id
    except BaseException:
        end_run(cfg, run_id, "FAILED")
        raise
    end_run(cfg, run_id)


@flow(name="ssl_pretraining", validate_parameters=False)
def ssl_pretraining(cfg: PipelineConfig) -> PretrainingResult:
    """Data -> Ray pretraining, tracked as one MLflow run: what a cluster job runs."""
    prepared = _versioned_data(cfg)
    with _mlflow_run(cfg, prepared) as run_id:
        pretrained = pretrain_encoder(cfg, prepared, run_id)
        log_pretraining(cfg, run_id, pretrained)
    return PretrainingResult(run_id, prepared, pretrained)


@flow(name="ssl_pipeline", validate_parameters=False)
def ssl_pipeline(cfg: PipelineConfig) -> PipelineResult:
    prepared = _versioned_data(cfg)
    with _mlflow_run(cfg, prepared) as run_id:
        pretrained = pretrain_encoder(cfg, prepared, run_id)
        log_pretraining(cfg, run_id, pretrained)
        evaluation = evaluate_encoder(cfg, prepared, pretrained)
        log_evaluation(cfg, run_id, evaluation)
        model_uri = log_classifier(cfg, run_id, prepared, evaluation)
        version = register_model(cfg, model_uri, run_id, tracking.lineage_tags(cfg, prepared))
        champion = alias_champion_if_none(cfg, version)
    return PipelineResult(run_id, version, champion, evaluation, prepared, pretrained)
