"""Label-efficiency sweeps on Ray Tune.

Three Tune runs. ``search``: every (protocol, label budget) cell's grid with the first seed,
ASHA stopping trials that trail their own cell on validation accuracy. ``repeat``: each cell's
best config (by validation accuracy) with the other seeds, to the full budget. ``distill``
(SimCLRv2's third step): at each fine-tuned budget and seed, that seed's fine-tuned model
teaches a student on the unlabeled images plus the cell's labels. A cell then reports test
accuracy as mean +- std over seeds. Trials declare their CPUs and GPUs; Tune runs
as many at once as the cluster holds (or ``evaluate.max_concurrent_trials``).

What trials read (``tasks.evaluate.EvalInputs``: labels, the frozen features, the images of the
labeled splits, the pretrained weights, and the test set as a Ray Dataset to stream) travels to
them once, through Ray's object store. MLflow child runs are opened and closed by the driver (one per
trial, from Tune's callbacks), so a trial stopped early or killed still ends its run.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import ray
import torch
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from tasks import progress, streaming
from tasks.cluster import connect
from tasks.config import PipelineConfig
from tasks.data import PreparedData
from tasks.evaluate import (
    PROTOCOLS,
    WITH_MODEL,
    CellResult,
    EvalInputs,
    LabelBudget,
    LabelEfficiency,
    TrialSpec,
    distill_specs,
    encoder_digest,
    eval_inputs,
    protocol_budgets,
    run_trial,
    trial_specs,
    unlabeled_batches,
    wilson_lower_bound,
)
from tasks.pretrain import progress_logger, storage
from tasks.promotion import HeldOutPredictions

METRIC = "val_accuracy"
CLASSIFIER_FILE = "classifier.pt"
PREDICTIONS_FILE = "test_predictions.pt"  # a trial's, in its checkpoint
TEST_FEATURES_FILE = "test_features.pt"


def spec_of(config: dict[str, Any]) -> TrialSpec:
    trial = config["trial"]
    return TrialSpec(
        **{**trial, "budget": LabelBudget(**trial["budget"]), "searched": tuple(trial["searched"])}
    )


def trainable(config: dict[str, Any], cfg: PipelineConfig, inputs: EvalInputs) -> None:
    """One Tune trial: validation reports while training, then test accuracy and the model."""
    spec = spec_of(config)
    resources = tune.get_context().get_trial_resources().required_resources
    torch.set_num_threads(max(1, int(resources.get("CPU", 1))))
    device = "cuda" if resources.get("GPU", 0) > 0 and torch.cuda.is_available() else "cpu"
    last: dict[str, float] = {}

    def report(metrics: dict[str, float]) -> None:
        if "test_accuracy" in metrics:  # the final report goes out below, with the model
            last.update(metrics)
        else:
            tune.report(metrics)

    teacher_state = _classifier_state(cfg, spec.teacher) if spec.teacher else None
    outcome = run_trial(cfg, spec, inputs, report, device, teacher_state)
    with tempfile.TemporaryDirectory() as folder:
        torch.save(outcome.test_predictions, Path(folder) / PREDICTIONS_FILE)
        if outcome.classifier_state is not None:
            torch.save(outcome.classifier_state, Path(folder) / CLASSIFIER_FILE)
        tune.report(last, checkpoint=tune.Checkpoint.from_directory(folder))


def _classifier_state(cfg: PipelineConfig, checkpoint: str) -> dict[str, torch.Tensor]:
    """The classifier a trial left in its checkpoint (a folder, or a prefix of the S3 storage)."""
    with tune.Checkpoint(checkpoint, filesystem=storage(cfg)[1]).as_directory() as folder:
        return torch.load(Path(folder) / CLASSIFIER_FILE, map_location="cpu", weights_only=True)


class CellASHA(FIFOScheduler):
    """ASHA within each (protocol, label budget) cell: a trial competes only with its own cell's.

    One ASHA over all trials would stop every 1%-label trial for trailing the 100%-label ones.
    """

    def __init__(self, reports: int, grace_period: int, reduction_factor: float) -> None:
        super().__init__()
        self._reports, self._grace_period, self._reduction_factor = reports, grace_period, reduction_factor
        self._cells: dict[str, AsyncHyperBandScheduler] = {}
        self._trial_cells: dict[str, str] = {}
        self._metric, self._mode = METRIC, "max"
        self.stopped: set[str] = set()  # ids of the trials this scheduler stopped before their budget

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return True

    def _asha(self, trial: Trial) -> AsyncHyperBandScheduler:
        cell = self._trial_cells.setdefault(trial.trial_id, spec_of(trial.config).cell)
        if cell not in self._cells:
            self._cells[cell] = AsyncHyperBandScheduler(
                metric=self._metric,
                mode=self._mode,
                max_t=self._reports,
                grace_period=self._grace_period,
                reduction_factor=self._reduction_factor,
            )
        return self._cells[cell]

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        self._asha(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        decision = self._asha(trial).on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and result.get("progress", 1.0) < 1.0:
            self.stopped.add(trial.trial_id)
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> None:
        self._asha(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self._asha(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"ASHA per cell: {len(self._cells)} cells, {len(self.stopped)} trials stopped early"


class TrialRuns(Protocol):
    """Where trials are recorded (``tracking.TrialRuns``: MLflow child runs)."""

    def start(self, name: str, params: dict[str, Any], tags: dict[str, str]) -> str: ...

    def log(self, run_id: str, metrics: dict[str, float], step: int) -> None: ...

    def end(self, run_id: str, status: str, tags: dict[str, str]) -> None: ...


class RecordTrials(tune.Callback):
    """Opens a run per trial when Tune starts it, logs each report, and ends it with the trial."""

    def __init__(self, runs: TrialRuns | None, phase: str, total: int = 0) -> None:
        self.runs, self.phase, self.total = runs, phase, total
        self.run_ids: dict[str, str] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.completed = 0

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        if self.runs is None or trial.trial_id in self.run_ids:  # a restarted trial keeps its run
            return
        spec = spec_of(trial.config)
        params = {"protocol": spec.protocol, "label_budget": spec.budget.name, "seed": spec.seed}
        tags = {"sweep.phase": self.phase, "sweep.cell": spec.cell, "ray.trial_id": trial.trial_id}
        if spec.teacher:
            tags["sweep.teacher_checkpoint"] = spec.teacher
        self.run_ids[trial.trial_id] = self.runs.start(spec.name, {**params, **spec.params}, tags)

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any], **info: Any
    ) -> None:
        self.last[trial.trial_id] = result
        if trial.trial_id in self.run_ids:
            metrics = {k: float(result[k]) for k in (METRIC, "test_accuracy", "progress") if k in result}
            self.runs.log(self.run_ids[trial.trial_id], metrics, int(result["step"]))  # type: ignore[union-attr]

    def _end(self, trial: Trial, status: str) -> None:
        if trial.trial_id in self.run_ids:
            progress = self.last.get(trial.trial_id, {}).get("progress", 0.0)
            tags = {"sweep.stopped_early": str(status == "FINISHED" and progress < 1.0).lower()}
            self.runs.end(self.run_ids[trial.trial_id], status, tags)  # type: ignore[union-attr]

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._end(trial, "FINISHED")
        last = self.last.get(trial.trial_id, {})
        outcome = (
            f"test {100 * last['test_accuracy']:.1f}%"
            if "test_accuracy" in last
            else f"stopped by ASHA at {100 * last.get('progress', 0):.0f}% of its steps"
        )
        self.completed += 1
        total = max(self.total, len(trials))
        progress_logger().info(
            f"{self.phase} trial {self.completed}/{total} {spec_of(trial.config).name}: "
            f"val {100 * last.get(METRIC, 0):.1f}%, {outcome}"
        )
        progress.report(f"sweep: {self.phase} trials", self.completed, total)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._end(trial, "FAILED")
        self.completed += 1
        progress.report(f"sweep: {self.phase} trials", self.completed, max(self.total, len(trials)))
        progress_logger().info(f"{self.phase} trial {spec_of(trial.config).name} failed: {trial.error_file}")


@dataclass(frozen=True)
class TrialRecord:
    spec: TrialSpec
    phase: str  # search | repeat | distill
    val_accuracy: float | None  # the last one reported
    test_accuracy: float | None  # None: stopped early or failed
    reports: int
    stopped_early: bool
    run_id: str | None  # the MLflow child run
    checkpoint: str | None  # where Tune keeps the trial's model and test predictions


@dataclass(frozen=True)
class SweepOutput(LabelEfficiency):
    name: str = ""
    folder: str = ""  # the driver's copy of the best model, its test predictions and the figures' data
    trials: tuple[TrialRecord, ...] = ()
    best_cell: str = ""  # the cell whose model is the sweep's best (``_assured_accuracy``)
    best_backbone: str = ""  # its backbone (a distillation student's may differ from the encoder's)
    classes: tuple[str, ...] = ()
    seconds: float = 0.0  # wall time, from the data to the saved best model

    @property
    def best_model_path(self) -> Path:
        return Path(self.folder) / CLASSIFIER_FILE

    @property
    def test_predictions_path(self) -> Path:
        """The best model's ``HeldOutPredictions``: what the gate compares (logged as ``sweep/``)."""
        return Path(self.folder) / HeldOutPredictions.FILE

    @property
    def test_features_path(self) -> Path:
        """The encoder's features of the test images, for the embedding map."""
        return Path(self.folder) / TEST_FEATURES_FILE


