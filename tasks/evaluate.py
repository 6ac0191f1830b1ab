"""Label-efficient evaluation of a pretrained encoder, one trial at a time.

A trial is one protocol (kNN or linear probe on frozen features, fine-tuning, or the
supervised-from-scratch baseline) at one label fraction with one config and one seed. The
label subsets are drawn from the labeled set minus a held-out validation split, each seed its
own subset: trials report validation accuracy (what configs are picked and stopped on) and, at
the end, test accuracy. A seed fixes a trial's label subset, initialisation and batch order, the
same for every protocol, so protocols compare in pairs (same seed, same labels).
Ray Tune runs the trials (``tasks/sweep.py``); ``evaluate_encoder`` runs each cell's base
config once, in process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn

from ssl_models import Encoder
from ssl_models.data import stratified_subset
from ssl_models.evaluate import (
    accuracy,
    classify,
    finetune,
    knn_predict,
    linear_probe,
)
from tasks import streaming
from tasks.config import FinetuneConfig, LinearProbeConfig, PipelineConfig
from tasks.data import PreparedData
from tasks.pretrain import build_encoder

PROTOCOLS = ("knn", "linear", "finetune", "supervised")
FROZEN = ("knn", "linear")  # protocols on frozen features: the feature cache serves them
Report = Callable[[dict[str, float]], None]


def percent(label_fraction: float) -> str:
    """E.g. ``1pct``, ``0_5pct``: a metric-name-safe label fraction."""
    return f"{label_fraction * 100:g}pct".replace(".", "_")


def cell_name(protocol: str, label_fraction: float) -> str:
    """E.g. ``linear-1pct``: a (protocol, label fraction) cell of the sweep."""
    return f"{protocol}-{percent(label_fraction)}"


def metric_name(protocol: str, label_fraction: float) -> str:
    """E.g. ``knn_top1_1pct`` or ``linear_top1_100pct``."""
    return f"{protocol}_top1_{percent(label_fraction)}"


@dataclass(frozen=True)
class TrialSpec:
    protocol: str  # knn | linear | finetune | supervised
    label_fraction: float
    seed: int
    params: dict[str, Any]  # the protocol's config section (evaluate.knn / linear / finetune)
    searched: tuple[str, ...] = ()  # the keys the sweep varies: they name the trial

    @property
    def cell(self) -> str:
        return cell_name(self.protocol, self.label_fraction)

    @property
    def name(self) -> str:
        varied = "".join(f"-{key}{self.params[key]:g}" for key in self.searched)
        return f"{self.cell}{varied}-seed{self.seed}"


def protocol_fractions(cfg: PipelineConfig) -> dict[str, list[float]]:
    ev = cfg.evaluate
    fine = sorted(ev.finetune_fractions)
    return {"knn": sorted(ev.label_fractions), "linear": sorted(ev.label_fractions)} | {
        "finetune": fine,
        "supervised": fine,
    }


def trial_specs(cfg: PipelineConfig, seed: int, search: bool = True) -> list[TrialSpec]:
    """Every cell's grid points (only its base config when ``search`` is false) with ``seed``."""
    specs = []
    for protocol, fractions in protocol_fractions(cfg).items():
        grid = cfg.evaluate.grid(protocol)
        points = grid if search else grid[:1]
        section = "finetune" if protocol == "supervised" else protocol
        searched = tuple(k for k, v in getattr(cfg.evaluate.search, section).items() if len(v) > 1)
        for fraction in fractions:
            specs += [TrialSpec(protocol, fraction, seed, point, searched) for point in points]
    return specs


@dataclass(frozen=True)
class Features:
    labeled: torch.Tensor
    test: torch.Tensor


TestBatches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class EvalInputs:
    """What every trial reads; built once by the driver (Ray ships it to trials once).

    No whole dataset is here: the labels of the labeled set, the frozen features of the labeled and
    test sets, the images of the labeled splits the trials train and validate on (``held``: as
    many as the label budget and the validation split), and the test set as batches to stream.
    """

    labels: torch.Tensor  # class index of every labeled image, in the dataset's order
    classes: tuple[str, ...]
    validation: torch.Tensor  # indices into the labeled set
    splits: dict[tuple[int, float], torch.Tensor]  # (seed, label fraction) -> indices into the labeled set
    held: torch.Tensor  # sorted indices of the labeled images held in ``held_images``
    held_images: torch.Tensor  # uint8 (len(held), C, H, W)
    test_labels: torch.Tensor
    test_batches: TestBatches  # (images, labels) of the test set, in the order of ``test_labels``
    features: Features
    encoder_state: dict[str, torch.Tensor]
    mean: float
    std: float

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def images(self, indices: torch.Tensor) -> torch.Tensor:
        """The held images of labeled-set ``indices`` (in the validation split or a fine-tuning split)."""
        positions = torch.searchsorted(self.held, indices).clamp(max=len(self.held) - 1)
        if not torch.equal(self.held[positions], indices):
            raise ValueError("images asked for outside the validation and fine-tuning splits the sweep holds")
        return self.held_images[positions]


