"""Label-efficient evaluation of a pretrained encoder beside a supervised-from-scratch baseline.

At each label fraction (a stratified, seeded subset of the labeled set; the indices are
saved): kNN and a linear probe on frozen features, and, at ``finetune_fractions``,
fine-tuning of the pretrained encoder and the same training from a random init.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ssl_models.data import stratified_subset
from ssl_models.evaluate import (
    accuracy,
    classify,
    extract_features,
    finetune,
    knn_predict,
    linear_probe,
)
from tasks.config import PipelineConfig
from tasks.data import PreparedData, load_dataset
from tasks.pretrain import PretrainOutput, build_encoder, load_encoder


@dataclass(frozen=True)
class EvalRow:
    protocol: str  # knn | linear | finetune | supervised
    label_fraction: float
    num_labels: int
    accuracy: float


def percent(label_fraction: float) -> str:
    """E.g. ``1pct``, ``0_5pct``: a metric-name-safe label fraction."""
    return f"{label_fraction * 100:g}pct".replace(".", "_")


def metric_name(protocol: str, label_fraction: float) -> str:
    """E.g. ``knn_top1_1pct`` or ``linear_top1_100pct``."""
    return f"{protocol}_top1_{percent(label_fraction)}"


@dataclass(frozen=True)
class EvaluationOutput:
    rows: tuple[EvalRow, ...]
    splits_path: str
    classifier_path: str
    classes: tuple[str, ...]

    def accuracy_of(self, protocol: str, label_fraction: float) -> float | None:
        for row in self.rows:
            if row.protocol == protocol and row.label_fraction == label_fraction:
                return row.accuracy
        return None

    def gains_over_supervised(self, protocol: str) -> dict[float, float]:
        """Accuracy of ``protocol`` minus supervised-from-scratch, at each fraction that has both."""
        gains = {}
        for row in self.rows:
            baseline = self.accuracy_of("supervised", row.label_fraction)
            if row.protocol == protocol and baseline is not None:
                gains[row.label_fraction] = row.accuracy - baseline
        return gains

    def metrics(self, primary_protocol: str) -> dict[str, float]:
        metrics = {metric_name(r.protocol, r.label_fraction): r.accuracy for r in self.rows}
        for fraction, gain in self.gains_over_supervised(primary_protocol).items():
            metrics[f"gain_{primary_protocol}_vs_supervised_{percent(fraction)}"] = gain
        return metrics

    def as_dicts(self) -> list[dict[str, float | str | int]]:
        return [asdict(r) for r in self.rows]


def evaluate_encoder(cfg: PipelineConfig, data: PreparedData, pretrained: PretrainOutput) -> EvaluationOutput:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    ev = cfg.evaluate
    labeled, test = load_dataset(data.labeled), load_dataset(data.test)
    assert labeled.labels is not None and test.labels is not None
    num_classes = len(labeled.classes)
    encoder = load_encoder(cfg, data, pretrained.encoder_path)
    train_features = extract_features(encoder, labeled.images)
    test_features = extract_features(encoder, test.images)

    rows: list[EvalRow] = []
    splits: dict[str, list[int]] = {}
    heads: dict[float, nn.Linear] = {}
    for fraction in sorted(set(ev.label_fractions) | set(ev.finetune_fractions)):
        idx = stratified_subset(labeled.labels, fraction, cfg.seed)
        splits[str(fraction)] = idx.tolist()
        y = labeled.labels[idx]
        predictions: dict[str, torch.Tensor] = {}
        if fraction in ev.label_fractions:
            predictions["knn"] = knn_predict(
                train_features[idx], y, test_features, num_classes, ev.knn_k, ev.knn_temperature
            )
            heads[fraction] = linear_probe(train_features[idx], y, num_classes, ev.linear.settings(cfg.seed))
            with torch.no_grad():
                predictions["linear"] = heads[fraction](test_features).argmax(1)
        if fraction in ev.finetune_fractions:
            args = (
                labeled.images[idx],
                y,
                num_classes,
                ev.finetune.augment.params(),
                ev.finetune.settings(cfg.seed),
                ev.finetune.steps,
            )
            predictions["finetune"] = classify(finetune(encoder, *args), test.images)
            scratch = build_encoder(cfg, data.mean, data.std)
            predictions["supervised"] = classify(finetune(scratch, *args), test.images)
        rows += [
            EvalRow(protocol, fraction, len(idx), accuracy(p, test.labels))
            for protocol, p in predictions.items()
        ]

    folder = cfg.workspace_path / "evaluate" / Path(pretrained.encoder_path).parent.name
    folder.mkdir(parents=True, exist_ok=True)
    splits_path = folder / "label_splits.json"
    splits_path.write_text(json.dumps(splits))
    classifier = nn.Sequential(encoder, heads[max(ev.label_fractions)])
    classifier_path = folder / "classifier.pt"
    torch.save(classifier.state_dict(), classifier_path)
    return EvaluationOutput(tuple(rows), str(splits_path), str(classifier_path), labeled.classes)


def build_classifier(cfg: PipelineConfig, data: PreparedData, num_classes: int) -> nn.Sequential:
    """The architecture saved at ``EvaluationOutput.classifier_path`` (random weights)."""
    encoder = build_encoder(cfg, data.mean, data.std)
    return nn.Sequential(encoder, nn.Linear(encoder.num_features, num_classes))