def sweep_name(cfg: PipelineConfig, data: PreparedData, encoder_path: str) -> str:
    """Same encoder, data and evaluation config: same name."""
    digest = cfg.digest("seed", "evaluate")
    return f"sweep-{digest}-{encoder_digest(encoder_path)[:8]}-{data.labeled.digest[:8]}"


def _fit(
    cfg: PipelineConfig,
    name: str,
    specs: Sequence[TrialSpec],
    inputs: EvalInputs,
    scheduler: TrialScheduler,
    callback: RecordTrials,
) -> tune.ResultGrid:
    ev = cfg.evaluate
    # Tune's console tables would bury the per-trial lines above (RAY_AIR_NEW_OUTPUT=1: keep them).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    resources = {"cpu": ev.cpus_per_trial, "gpu": ev.gpus_per_trial}
    storage_path, filesystem = storage(cfg)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, cfg=cfg, inputs=inputs), resources),
        param_space={"trial": tune.grid_search([asdict(s) for s in specs])},
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            scheduler=scheduler,
            max_concurrent_trials=ev.max_concurrent_trials,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            callbacks=[callback],
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )
    return tuner.fit()


def _records(
    grid: tune.ResultGrid, phase: str, callback: RecordTrials, stopped: set[str]
) -> list[TrialRecord]:
    records = []
    for result in (grid[i] for i in range(len(grid))):
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id", "")
        records.append(
            TrialRecord(
                spec=spec_of(result.config or {}),
                phase=phase,
                val_accuracy=metrics.get(METRIC),
                test_accuracy=metrics.get("test_accuracy"),
                reports=int(metrics.get("training_iteration", 0)),
                stopped_early=trial_id in stopped,
                run_id=callback.run_ids.get(trial_id),
                checkpoint=result.checkpoint.path if result.checkpoint else None,
            )
        )
    return records