def label_splits(
    labels: torch.Tensor,
    fractions: list[float],
    validation_size: int,
    seed: int,
    subset_seeds: Sequence[int],
) -> tuple[torch.Tensor, dict[tuple[int, float], torch.Tensor]]:
    """A stratified validation split drawn with ``seed``, and for each of ``subset_seeds`` each label
    fraction of the rest (indices, sorted); a seed's fractions are nested."""
    if validation_size >= len(labels):
        raise ValueError(
            f"evaluate.validation_size: {validation_size} is not below the {len(labels)} labeled images"
        )
    validation = stratified_subset(labels, validation_size / len(labels), seed)
    pool = torch.ones(len(labels), dtype=torch.bool)
    pool[validation] = False
    pool_idx = pool.nonzero().flatten()
    splits = {
        (s, f): pool_idx[stratified_subset(labels[pool_idx], f, s)]
        for s in subset_seeds
        for f in sorted(set(fractions))
    }
    return validation, splits


def encoder_digest(encoder_path: str | Path) -> str:
    return hashlib.sha256(Path(encoder_path).read_bytes()).hexdigest()


def feature_cache_path(cfg: PipelineConfig, data: PreparedData, encoder_path: str | Path) -> Path:
    """Keyed by the encoder's weights and the labeled and test data versions."""
    key = f"{encoder_digest(encoder_path)[:16]}-{data.labeled.digest[:12]}-{data.test.digest[:12]}"
    return cfg.workspace_path / "features" / f"{key}.pt"


