"""The flows: ``ssl_pretraining`` (data -> Ray Train), ``ssl_sweep`` (data + a pretraining run ->
Ray Tune sweep -> logged model) and ``ssl_pipeline`` (all of it, then the registry's promotion gate).

Each stage is a Prefect task with retries on transient failures and a timeout
(``orchestration``). The data step always runs: it computes the content hashes the later
stages are cached on. ``prepare-data``, ``pretraining`` and ``sweep`` are cached on those hashes,
the config sections they read and the code (``tasks.orchestration``), so a rerun after a crash
resumes at the first unfinished stage (pretraining itself resumes from its Ray checkpoint) and a
rerun on unchanged inputs goes straight to the registry, which registers nothing new. The
registry writes run in a Prefect transaction: if the gate fails, the registration is undone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import Transaction, get_transaction, transaction

from tasks import (
    data,
    evaluate,
    orchestration,
    plots,
    pretrain,
    progress,
    promotion,
    registry,
    sweep,
    tracking,
    versioning,
)
from tasks.config import PipelineConfig


def _task(fn, name: str):  # type: ignore[no-untyped-def]
    # Steps inside a stage: the stage is what is cached and retried.
    return task(fn, name=name, cache_policy=NO_CACHE)


ingest_data = _task(data.ingest_sources, "ingest-data")
version_data = _task(versioning.version_datasets, "version-data")
prepare_data = _task(data.prepare_data, "prepare-data")
ingest_and_prepare = _task(data.ingest_and_prepare, "ingest-and-prepare-data")
locate_remote_shards = _task(versioning.with_remote_shards, "locate-remote-shards")
start_run = _task(tracking.start_run, "start-mlflow-run")
log_pretraining = _task(tracking.log_pretraining, "log-pretraining")
download_checkpoint = _task(tracking.download_checkpoint, "download-pretraining-checkpoint")
encoder_from_checkpoint = _task(pretrain.encoder_from_checkpoint, "encoder-from-checkpoint")
sweep_figures = _task(plots.sweep_figures, "sweep-figures")
log_sweep = _task(tracking.log_sweep, "log-sweep")
log_classifier = _task(tracking.log_classifier, "log-model")
evaluate_model = _task(promotion.evaluate_saved_predictions, "evaluate-model")
check_label_budgets = _task(evaluate.check_label_budgets, "check-label-budgets")
hash_weights = _task(promotion.weights_sha256, "hash-model-weights")
champion_data = _task(registry.unchanged_since_champion, "compare-with-champion-data")
end_run = _task(tracking.end_run, "end-mlflow-run")


@task(name="pretrain", cache_policy=NO_CACHE)
def pretrain_encoder(
    cfg: PipelineConfig, prepared: data.PreparedData, run_id: str
) -> pretrain.PretrainOutput:
    """Ray Train workers pretrain; the rank-0 worker logs each epoch to the pipeline's MLflow run,
    which a thread here reads for the progress bar."""
    with _epoch_progress(cfg, run_id):
        return pretrain.pretrain_encoder(cfg, prepared, on_epoch_end=tracking.epoch_logger(cfg, run_id))


@contextmanager
def _epoch_progress(cfg: PipelineConfig, run_id: str, every: float = 2.0) -> Iterator[None]:
    """Report the epochs the MLflow run holds every ``every`` seconds, when anyone listens."""
    if not progress.listened():
        yield
        return
    stop = threading.Event()

    def poll() -> None:
        while True:
            with suppress(Exception):  # a progress bar must never fail the run
                progress.report("pretrain epochs", tracking.logged_epochs(cfg, run_id), cfg.pretrain.epochs)
            if stop.wait(every):
                return

    thread = threading.Thread(target=poll, name="epoch-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


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
    data: data.PreparedData
    pretraining: PretrainingResult | None = None
    sweep: SweepResult | None = None
    promotion: registry.PromotionOutcome | None = None
    skipped: str | None = None  # why a run that needs new data ended after the data step


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


def _store(cfg: PipelineConfig) -> list[str]:
    """What a cached stage's MLflow runs live in: another store means other runs."""
    return [tracking.tracking_uri(cfg), cfg.tracking.experiment]


def _cached(stage: Any, cfg: PipelineConfig, name: str, key: str, refresh: bool, *args: Any) -> Any:
    """Run ``stage`` with its cache key; recompute once if what the cached result names is gone."""
    result = stage.with_options(**orchestration.stage_options(cfg, name, key, refresh))(cfg, *args)
    if not _files_exist(result):
        result = stage.with_options(**orchestration.stage_options(cfg, name, key, True))(cfg, *args)
    return result


