"""Label-efficient evaluation of a pretrained encoder, one trial at a time.

A trial is one protocol (kNN or linear probe on frozen features, fine-tuning, distillation of
a fine-tuned teacher on the unlabeled images, or the supervised-from-scratch baseline) at one
label budget (a fraction of the labeled set, or a number of labels a class) with one config
and one seed. Each seed draws its own labels for each budget (``label_splits``); a trial
trains on part of them and reports validation accuracy (what configs are picked and stopped
on) on the rest, or on a separate validation split (``evaluate.selection``), and, at the end,
test accuracy. A seed fixes a trial's labels,
initialisation and batch order, the same for every protocol, so protocols compare in pairs
(same seed, same labels).
Ray Tune runs the trials (``tasks/sweep.py``); ``evaluate_encoder`` runs each cell's base
config once, in process.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ssl_models import Encoder
from ssl_models.data import per_class_subset, stratified_subset
from ssl_models.distill import distill, student_classifier
from ssl_models.evaluate import (
    accuracy,
    classify,
    finetune,
    knn_predict,
    linear_probe,
)
from tasks import streaming
from tasks.config import DistillConfig, EvaluateConfig, FinetuneConfig, LinearProbeConfig, PipelineConfig
from tasks.data import PreparedData
from tasks.pretrain import build_encoder

PROTOCOLS = ("knn", "linear", "finetune", "distill", "supervised")  # the baseline last
FROZEN = ("knn", "linear")  # protocols on frozen features: the feature cache serves them
WITH_MODEL = ("linear", "finetune", "distill")  # protocols whose trials leave a classifier
Report = Callable[[dict[str, float]], None]


@dataclass(frozen=True)
class LabelBudget:
    """The labels a cell gets, stratified by class: a fraction of the labeled set, or a number of
    each class (exactly one of the two)."""

    fraction: float | None = None
    per_class: int | None = None

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.per_class is None):
            raise ValueError("a label budget is a fraction or a number of labels a class, exactly one")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"a label fraction is in (0, 1], not {self.fraction}")
        if self.per_class is not None and self.per_class < 1:
            raise ValueError(f"a budget per class is at least one label, not {self.per_class}")

    @property
    def name(self) -> str:
        """Metric-name safe: ``1pct``, ``0_5pct``, ``10_per_class``."""
        return f"{self.per_class}_per_class" if self.per_class else f"{self._percent:g}pct".replace(".", "_")

    def __str__(self) -> str:
        """For tables: ``1%``, ``10 a class``."""
        return f"{self.per_class} a class" if self.per_class else f"{self._percent:g}%"

    @property
    def phrase(self) -> str:
        """For sentences: ``1% of the labels``, ``10 labels a class``."""
        return f"{self.per_class} labels a class" if self.per_class else f"{self} of the labels"

    def sort_key(self) -> tuple[bool, float]:
        """Labels per class first (the scarce budgets), then fractions, each ascending."""
        return (self.per_class is None, float(self.per_class or self.fraction or 0))

    def draw(self, labels: torch.Tensor, seed: int) -> torch.Tensor:
        """Sorted indices into ``labels``; with one seed, a seed's budgets are nested."""
        if self.fraction is None:
            return per_class_subset(labels, self.per_class or 0, seed)
        return stratified_subset(labels, self.fraction, seed)

    @property
    def _percent(self) -> float:
        return 100 * (self.fraction or 0.0)


def cell_name(protocol: str, budget: LabelBudget) -> str:
    """E.g. ``linear-1pct``, ``finetune-10_per_class``: a (protocol, label budget) cell of the sweep."""
    return f"{protocol}-{budget.name}"


def metric_name(protocol: str, budget: LabelBudget) -> str:
    """E.g. ``knn_top1_1pct``, ``linear_top1_100pct``, ``finetune_top1_10_per_class``."""
    return f"{protocol}_top1_{budget.name}"