def cached_features(
    cfg: PipelineConfig, data: PreparedData, encoder_path: str | Path, encoder: Encoder
) -> Features:
    """The frozen features of the labeled and test sets: computed once by a pass of Ray Data over
    each (``tasks.streaming.features``), then read from disk."""
    path = feature_cache_path(cfg, data, encoder_path)
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return Features(saved["labeled"], saved["test"])
    use_gpu = cfg.evaluate.gpus_per_trial > 0
    features = Features(
        streaming.features(cfg, data.labeled, encoder, use_gpu),
        streaming.features(cfg, data.test, encoder, use_gpu),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(asdict(features), partial)
    partial.replace(path)  # a crash mid-write never leaves a truncated cache entry
    return features


def eval_inputs(cfg: PipelineConfig, data: PreparedData, encoder_path: str | Path) -> EvalInputs:
    ev = cfg.evaluate
    ids, labels = streaming.ids_and_labels(cfg, data.labeled)
    fractions = [*ev.label_fractions, *ev.finetune_fractions]
    validation, splits = label_splits(labels, fractions, ev.validation_size, cfg.seed, ev.seeds)
    fine_tuned = [splits[s, f] for s in ev.seeds for f in ev.finetune_fractions]
    held = torch.cat([validation, *fine_tuned]).unique()  # sorted
    held_images = streaming.read_images(
        cfg, data.labeled, only=frozenset(ids[i] for i in held.tolist())
    ).images
    _, test_labels = streaming.ids_and_labels(cfg, data.test)
    test = streaming.image_dataset(cfg, data.test, labeled=True)
    state = torch.load(encoder_path, map_location="cpu", weights_only=True)
    encoder = build_encoder(cfg, data.mean, data.std)
    encoder.load_state_dict(state)
    return EvalInputs(
        labels=labels,
        classes=tuple(data.labeled.classes),
        validation=validation,
        splits=splits,
        held=held,
        held_images=held_images,
        test_labels=test_labels,
        test_batches=streaming.LabeledBatches(test),
        features=cached_features(cfg, data, encoder_path, encoder),
        encoder_state=state,
        mean=data.mean,
        std=data.std,
    )


def trial_encoder(cfg: PipelineConfig, inputs: EvalInputs, spec: TrialSpec) -> Encoder:
    """The pretrained encoder, or (the supervised baseline) one initialised from the trial's seed."""
    encoder = build_encoder(cfg.model_copy(update={"seed": spec.seed}), inputs.mean, inputs.std)
    if spec.protocol != "supervised":
        encoder.load_state_dict(inputs.encoder_state)
    return encoder


def classify_test_set(model: nn.Module, inputs: EvalInputs) -> torch.Tensor:
    """Predictions for the test set, a batch at a time as it streams."""
    return torch.cat([classify(model, images) for images, _ in inputs.test_batches()])


@dataclass(frozen=True)
class TrialOutcome:
    val_accuracy: float
    test_accuracy: float
    test_predictions: torch.Tensor
    classifier_state: dict[str, torch.Tensor] | None  # ssl_models.ImageClassifier's; None for kNN
    reports: int  # validation reports made, the last one included


def run_trial(
    cfg: PipelineConfig,
    spec: TrialSpec,
    inputs: EvalInputs,
    report: Report | None = None,
    device: str = "cpu",
) -> TrialOutcome:
    """Train and evaluate one trial; ``report`` gets the validation accuracy ``reports`` times.

    The last report (progress 1.0) also holds the test accuracy. ``device`` runs the fine-tuned
    model; heads on the cached features stay on the CPU.
    """
    if spec.protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {spec.protocol!r}; choose one of {list(PROTOCOLS)}")
    idx = inputs.splits[spec.seed, spec.label_fraction]
    y = inputs.labels[idx]
    val_y, test_y = inputs.labels[inputs.validation], inputs.test_labels
    total_reports = 1 if spec.protocol == "knn" else cfg.evaluate.asha.reports
    reports = 0

    def send(step: int, steps: int, val_accuracy: float, extra: dict[str, float] | None = None) -> None:
        nonlocal reports
        reports += 1
        if report:
            report({"val_accuracy": val_accuracy, "step": step, "progress": step / steps, **(extra or {})})

    classifier_state = None
    if spec.protocol in FROZEN:
        labeled = inputs.features.labeled
        train_x, val_x, test_x = labeled[idx], labeled[inputs.validation], inputs.features.test
        if spec.protocol == "knn":
            k, temperature = spec.params["k"], spec.params["temperature"]

            def predict(x: torch.Tensor) -> torch.Tensor:
                return knn_predict(train_x, y, x, inputs.num_classes, k, temperature)

            steps = 1
        else:
            settings = LinearProbeConfig.model_validate(spec.params).settings(spec.seed)
            steps = settings.steps

            def eval_head(step: int, head: nn.Linear) -> None:
                with torch.no_grad():
                    send(step, steps, accuracy(head(val_x).argmax(1), val_y))

            head = linear_probe(
                train_x, y, inputs.num_classes, settings, eval_head, _eval_every(steps, total_reports)
            )
            classifier_state = nn.Sequential(trial_encoder(cfg, inputs, spec), head).state_dict()

            def predict(x: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    return head(x).argmax(1)

        val_accuracy, test_predictions = accuracy(predict(val_x), val_y), predict(test_x)
    else:
        ft = FinetuneConfig.model_validate(spec.params)
        steps = ft.steps
        val_images = inputs.images(inputs.validation)

        def eval_model(step: int, model: nn.Sequential) -> None:
            send(step, steps, accuracy(classify(model, val_images), val_y))

        model = finetune(
            trial_encoder(cfg, inputs, spec),
            inputs.images(idx),
            y,
            inputs.num_classes,
            ft.augment.params(),
            ft.settings(spec.seed),
            steps,
            device=device,
            on_eval=eval_model,
            eval_every=_eval_every(steps, total_reports),
        )
        val_accuracy = accuracy(classify(model, val_images), val_y)
        test_predictions = classify_test_set(model, inputs)
        classifier_state = {k: v.cpu() for k, v in model.state_dict().items()}
    test_accuracy = accuracy(test_predictions, test_y)
    send(steps, steps, val_accuracy, {"test_accuracy": test_accuracy})
    return TrialOutcome(val_accuracy, test_accuracy, test_predictions, classifier_state, reports)


def _eval_every(steps: int, reports: int) -> int:
    """Steps between validation reports: at most ``reports`` of them, the last one at the end
    (ASHA stops a trial at its ``reports``-th)."""
    return max(1, -(-steps // reports))


@dataclass(frozen=True)
class CellResult:
    """One (protocol, label fraction) cell: its selected config's test accuracy over seeds."""

    protocol: str
    label_fraction: float
    num_labels: int
    params: dict[str, Any]  # the selected config's searched keys
    seeds: tuple[int, ...]
    test_accuracies: tuple[float, ...]
    val_accuracies: tuple[float, ...]
    run_ids: tuple[str, ...] = ()  # the trials' MLflow runs, when tracked

    @property
    def cell(self) -> str:
        return cell_name(self.protocol, self.label_fraction)

    @property
    def mean(self) -> float:
        return float(np.mean(self.test_accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.test_accuracies, ddof=1)) if len(self.test_accuracies) > 1 else 0.0


@dataclass(frozen=True)
class PairedGain:
    """One protocol's test accuracy minus the baseline's over the seeds both ran (same labels, same
    seed): the mean difference and its 95% Student-t interval (None with one seed)."""

    mean: float
    interval: tuple[float, float] | None
    seeds: tuple[int, ...]

    @classmethod
    def of(cls, cell: CellResult, baseline: CellResult) -> PairedGain:
        theirs = dict(zip(baseline.seeds, baseline.test_accuracies, strict=True))
        ours = zip(cell.seeds, cell.test_accuracies, strict=True)
        pairs = [(seed, a - theirs[seed]) for seed, a in ours if seed in theirs]
        if not pairs:
            raise ValueError(f"{cell.cell} and {baseline.cell} share no seed: nothing to pair")
        seeds, differences = zip(*pairs, strict=True)
        mean = float(np.mean(differences))
        if len(differences) < 2:
            return cls(mean, None, seeds)
        half = float(stats.t.ppf(0.975, len(differences) - 1) * stats.sem(differences))
        return cls(mean, (mean - half, mean + half), seeds)


@dataclass(frozen=True)
class LabelEfficiency:
    cells: tuple[CellResult, ...]

    def cell(self, protocol: str, label_fraction: float) -> CellResult | None:
        return next(
            (c for c in self.cells if c.protocol == protocol and c.label_fraction == label_fraction), None
        )

    def gains_over_supervised(self, protocol: str) -> dict[float, PairedGain]:
        """``protocol`` minus supervised from scratch, paired by seed, at each fraction that has both."""
        gains = {}
        for c in self.cells:
            baseline = self.cell("supervised", c.label_fraction)
            if c.protocol == protocol and baseline is not None:
                gains[c.label_fraction] = PairedGain.of(c, baseline)
        return gains

    def metrics(self) -> dict[str, float]:
        """Per cell the mean and std of test accuracy; each protocol's paired gain over scratch and
        its 95% interval (with two seeds or more)."""
        metrics = {}
        for c in self.cells:
            metrics[metric_name(c.protocol, c.label_fraction)] = c.mean
            metrics[metric_name(c.protocol, c.label_fraction) + "_std"] = c.std
        for protocol in PROTOCOLS[:-1]:  # all but the baseline itself
            for fraction, gain in self.gains_over_supervised(protocol).items():
                name = f"gain_{protocol}_vs_supervised_{percent(fraction)}"
                metrics[name] = gain.mean
                if gain.interval:
                    metrics[name + "_ci_low"], metrics[name + "_ci_high"] = gain.interval
        return metrics

    def curve(self) -> list[dict[str, Any]]:
        """The label-efficiency curve's points (what the PNG plots)."""
        return [
            {
                "protocol": c.protocol,
                "label_fraction": c.label_fraction,
                "num_labels": c.num_labels,
                "mean": c.mean,
                "std": c.std,
                "n": len(c.test_accuracies),
                "params": c.params,
            }
            for c in self.cells
        ]


def evaluate_encoder(cfg: PipelineConfig, data: PreparedData, encoder_path: str) -> LabelEfficiency:
    """Every cell once with its base config and the first seed, in process: a quick fixed evaluation."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    inputs = eval_inputs(cfg, data, encoder_path)
    cells = []
    for spec in trial_specs(cfg, cfg.evaluate.seeds[0], search=False):
        outcome = run_trial(cfg, spec, inputs)
        num_labels = len(inputs.splits[spec.seed, spec.label_fraction])
        accuracies = ((outcome.test_accuracy,), (outcome.val_accuracy,))
        cells.append(
            CellResult(spec.protocol, spec.label_fraction, num_labels, {}, (spec.seed,), *accuracies)
        )
    return LabelEfficiency(tuple(cells))
