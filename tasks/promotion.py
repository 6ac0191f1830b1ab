"""The promotion gate: does a challenger beat the champion? Plain logic, no MLflow.

A model's evaluation is its top-1 and per-class accuracy on one test set, named by that set's
content hash (and DVC version). Two evaluations are compared only on the same test set, and
image by image: the gate tests the images one model gets right and the other wrong (McNemar).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch
from scipy.stats import binom

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


@dataclass(frozen=True)
class HeldOutPredictions:
    """A model's class index for every test image, beside the labels, in the test set's order."""

    FILE: ClassVar[str] = "model_test_predictions.pt"
    ARTIFACT_DIR: ClassVar[str] = "sweep"  # in the MLflow run that logged the model

    labels: torch.Tensor
    predictions: torch.Tensor
    classes: tuple[str, ...]  # the class of index i

    def save(self, path: str | Path) -> None:
        saved = {"test_labels": self.labels, "predictions": self.predictions, "classes": list(self.classes)}
        torch.save(saved, path)

    @classmethod
    def load(cls, path: str | Path) -> HeldOutPredictions:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return cls(saved["test_labels"], saved["predictions"], tuple(saved["classes"]))

    @property
    def correct(self) -> torch.Tensor:
        return self.predictions == self.labels


def evaluate_saved_predictions(path: str | Path, test: DatasetRef) -> ModelEvaluation:
    """The evaluation of a sweep's best model from its saved test predictions (``HeldOutPredictions``)."""
    saved = HeldOutPredictions.load(path)
    return evaluate_predictions(saved.labels, saved.predictions, saved.classes, test)


@dataclass(frozen=True)
class McNemar:
    """The exact McNemar test on two models' predictions of the same images: only the images
    one gets right and the other wrong count; with no difference between the models each of
    those is equally likely to favour either (a binomial with p = 1/2)."""

    gained: int  # images the challenger gets right and the champion wrong
    lost: int  # images the champion gets right and the challenger wrong

    @classmethod
    def of(cls, challenger: torch.Tensor, champion: torch.Tensor) -> McNemar:
        """From the two models' per-image correctness (boolean tensors, same images, same order)."""
        return cls(int((challenger & ~champion).sum()), int((champion & ~challenger).sum()))

    def p_better(self) -> float:
        """One-sided p-value of "the challenger is no better": P(X >= gained), X ~ B(gained + lost, 1/2)."""
        n = self.gained + self.lost
        return float(binom.sf(self.gained - 1, n, 0.5)) if n else 1.0

    def p_worse(self) -> float:
        """One-sided p-value of "the challenger is no worse"."""
        return McNemar(self.lost, self.gained).p_better()


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
    paired: McNemar | None = None  # the image-by-image comparison, when it was made
    p_value: float | None = None  # one-sided exact McNemar: "the challenger is no better"

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


def _class_drops(
    challenger: ModelEvaluation,
    champion: ModelEvaluation,
    paired: tuple[HeldOutPredictions, HeldOutPredictions],
    policy: PromotionConfig,
) -> dict[str, float]:
    """Classes whose accuracy falls by more than the tolerance, with the gate's confidence (the
    one-sided McNemar test of the class's images): class -> accuracy lost."""
    new, old = paired
    drops = {}
    for name, acc in challenger.class_accuracy.items():
        drop = champion.class_accuracy[name] - acc
        if drop <= policy.class_tolerance + TIE:
            continue
        images = new.labels == new.classes.index(name)
        if McNemar.of(new.correct[images], old.correct[images]).p_worse() <= 1 - policy.confidence:
            drops[name] = drop
    return drops


def decide(
    challenger: ModelEvaluation | None,
    champion: ModelEvaluation | None,
    champion_version: str | None,
    policy: PromotionConfig,
    paired: tuple[HeldOutPredictions, HeldOutPredictions] | None = None,
) -> Decision:
    """Promote when test accuracy rises by at least ``policy.margin`` (and by more than nothing),
    the exact McNemar test on ``paired`` (the challenger's and the champion's test predictions)
    says the challenger is better with ``policy.confidence``, and no class loses more than
    ``policy.class_tolerance`` with that confidence; ties, missing metrics or predictions and
    different test sets never promote."""

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
    if paired is None:
        return verdict(
            False,
            f"{scores}, but the challenger's or the champion's (version {champion_version}) test "
            "predictions are not saved; the gate compares the two image by image",
            delta=delta,
        )
    new, old = paired
    if new.classes != old.classes or not torch.equal(new.labels, old.labels):
        return verdict(False, "the challenger's and the champion's saved test labels differ", delta=delta)
    test = McNemar.of(new.correct, old.correct)
    p = test.p_better()
    evidence = f"{test.gained} images gained, {test.lost} lost: one-sided exact McNemar p = {p:.2g}"
    stats = {"delta": delta, "paired": test, "p_value": p}
    if p > 1 - policy.confidence:
        return verdict(
            False,
            f"{scores} ({delta * 100:+.2f} points), not better with {policy.confidence:.0%} confidence "
            f"({evidence})",
            **stats,
        )
    drops = _class_drops(challenger, champion, paired, policy)
    if drops:
        worst = ", ".join(
            f"{name!r} loses {_points(d)}" for name, d in sorted(drops.items(), key=lambda x: -x[1])
        )
        return verdict(
            False,
            f"{scores} ({delta * 100:+.2f} points, {evidence}), but {worst}, more than the tolerance of "
            f"{_points(policy.class_tolerance)} with {policy.confidence:.0%} confidence",
            regressions=drops,
            **stats,
        )
    return verdict(
        True,
        f"{scores} ({delta * 100:+.2f} points, margin {_points(policy.margin)}; {evidence}); no class "
        f"loses more than {_points(policy.class_tolerance)} with {policy.confidence:.0%} confidence",
        **stats,
    )
