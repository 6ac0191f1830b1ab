"""The promotion gate: does a challenger beat the champion? Plain logic, no MLflow.

A model's evaluation is its top-1 and per-class accuracy on one test set, named by that set's
content hash (and DVC version). Two evaluations are compared only on the same test set.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from tasks.config import PromotionConfig
from tasks.data import DatasetRef

# Accuracies are counts over the same images: equal counts give equal floats, but a value
# read back from a tag went through text.
TIE = 1e-9


@dataclass(frozen=True)
class ModelEvaluation:
    """Top-1 and per-class test accuracy of one model on one test set."""

    test_sha256: str
    test_dvc_md5: str | None
    num_images: int
    accuracy: float
    class_accuracy: dict[str, float] = field(default_factory=dict)

    def tags(self) -> dict[str, str]:
        tags = {
            "eval.test_sha256": self.test_sha256,
            "eval.test_images": str(self.num_images),
            "eval.test_accuracy": repr(self.accuracy),
            "eval.class_accuracy": json.dumps(self.class_accuracy),
        }
        if self.test_dvc_md5:
            tags["eval.test_dvc_md5"] = self.test_dvc_md5
        return tags

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> ModelEvaluation | None:
        """The evaluation a model version's tags hold; None when any part is missing or unreadable."""
        try:
            class_accuracy = json.loads(tags["eval.class_accuracy"])
            return cls(
                tags["eval.test_sha256"],
                tags.get("eval.test_dvc_md5"),
                int(tags["eval.test_images"]),
                float(tags["eval.test_accuracy"]),
                {str(k): float(v) for k, v in class_accuracy.items()},
            )
        except (KeyError, ValueError, TypeError, AttributeError):
            return None

    def same_test_set(self, other: ModelEvaluation) -> bool:
        dvc_differs = self.test_dvc_md5 and other.test_dvc_md5 and self.test_dvc_md5 != other.test_dvc_md5
        return self.test_sha256 == other.test_sha256 and not dvc_differs

    def describe_test_set(self) -> str:
        dvc = f", DVC {self.test_dvc_md5}" if self.test_dvc_md5 else ""
        return f"test set sha256 {self.test_sha256[:12]}{dvc}, {self.num_images} images"


def evaluate_predictions(
    labels: torch.Tensor, predictions: torch.Tensor, classes: tuple[str, ...], test: DatasetRef
) -> ModelEvaluation:
    """Accuracy and per-class accuracy of ``predictions`` on the test set ``test``."""
    if labels.shape != predictions.shape or len(labels) != test.num_images:
        raise ValueError(
            f"{len(predictions)} predictions for {len(labels)} labels; "
            f"the test set has {test.num_images} images"
        )
    correct = predictions == labels
    per_class = {
        name: correct[labels == i].float().mean().item()
        for i, name in enumerate(classes)
        if (labels == i).any()
    }
    return ModelEvaluation(test.digest, test.dvc_md5, len(labels), correct.float().mean().item(), per_class)


def evaluate_saved_predictions(
    path: str | Path, classes: tuple[str, ...], test: DatasetRef
) -> ModelEvaluation:
    """The evaluation of a sweep's best model from its saved test predictions (``figure_data.pt``)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return evaluate_predictions(saved["test_labels"], saved["best_predictions"], classes, test)


def weights_sha256(state_path: str | Path) -> str:
    """A digest of a state dict's names, shapes, dtypes and values (not of the file's bytes)."""
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass(frozen=True)
class Decision:
    """What the gate decided about one challenger, and why: what goes into tags and the report."""

    promote: bool
    reason: str
    challenger: ModelEvaluation | None
    champion: ModelEvaluation | None
    champion_version: str | None
    delta: float | None = None  # challenger minus champion test accuracy
    regressions: dict[str, float] = field(default_factory=dict)  # class -> accuracy lost
    forced: bool = False

    @property
    def outcome(self) -> str:
        return "forced" if self.forced else "promoted" if self.promote else "rejected"

    def force(self, reason: str) -> Decision:
        """The same comparison, promoted anyway by a person who gave ``reason``."""
        if self.promote:
            return self
        reason = f"{reason} (the gate said: {self.reason})"
        return replace(self, promote=True, forced=True, reason=reason)

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"outcome": self.outcome}


def _points(x: float) -> str:
    return f"{100 * x:.2f} points"


def decide(
    challenger: ModelEvaluation | None,
    champion: ModelEvaluation | None,
    champion_version: str | None,
    policy: PromotionConfig,
) -> Decision:
    """Promote when test accuracy rises by at least ``policy.margin`` (and by more than nothing)
    and no class loses more than ``policy.class_tolerance``; ties, missing metrics and different
    test sets never promote."""

    def verdict(promote: bool, reason: str, **kw: object) -> Decision:
        return Decision(promote, reason, challenger, champion, champion_version, **kw)  # type: ignore[arg-type]

    if challenger is None:
        return verdict(False, "the challenger has no test metrics")
    if champion_version is None:
        return verdict(True, "there is no champion yet")
    if champion is None:
        return verdict(False, f"the champion (version {champion_version}) has no test metrics to compare")
    if not challenger.same_test_set(champion):
        return verdict(
            False,
            f"different test sets: the challenger's {challenger.describe_test_set()}, the champion's "
            f"(version {champion_version}) {champion.describe_test_set()}; their accuracies do not compare",
        )
    if set(challenger.class_accuracy) != set(champion.class_accuracy):
        return verdict(False, "the challenger and the champion name different classes")
    delta = challenger.accuracy - champion.accuracy
    scores = (
        f"test accuracy {100 * challenger.accuracy:.2f}% vs the champion's {100 * champion.accuracy:.2f}%"
    )
    if abs(delta) <= TIE:
        return verdict(False, f"a tie: {scores}", delta=0.0)
    if delta < policy.margin:
        return verdict(
            False,
            f"{scores}: {delta * 100:+.2f} points, below the margin of {_points(policy.margin)}",
            delta=delta,
        )
    drops = {
        name: champion.class_accuracy[name] - acc
        for name, acc in challenger.class_accuracy.items()
        if champion.class_accuracy[name] - acc > policy.class_tolerance + TIE
    }
    if drops:
        worst = ", ".join(
            f"{name!r} loses {_points(d)}" for name, d in sorted(drops.items(), key=lambda x: -x[1])
        )
        return verdict(
            False,
            f"{scores} ({delta * 100:+.2f} points), but {worst}, more than the tolerance of "
            f"{_points(policy.class_tolerance)}",
            delta=delta,
            regressions=drops,
        )
    return verdict(
        True,
        f"{scores} ({delta * 100:+.2f} points, margin {_points(policy.margin)}); no class loses more than "
        f"{_points(policy.class_tolerance)}",
        delta=delta,
    )