@dataclass(frozen=True)
class TrialSpec:
    protocol: str  # one of PROTOCOLS
    budget: LabelBudget
    seed: int
    params: dict[str, Any]  # the protocol's config section (evaluate.knn / linear / finetune / distill)
    searched: tuple[str, ...] = ()  # the keys the sweep varies: they name the trial
    teacher: str | None = None  # distill: the checkpoint of the fine-tuned trial it learns from

    @property
    def cell(self) -> str:
        return cell_name(self.protocol, self.budget)

    @property
    def name(self) -> str:
        varied = "".join(f"-{key}{self.params[key]:g}" for key in self.searched)
        return f"{self.cell}{varied}-seed{self.seed}"


def protocol_budgets(ev: EvaluateConfig) -> dict[str, list[LabelBudget]]:
    """Each protocol's label budgets: ``labels_per_class`` for all, then kNN and the linear probe at
    ``label_fractions``, fine-tuning, distillation (when enabled) and the baseline at
    ``finetune_fractions``."""
    per_class = [LabelBudget(per_class=n) for n in sorted(set(ev.labels_per_class))]
    frozen = per_class + [LabelBudget(fraction=f) for f in sorted(set(ev.label_fractions))]
    trained = per_class + [LabelBudget(fraction=f) for f in sorted(set(ev.finetune_fractions))]
    distilled = trained if ev.distill.enabled else []
    return {"knn": frozen, "linear": frozen, "finetune": trained, "distill": distilled, "supervised": trained}


def trial_specs(cfg: PipelineConfig, seed: int, search: bool = True) -> list[TrialSpec]:
    """Every searched cell's grid points (only its base config when ``search`` is false) with
    ``seed``: all but distillation, whose trials need their teachers (``distill_specs``)."""
    specs = []
    for protocol, budgets in protocol_budgets(cfg.evaluate).items():
        if protocol == "distill":
            continue
        grid = cfg.evaluate.grid(protocol)
        points = grid if search else grid[:1]
        section = "finetune" if protocol == "supervised" else protocol
        searched = tuple(k for k, v in getattr(cfg.evaluate.search, section).items() if len(v) > 1)
        for budget in budgets:
            specs += [TrialSpec(protocol, budget, seed, point, searched) for point in points]
    return specs


def distill_specs(ev: EvaluateConfig, teachers: dict[tuple[int, LabelBudget], str]) -> list[TrialSpec]:
    """One distillation trial per (seed, label budget) that has a fine-tuned teacher's checkpoint."""
    params = ev.distill.model_dump(mode="json")
    return [
        TrialSpec("distill", budget, seed, params, teacher=checkpoint)
        for (seed, budget), checkpoint in sorted(
            teachers.items(), key=lambda t: (t[0][1].sort_key(), t[0][0])
        )
        if budget in protocol_budgets(ev)["distill"]
    ]


@dataclass(frozen=True)
class Features:
    labeled: torch.Tensor
    test: torch.Tensor


TestBatches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class EvalInputs:
    """What every trial reads; built once by the driver (Ray ships it to trials once).

    No whole dataset is here: the labels of the labeled set, the frozen features of the labeled and
    test sets, the images of the labels the fine-tuning trials train and validate on (``held``),
    and the test set as batches to stream.
    """

    labels: torch.Tensor  # class index of every labeled image, in the dataset's order
    classes: tuple[str, ...]
    splits: dict[tuple[int, LabelBudget], LabelSplit]  # (seed, label budget) -> the cell's labels
    held: torch.Tensor  # sorted indices of the labeled images held in ``held_images``
    held_images: torch.Tensor  # uint8 (len(held), C, H, W)
    test_labels: torch.Tensor
    test_batches: TestBatches  # (images, labels) of the test set, in the order of ``test_labels``
    features: Features
    encoder_state: dict[str, torch.Tensor]
    mean: float
    std: float
    unlabeled: streaming.UnlabeledBatches | None = None  # the students' pool (``unlabeled_batches``)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def images(self, indices: torch.Tensor) -> torch.Tensor:
        """The held images of labeled-set ``indices`` (labels of a fine-tuned cell)."""
        positions = torch.searchsorted(self.held, indices).clamp(max=len(self.held) - 1)
        if not torch.equal(self.held[positions], indices):
            raise ValueError("images asked for outside the fine-tuned cells' labels the sweep holds")
        return self.held_images[positions]