def _files_exist(result: data.PreparedData | PretrainingResult | SweepResult) -> bool:
    """Whether the workspace still holds the files a (cached) result names."""
    if isinstance(result, data.PreparedData):
        paths = [ref.path for ref in result.refs()]
    elif isinstance(result, PretrainingResult):
        paths = [result.pretrain.encoder_path, result.pretrain.checkpoint_path]
    else:
        sweep = result.sweep
        paths = [str(sweep.best_model_path), str(sweep.test_predictions_path), str(sweep.test_features_path)]
    return all(Path(p).exists() for p in paths)


@task(name="data", cache_policy=NO_CACHE)
def data_stage(cfg: PipelineConfig, refresh: bool = False) -> data.PreparedData:
    """Ingest what is new into the dataset folders, version them (DVC), and describe them, cached
    on the DVC hashes."""
    if not cfg.data.dvc.enabled:
        return ingest_and_prepare(cfg)
    ingest_data(cfg)
    versions = version_data(cfg)
    key = orchestration.stage_key("prepare-data", versions, cfg.model_dump(mode="json", include={"data"}))
    prepared: data.PreparedData = _cached(prepare_data, cfg, "data", key, refresh, versions)
    if cfg.data.streaming.shards_from == "remote":
        prepared = locate_remote_shards(cfg, prepared)
    return prepared


@task(name="pretraining", cache_policy=NO_CACHE)
def pretraining_stage(cfg: PipelineConfig, prepared: data.PreparedData) -> PretrainingResult:
    """Pretraining as one MLflow run (resumed from Ray's checkpoint if one was left)."""
    with _mlflow_run(cfg, prepared, "pretrain") as run_id:
        pretrained = pretrain_encoder(cfg, prepared, run_id)
        log_pretraining(cfg, run_id, pretrained)
    return PretrainingResult(run_id, prepared, pretrained)


@task(name="sweep-and-log-model", cache_policy=NO_CACHE)
def sweep_stage(
    cfg: PipelineConfig, prepared: data.PreparedData, encoder_path: str, pretrain_run_id: str
) -> SweepResult:
    """The sweep's run: trials as child runs, figures, the best model logged as a pyfunc."""
    with _mlflow_run(cfg, prepared, "sweep", {"sweep.pretrain_run": pretrain_run_id}) as run_id:
        output = run_sweep(cfg, prepared, encoder_path, run_id)
        log_sweep(cfg, run_id, output, sweep_figures(output))
        model_uri = log_classifier(
            cfg, run_id, prepared, output.best_model_path, output.classes, output.best_backbone
        )
    return SweepResult(run_id, pretrain_run_id, prepared, output, model_uri)


def _pretraining(
    cfg: PipelineConfig, prepared: data.PreparedData, refresh: bool = False
) -> PretrainingResult:
    key = orchestration.stage_key(
        "pretraining",
        pretrain.run_name(cfg, prepared),  # the pretraining config and the unlabeled data's hash
        cfg.ray.num_workers,
        cfg.ray.use_gpu,
        _store(cfg),
    )
    result: PretrainingResult = _cached(pretraining_stage, cfg, "pretrain", key, refresh, prepared)
    return result


def _sweep(
    cfg: PipelineConfig,
    prepared: data.PreparedData,
    pretraining: PretrainingResult,
    refresh: bool = False,
) -> SweepResult:
    key = orchestration.stage_key(
        "sweep",
        prepared.digests(),
        cfg.digest("seed", "model", "evaluate"),
        pretraining.run_id,  # the encoder: a recomputed pretraining is a new run
        _store(cfg),
    )
    encoder = pretraining.pretrain.encoder_path
    result: SweepResult = _cached(
        sweep_stage, cfg, "sweep", key, refresh, prepared, encoder, pretraining.run_id
    )
    return result


@task(name="register-version", cache_policy=NO_CACHE)
def register_version(
    cfg: PipelineConfig,
    model_uri: str,
    run_id: str,
    tags: dict[str, str],
    evaluation: promotion.ModelEvaluation,
    weights_sha256: str,
) -> registry.Registration:
    """A new version with alias ``challenger`` (undone by itself if a write fails)."""
    with registry.change(cfg) as change:
        registration = registry.register_version(change, model_uri, run_id, tags, evaluation, weights_sha256)
    get_transaction().set("undo", change.log)  # type: ignore[union-attr]
    return registration


