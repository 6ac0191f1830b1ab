from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.plots import (
    confusion_matrix,
    confusion_matrix_plot,
    embedding_map,
    label_efficiency_curve,
    pretraining_curve,
    stratified_sample,
)

CLASSES = ["t-shirt", "trouser", "pullover"]


def assert_png(path: Path, min_side: int = 200) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert min(image.size) >= min_side and max(image.size) < 4000


def sweep_rows() -> list[dict]:
    bases = {"knn": 0.6, "linear": 0.65, "finetune": 0.7, "supervised": 0.5, "mae": 0.62}
    budgets = [("10 a class", 100), ("1%", 600), ("10%", 6000), ("100%", 60000)]
    return [
        {"protocol": p, "budget_label": b, "num_labels": n, "mean": base + n / 3e5, "std": 0.02, "n": 3}
        for p, base in bases.items()
        for b, n in budgets
    ]


def test_pretraining_curve_draws_each_protocol_against_epochs_beside_scratch(tmp_path: Path) -> None:
    rows = [
        {"protocol": p, "epochs": e, "mean": base + e / 100, "std": 0.01, "n": 3}
        for p, base in {"knn": 0.7, "linear": 0.75, "finetune": 0.8}.items()
        for e in (1, 3, 10)
    ]
    rows += [{"protocol": "supervised", "epochs": e, "mean": 0.79, "std": 0.005, "n": 3} for e in (1, 3, 10)]
    assert_png(pretraining_curve(rows, tmp_path / "curve.png", "1% (600 labels)"))
    with pytest.raises(ValueError, match="no pretrained protocol"):
        pretraining_curve(rows[-3:], tmp_path / "scratch.png", "1%")


def test_label_efficiency_curve_writes_png_and_creates_folder(tmp_path: Path) -> None:
    path = label_efficiency_curve(sweep_rows(), tmp_path / "new" / "dir" / "curve.png")
    assert path == tmp_path / "new" / "dir" / "curve.png"
    assert_png(path)


@pytest.mark.parametrize("std", [0.0, float("nan"), None])
def test_label_efficiency_curve_single_fraction_single_seed(tmp_path: Path, std: float | None) -> None:
    rows = [
        {"protocol": "linear", "budget_label": "10%", "num_labels": 6000, "mean": 0.8, "std": std, "n": 1},
        {
            "protocol": "supervised",
            "budget_label": "10%",
            "num_labels": 6000,
            "mean": 0.7,
            "std": std,
            "n": 1,
        },
    ]
    assert_png(label_efficiency_curve(rows, str(tmp_path / "one.png"), title="one point"))


def test_label_efficiency_curve_rejects_no_rows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no rows"):
        label_efficiency_curve([], tmp_path / "empty.png")


def test_confusion_matrix_counts_match_hand_computed() -> None:
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    predictions = [0, 0, 1, 1, 2, 2, 2, 0, 2]
    expected = np.array([[2, 1, 0], [0, 1, 1], [1, 0, 3]])
    counts = confusion_matrix(labels, predictions, 3)
    assert counts.dtype == np.int64 and counts.shape == (3, 3)
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_array_equal(confusion_matrix(torch.tensor(labels), np.array(predictions), 3), expected)


def test_confusion_matrix_counts_unseen_classes_as_zero() -> None:
    np.testing.assert_array_equal(confusion_matrix([1, 1], [1, 0], 4).sum(axis=1), [0, 2, 0, 0])


@pytest.mark.parametrize(
    ("labels", "predictions", "message"),
    [
        ([0, 1, 2], [0, 1], "differ in length: 3 vs 2"),
        ([0, 3, 1], [0, 1, 1], r"labels contain 3, outside \[0, 3\)"),
        ([0, -1], [0, 1], r"labels contain -1, outside \[0, 3\)"),
        ([0, 1], [0, 5], r"predictions contain 5, outside \[0, 3\)"),
        ([[0, 1]], [0, 1], "labels must be 1-D"),
    ],
)
def test_confusion_matrix_rejects_bad_input(labels: list, predictions: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        confusion_matrix(labels, predictions, 3)


def test_confusion_matrix_plot_writes_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    predictions = np.where(rng.random(200) < 0.7, labels, rng.integers(0, 3, 200))
    assert_png(confusion_matrix_plot(labels, predictions, CLASSES, tmp_path / "cm" / "cm.png"))


def test_stratified_sample_keeps_every_class_and_respects_max_points() -> None:
    labels = np.array([0] * 900 + [1] * 90 + [2] * 9 + [3])
    picked = stratified_sample(labels, 100, seed=0)
    assert len(picked) == 100 and len(np.unique(picked)) == 100
    assert np.all(np.diff(picked) > 0)
    assert set(labels[picked]) == {0, 1, 2, 3}
    assert np.sum(labels[picked] == 0) >= 85  # roughly proportional


def test_stratified_sample_is_seeded() -> None:
    labels = np.random.default_rng(1).integers(0, 10, 5000)
    first = stratified_sample(labels, 500, seed=7)
    np.testing.assert_array_equal(first, stratified_sample(labels, 500, seed=7))
    assert not np.array_equal(first, stratified_sample(labels, 500, seed=8))


def test_stratified_sample_keeps_everything_when_small_and_rejects_too_many_classes() -> None:
    np.testing.assert_array_equal(stratified_sample([2, 0, 1], 10, seed=0), [0, 1, 2])
    with pytest.raises(ValueError, match="cannot keep all 3 classes"):
        stratified_sample([0, 1, 2, 0], 2, seed=0)


def blobs(n: int, dims: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    centres = rng.normal(size=(len(CLASSES), dims)) * 5
    return (centres[labels] + rng.normal(size=(n, dims))).astype(np.float32), labels


def test_embedding_map_writes_png_for_a_tiny_set(tmp_path: Path) -> None:
    features, labels = blobs(20, 8)
    assert_png(embedding_map(features, labels, CLASSES, tmp_path / "tiny.png"))


def test_embedding_map_subsamples_and_reduces_wide_torch_features(tmp_path: Path) -> None:
    features, labels = blobs(300, 96)
    path = embedding_map(
        torch.from_numpy(features),
        torch.from_numpy(labels),
        CLASSES,
        tmp_path / "e.png",
        max_points=120,
        seed=3,
    )
    assert_png(path)


def test_embedding_map_rejects_mismatched_lengths(tmp_path: Path) -> None:
    features, labels = blobs(20, 4)
    with pytest.raises(ValueError, match="differ in length"):
        embedding_map(features[:10], labels, CLASSES, tmp_path / "bad.png")