@dataclass(frozen=True)
class LabelSplit:
    """The labels of one cell at one seed (indices into the labeled set): what its trials train on,
    and what they report validation accuracy on (configs are picked and trials stopped on it)."""

    train: torch.Tensor
    select: torch.Tensor

    @property
    def indices(self) -> torch.Tensor:
        """Every label the cell uses, for training or for selection."""
        return torch.cat([self.train, self.select])

    @property
    def num_labels(self) -> int:
        return len(self.train) + len(self.select)


def label_splits(
    labels: torch.Tensor, ev: EvaluateConfig, seed: int
) -> dict[tuple[int, LabelBudget], LabelSplit]:
    """For each of ``ev.seeds`` and each label budget, the cell's labels (a seed's budgets are
    nested), split per ``ev.selection``: ``budget`` holds a stratified ``ev.selection_share`` of
    each budget out for selection; ``validation`` draws one split of ``ev.validation_size`` labels
    with ``seed``, the budgets from the rest."""
    budgets = sorted({b for bs in protocol_budgets(ev).values() for b in bs}, key=LabelBudget.sort_key)
    if ev.selection == "validation":
        if ev.validation_size >= len(labels):
            raise ValueError(
                f"evaluate.validation_size: {ev.validation_size} is not below the "
                f"{len(labels)} labeled images"
            )
        validation = stratified_subset(labels, ev.validation_size / len(labels), seed)
        pool = torch.ones(len(labels), dtype=torch.bool)
        pool[validation] = False
        rest = pool.nonzero().flatten()
        _require_per_class(labels[rest], budgets, " outside the validation split")
        return {
            (s, b): LabelSplit(rest[b.draw(labels[rest], s)], validation) for s in ev.seeds for b in budgets
        }
    _require_per_class(labels, budgets, "")
    splits = {}
    for s in ev.seeds:
        for b in budgets:
            drawn = b.draw(labels, s)
            held_out = torch.zeros(len(drawn), dtype=torch.bool)
            held_out[stratified_subset(labels[drawn], ev.selection_share, s)] = True
            train = drawn[~held_out]
            if len(labels[train].unique()) < len(labels.unique()):
                raise ValueError(
                    f"evaluate.selection_share: the budget of {b} ({len(drawn)} labels) leaves a class "
                    "with no label to train on once the selection share is held out; raise the "
                    "budget, or set evaluate.selection: validation"
                )
            splits[s, b] = LabelSplit(train, drawn[held_out])
    return splits


def _require_per_class(labels: torch.Tensor, budgets: list[LabelBudget], where: str) -> None:
    """A budget of n labels a class needs n labels of every class (else the cell is not what it says)."""
    counts = torch.bincount(labels)
    fewest = int(counts[counts > 0].min())
    for b in budgets:
        if b.per_class and b.per_class > fewest:
            raise ValueError(
                f"evaluate.labels_per_class: {b.phrase}, but a class has only {fewest} labeled "
                f"images{where}; lower the budget or label more images"
            )