def _select(records: list[TrialRecord], specs: Sequence[TrialSpec]) -> dict[str, TrialRecord]:
    """Per cell, the finished trial with the best validation accuracy; ties go to the earlier grid point."""
    order = {s.name: i for i, s in enumerate(specs)}
    best: dict[str, TrialRecord] = {}
    for r in sorted(records, key=lambda r: order[r.spec.name]):
        if r.test_accuracy is None or r.val_accuracy is None:
            continue
        current = best.get(r.spec.cell)
        if current is None or r.val_accuracy > current.val_accuracy:  # type: ignore[operator]
            best[r.spec.cell] = r
    return best


def run_sweep(
    cfg: PipelineConfig,
    data: PreparedData,
    encoder_path: str,
    runs: TrialRuns | None = None,
) -> SweepOutput:
    """Search each cell's grid with ASHA, repeat each best config over the seeds, aggregate."""
    start = time.perf_counter()
    ev = cfg.evaluate
    name = sweep_name(cfg, data, encoder_path)
    connect(cfg)
    cpus = ray.cluster_resources().get("CPU", 0)
    trials = ev.max_concurrent_trials or cpus / ev.cpus_per_trial  # Tune runs as many as fit
    held = min(cpus, trials * ev.cpus_per_trial)
    streaming.require_spare_cpu(cfg, data.test.num_images, held, "evaluate.max_concurrent_trials")
    if protocol_budgets(ev)["distill"]:  # the students stream the unlabeled images
        streaming.require_spare_cpu(cfg, data.unlabeled.num_images, held, "evaluate.max_concurrent_trials")
    inputs = eval_inputs(cfg, data, encoder_path)

    first, *other_seeds = ev.seeds
    search_specs = trial_specs(cfg, first)
    scheduler: TrialScheduler = FIFOScheduler()
    if ev.asha.enabled:
        scheduler = CellASHA(ev.asha.reports, ev.asha.grace_period, ev.asha.reduction_factor)
    search_callback = RecordTrials(runs, "search", len(search_specs))
    grid = _fit(cfg, f"{name}-search", search_specs, inputs, scheduler, search_callback)
    stopped = scheduler.stopped if isinstance(scheduler, CellASHA) else set()
    records = _records(grid, "search", search_callback, stopped)
    selected = _select(records, search_specs)
    missing = sorted({s.cell for s in search_specs} - set(selected))
    if missing:
        raise RuntimeError(f"sweep {name}: no trial of {missing} finished (see the Tune errors above)")

    repeat_specs = [
        TrialSpec(r.spec.protocol, r.spec.budget, seed, r.spec.params, r.spec.searched)
        for r in selected.values()
        for seed in other_seeds
    ]
    if repeat_specs:
        repeat_callback = RecordTrials(runs, "repeat", len(repeat_specs))
        grid = _fit(cfg, f"{name}-repeat", repeat_specs, inputs, FIFOScheduler(), repeat_callback)
        records += _records(grid, "repeat", repeat_callback, set())

    teachers = {
        (r.spec.seed, r.spec.budget): r.checkpoint
        for r in records
        if r.spec.protocol == "finetune"
        and r.checkpoint
        and _finished(r)
        and r.spec.params == selected[r.spec.cell].spec.params
    }
    specs = distill_specs(ev, teachers)
    if specs:
        distill_callback = RecordTrials(runs, "distill", len(specs))
        students = replace(inputs, unlabeled=unlabeled_batches(cfg, data))
        grid = _fit(cfg, f"{name}-distill", specs, students, FIFOScheduler(), distill_callback)
        distilled = _records(grid, "distill", distill_callback, set())
        records += distilled
        firsts = {r.spec.cell: r for r in distilled if r.spec.seed == first and _finished(r)}
        missing = sorted({s.cell for s in specs} - set(firsts))
        if missing:
            raise RuntimeError(f"sweep {name}: no distillation trial of {missing} finished with seed {first}")
        selected.update(firsts)  # as every cell: its first seed's model is the one it registers

    cells = []
    for cell, best in selected.items():
        runs_of_cell = [best] + [
            r
            for r in records
            if r.phase != "search" and r is not best and r.spec.cell == cell and _finished(r)
        ]
        cells.append(
            CellResult(
                best.spec.protocol,
                best.spec.budget,
                inputs.splits[best.spec.seed, best.spec.budget].num_labels,
                {k: best.spec.params[k] for k in best.spec.searched},
                tuple(r.spec.seed for r in runs_of_cell),
                tuple(float(r.test_accuracy) for r in runs_of_cell),  # type: ignore[arg-type]
                tuple(float(r.val_accuracy) for r in runs_of_cell),  # type: ignore[arg-type]
                tuple(r.run_id or "" for r in runs_of_cell),
            )
        )
    cells.sort(key=lambda c: (c.budget.sort_key(), PROTOCOLS.index(c.protocol)))
    with_model = [c for c in cells if c.protocol in WITH_MODEL]
    best_cell = max(with_model, key=lambda c: _assured_accuracy(c, inputs))
    best = selected[best_cell.cell]
    folder = cfg.workspace_path / "sweeps" / name
    _save_best(cfg, inputs, best, folder)
    backbone = (ev.distill.backbone if best.spec.protocol == "distill" else None) or cfg.model.backbone
    seconds = time.perf_counter() - start
    return SweepOutput(
        tuple(cells), name, str(folder), tuple(records), best.spec.cell, backbone, inputs.classes, seconds
    )