@task(name="promotion-gate", cache_policy=NO_CACHE)
def promotion_gate(cfg: PipelineConfig, registration: registry.Registration) -> registry.PromotionOutcome:
    """The gate's decision recorded on the version, ``champion`` moved last if it promotes."""
    with registry.change(cfg) as change:
        outcome = registry.gate(change, cfg, registration)
    get_transaction().set("undo", change.log)  # type: ignore[union-attr]
    return outcome


@register_version.on_rollback
@promotion_gate.on_rollback
def _undo_registry_writes(txn: Transaction) -> None:
    """A later step of the transaction failed: undo what this step wrote to the registry."""
    registry.undo(txn.get("undo"))


def register_and_gate(
    cfg: PipelineConfig,
    model_uri: str,
    run_id: str,
    tags: dict[str, str],
    evaluation: promotion.ModelEvaluation,
    weights_sha256: str,
) -> registry.PromotionOutcome:
    """Registration and gate as one Prefect transaction: all of it, or none of it."""
    options = orchestration.stage_options(cfg, "promotion")
    with transaction():
        registration = register_version.with_options(**options)(
            cfg, model_uri, run_id, tags, evaluation, weights_sha256
        )
        outcome: registry.PromotionOutcome = promotion_gate.with_options(**options)(cfg, registration)
    return outcome


def _promotion(
    cfg: PipelineConfig, prepared: data.PreparedData, pretraining: PretrainingResult, swept: SweepResult
) -> registry.PromotionOutcome:
    tags = {
        **tracking.lineage_tags(cfg, prepared),
        "pretrain.run_id": pretraining.run_id,
        "sweep.run_id": swept.run_id,
        "sweep.best_cell": swept.sweep.best_cell,
        "ssl.backbone": swept.sweep.best_backbone,  # a distilled student's may differ from the encoder's
    }
    output = swept.sweep
    evaluation = evaluate_model(output.test_predictions_path, prepared.test)
    weights = hash_weights(output.best_model_path)
    return register_and_gate(cfg, swept.model_uri, swept.run_id, tags, evaluation, weights)


def _data(cfg: PipelineConfig, refresh: bool) -> data.PreparedData:
    prepared: data.PreparedData = data_stage.with_options(**orchestration.stage_options(cfg, "data"))(
        cfg, refresh
    )
    return prepared


@flow(name="ssl_pretraining", validate_parameters=False)
def ssl_pretraining(cfg: PipelineConfig, refresh: bool = False) -> PretrainingResult:
    """Data -> Ray pretraining, tracked as one MLflow run: what a cluster job runs."""
    return _pretraining(cfg, _data(cfg, refresh), refresh)


@flow(name="ssl_sweep", validate_parameters=False)
def ssl_sweep(cfg: PipelineConfig, pretrain_run_id: str) -> SweepResult:
    """Data + the encoder a pretraining run logged -> Ray Tune sweep, one parent MLflow run."""
    folder = cfg.workspace_path / "pretrain" / f"run-{pretrain_run_id}"
    checkpoint = download_checkpoint(cfg, pretrain_run_id, folder)
    encoder_path = encoder_from_checkpoint(cfg, checkpoint)
    prepared = _data(cfg, False)
    result: SweepResult = sweep_stage.with_options(**orchestration.stage_options(cfg, "sweep"))(
        cfg, prepared, str(encoder_path), pretrain_run_id
    )
    return result


@flow(name="ssl_pipeline", validate_parameters=False)
def ssl_pipeline(
    cfg: PipelineConfig, only_if_new_data: bool = False, refresh: bool = False
) -> PipelineResult:
    """Data -> pretraining -> sweep -> registry gate. ``only_if_new_data`` (scheduled and triggered
    runs) ends after the data step when the champion was trained on these very datasets;
    ``refresh`` recomputes cached stages."""
    prepared = _data(cfg, refresh)
    if only_if_new_data and (reason := champion_data(cfg, prepared)):
        return PipelineResult(prepared, skipped=reason)
    check_label_budgets(cfg, prepared)
    pretraining = _pretraining(cfg, prepared, refresh)
    swept = _sweep(cfg, prepared, pretraining, refresh)
    return PipelineResult(prepared, pretraining, swept, _promotion(cfg, prepared, pretraining, swept))