def check_label_budgets(cfg: PipelineConfig, data: PreparedData) -> None:
    """Fail now, naming the setting, where a label budget cannot be drawn from the labeled set
    (before pretraining spends its time, not when the sweep starts). Reads the labels only."""
    label_splits(streaming.ids_and_labels(cfg, data.labeled)[1], cfg.evaluate, cfg.seed)


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
    splits = label_splits(labels, ev, cfg.seed)
    fine_tuned = [splits[s, b] for s in ev.seeds for b in protocol_budgets(ev)["finetune"]]
    if fine_tuned:
        held = torch.cat([split.indices for split in fine_tuned]).unique()  # sorted
        only = frozenset(ids[i] for i in held.tolist())
        held_images = streaming.read_images(cfg, data.labeled, only=only).images
    else:  # nothing is fine-tuned: the frozen protocols read features only
        held = torch.empty(0, dtype=torch.long)
        size = cfg.data.image_size
        held_images = torch.empty(0, cfg.data.channels, size, size, dtype=torch.uint8)
    _, test_labels = streaming.ids_and_labels(cfg, data.test)
    test = streaming.image_dataset(cfg, data.test, labeled=True)
    state = torch.load(encoder_path, map_location="cpu", weights_only=True)
    encoder = build_encoder(cfg, data.mean, data.std)
    encoder.load_state_dict(state)
    return EvalInputs(
        labels=labels,
        classes=tuple(data.labeled.classes),
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


def unlabeled_batches(cfg: PipelineConfig, data: PreparedData) -> streaming.UnlabeledBatches:
    """The unlabeled images the distillation students learn on (``EvalInputs.unlabeled``): read
    for the sweep's distill phase only, after the fine-tuned teachers exist."""
    return streaming.UnlabeledBatches(
        streaming.image_dataset(cfg, data.unlabeled),
        data.unlabeled.num_images,
        cfg.evaluate.distill.batch_size,
        streaming.shuffle_rows(cfg, data.unlabeled.num_images),
        cfg.data.streaming.prefetch_batches,
    )


def trial_encoder(cfg: PipelineConfig, inputs: EvalInputs, spec: TrialSpec) -> Encoder:
    """The pretrained encoder; initialised from the trial's seed instead for the supervised baseline
    and for a distillation student of another backbone (``evaluate.distill.backbone``)."""
    backbone = cfg.evaluate.distill.backbone if spec.protocol == "distill" else None
    backbone = None if backbone == cfg.model.backbone else backbone  # the pretrained one, then
    model = cfg.model if backbone is None else cfg.model.model_copy(update={"backbone": backbone})
    encoder = build_encoder(
        cfg.model_copy(update={"seed": spec.seed, "model": model}), inputs.mean, inputs.std
    )
    if spec.protocol != "supervised" and backbone is None:
        encoder.load_state_dict(inputs.encoder_state)
    return encoder


def teacher_model(cfg: PipelineConfig, inputs: EvalInputs, state: dict[str, torch.Tensor]) -> nn.Module:
    """A fine-tuned trial's classifier (pretrained backbone + linear head) from its state dict."""
    encoder = build_encoder(cfg, inputs.mean, inputs.std)
    model = student_classifier(encoder, inputs.num_classes, cfg.seed)
    model.load_state_dict(state)
    return model


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
    teacher_state: dict[str, torch.Tensor] | None = None,
) -> TrialOutcome:
    """Train and evaluate one trial; ``report`` gets the validation accuracy ``reports`` times.

    The last report (progress 1.0) also holds the test accuracy. ``device`` runs the fine-tuned
    model; heads on the cached features stay on the CPU. A distillation trial learns from the
    classifier ``teacher_state`` holds (its ``spec.teacher``'s).
    """
    if spec.protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {spec.protocol!r}; choose one of {list(PROTOCOLS)}")
    if spec.protocol == "distill" and (teacher_state is None or inputs.unlabeled is None):
        raise ValueError(
            f"{spec.name}: a distillation trial needs its teacher's state and the unlabeled images"
        )
    split = inputs.splits[spec.seed, spec.budget]
    idx = split.train
    y = inputs.labels[idx]
    val_y, test_y = inputs.labels[split.select], inputs.test_labels
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
        train_x, val_x, test_x = labeled[idx], labeled[split.select], inputs.features.test
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
        section = DistillConfig if spec.protocol == "distill" else FinetuneConfig
        ft = section.model_validate(spec.params)
        steps = ft.steps
        val_images = inputs.images(split.select)

        def eval_model(step: int, model: nn.Module) -> None:
            send(step, steps, accuracy(classify(model, val_images), val_y))

        if spec.protocol == "distill":
            assert (
                isinstance(ft, DistillConfig) and teacher_state is not None and inputs.unlabeled is not None
            )
            model = distill(
                teacher_model(cfg, inputs, teacher_state),
                student_classifier(trial_encoder(cfg, inputs, spec), inputs.num_classes, spec.seed),
                inputs.unlabeled(spec.seed),
                ft.augment.params(),
                ft.distill_settings(spec.seed),
                steps,
                labeled=(inputs.images(idx), y),
                device=device,
                on_eval=eval_model,
                eval_every=_eval_every(steps, total_reports),
            )
        else:
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
    """One (protocol, label budget) cell: its selected config's test accuracy over seeds."""

    protocol: str
    budget: LabelBudget
    num_labels: int
    params: dict[str, Any]  # the selected config's searched keys
    seeds: tuple[int, ...]
    test_accuracies: tuple[float, ...]
    val_accuracies: tuple[float, ...]
    run_ids: tuple[str, ...] = ()  # the trials' MLflow runs, when tracked

    @property
    def cell(self) -> str:
        return cell_name(self.protocol, self.budget)

    @property
    def mean(self) -> float:
        return float(np.mean(self.test_accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.test_accuracies, ddof=1)) if len(self.test_accuracies) > 1 else 0.0