def _finished(record: TrialRecord) -> bool:
    """Ran its whole budget: not stopped early, not failed."""
    return record.test_accuracy is not None


def _assured_accuracy(cell: CellResult, inputs: EvalInputs) -> float:
    """The 95% lower bound of a cell's validation accuracy over the images it was measured on:
    cells measured on few labels (a small budget's selection share) do not win the registered
    model on a lucky score. With one shared validation split this orders cells as their mean does."""
    n = sum(len(inputs.splits[seed, cell.budget].select) for seed in cell.seeds)
    return wilson_lower_bound(float(np.mean(cell.val_accuracies)), n)


def _save_best(cfg: PipelineConfig, inputs: EvalInputs, best: TrialRecord, folder: Path) -> None:
    """The best model and what the figures need, copied from Tune's storage to the driver."""
    folder.mkdir(parents=True, exist_ok=True)
    assert best.checkpoint is not None
    checkpoint = tune.Checkpoint(best.checkpoint, filesystem=storage(cfg)[1])
    with checkpoint.as_directory() as trial_folder:
        state = torch.load(Path(trial_folder) / CLASSIFIER_FILE, map_location="cpu", weights_only=True)
        predictions = torch.load(Path(trial_folder) / PREDICTIONS_FILE, map_location="cpu", weights_only=True)
    torch.save(state, folder / CLASSIFIER_FILE)
    HeldOutPredictions(inputs.test_labels, predictions, inputs.classes).save(folder / HeldOutPredictions.FILE)
    torch.save(inputs.features.test, folder / TEST_FEATURES_FILE)
    (folder / "label_splits.json").write_text(
        json.dumps(
            {
                f"seed{s}-{b.name}": {"train": split.train.tolist(), "select": split.select.tolist()}
                for (s, b), split in inputs.splits.items()
            }
        )
    )