def wilson_lower_bound(accuracy: float, n: int, z: float = 1.959964) -> float:
    """The lower end of the 95% Wilson score interval of an accuracy measured on ``n`` images."""
    centre = accuracy + z * z / (2 * n)
    spread = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))
    return (centre - spread) / (1 + z * z / n)


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
        from scipy import stats  # not at import: a second in every Ray Tune trial's process

        half = float(stats.t.ppf(0.975, len(differences) - 1) * stats.sem(differences))
        return cls(mean, (mean - half, mean + half), seeds)


@dataclass(frozen=True)
class LabelEfficiency:
    cells: tuple[CellResult, ...]

    def cell(self, protocol: str, budget: LabelBudget) -> CellResult | None:
        return next((c for c in self.cells if c.protocol == protocol and c.budget == budget), None)

    def gains_over_supervised(self, protocol: str) -> dict[LabelBudget, PairedGain]:
        """``protocol`` minus supervised from scratch, paired by seed, at each budget that has both."""
        gains = {}
        for c in self.cells:
            baseline = self.cell("supervised", c.budget)
            if c.protocol == protocol and baseline is not None and set(c.seeds) & set(baseline.seeds):
                gains[c.budget] = PairedGain.of(c, baseline)
        return gains

    def metrics(self) -> dict[str, float]:
        """Per cell the mean and std of test accuracy; each protocol's paired gain over scratch and
        its 95% interval (with two seeds or more)."""
        metrics = {}
        for c in self.cells:
            metrics[metric_name(c.protocol, c.budget)] = c.mean
            metrics[metric_name(c.protocol, c.budget) + "_std"] = c.std
        for protocol in PROTOCOLS[:-1]:  # all but the baseline itself
            for budget, gain in self.gains_over_supervised(protocol).items():
                name = f"gain_{protocol}_vs_supervised_{budget.name}"
                metrics[name] = gain.mean
                if gain.interval:
                    metrics[name + "_ci_low"], metrics[name + "_ci_high"] = gain.interval
        return metrics

    def curve(self) -> list[dict[str, Any]]:
        """The label-efficiency curve's points (what the PNG plots)."""
        return [
            {
                "protocol": c.protocol,
                "budget": c.budget.name,
                "budget_label": str(c.budget),
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
        num_labels = inputs.splits[spec.seed, spec.budget].num_labels
        accuracies = ((outcome.test_accuracy,), (outcome.val_accuracy,))
        cells.append(CellResult(spec.protocol, spec.budget, num_labels, {}, (spec.seed,), *accuracies))
    return LabelEfficiency(tuple(cells))
