"""PNG figures of a label-efficiency sweep: accuracy curves, a confusion matrix and a t-SNE map.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never through pyplot, so
they need no display and share no global state.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from numpy.typing import ArrayLike

if TYPE_CHECKING:
    from tasks.sweep import SweepOutput

PROTOCOL_LABELS = {
    "knn": "kNN (frozen)",
    "linear": "linear probe (frozen)",
    "finetune": "fine-tuned",
    "distill": "distilled on the unlabeled images",
    "supervised": "supervised from scratch",
}
DPI = 120


def _numpy(x: Any) -> np.ndarray:
    # np.asarray fails on torch tensors that are on a GPU or require grad.
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return np.asarray(x)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def _spread(rows: Sequence[Mapping[str, Any]]) -> str:
    """What the error bars are, from the rows' seed counts ``n``."""
    seeds = {int(r.get("n", 1)) for r in rows}
    if seeds == {1}:
        return "single seed"
    return f"mean ± std over {seeds.pop()} seeds" if len(seeds) == 1 else "mean ± std over seeds"


def label_efficiency_curve(
    rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "Label efficiency"
) -> Path:
    """Test accuracy against the number of labels, one line per protocol, error bars = std over seeds.

    ``rows``: dicts with ``protocol``, ``num_labels``, ``budget_label`` (e.g. ``1%``, ``10 a class``),
    ``mean`` and ``std`` (accuracy in [0, 1]) and ``n`` (seeds). The supervised baseline is dashed.
    """
    if not rows:
        raise ValueError("label_efficiency_curve: no rows to plot")
    by_protocol: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        by_protocol[str(row["protocol"])].append(row)
    # Known protocols first, in a fixed order, so each keeps its colour from run to run.
    order = [p for p in PROTOCOL_LABELS if p in by_protocol] + sorted(set(by_protocol) - set(PROTOCOL_LABELS))

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for protocol in order:
        group = sorted(by_protocol[protocol], key=lambda r: int(r["num_labels"]))
        baseline = protocol == "supervised"
        ax.errorbar(
            [int(r["num_labels"]) for r in group],
            [100 * float(r["mean"]) for r in group],
            # A single seed has no spread: std may be 0, missing or NaN (ddof=1).
            yerr=np.nan_to_num([100 * float(r.get("std") or 0.0) for r in group]),
            capsize=4,
            linestyle="--" if baseline else "-",
            marker="s" if baseline else "o",
            markersize=4 if baseline else 5,
            color="0.35" if baseline else None,
            label=PROTOCOL_LABELS.get(protocol, protocol),
        )

    ticks = sorted({(int(r["num_labels"]), str(r["budget_label"])) for r in rows})
    ax.set_xscale("log")
    ax.set_xticks([n for n, _ in ticks], [f"{label}\n{n:,}" for n, label in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("labels a cell used (log scale)")
    ax.set_ylabel(f"test accuracy (%)\n{_spread(rows)}")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    return _save(fig, path)


def pretraining_curve(
    rows: Sequence[Mapping[str, Any]], path: str | Path, budget: str, title: str = "What pretraining buys"
) -> Path:
    """Test accuracy at one label budget against pretraining epochs, one line per protocol, error
    bars = std over seeds; supervised from scratch (no pretraining) as a dashed level with its std.

    ``rows``: dicts with ``protocol``, ``epochs``, ``mean`` and ``std`` (accuracy in [0, 1]), ``n``.
    """
    pretrained = [r for r in rows if r["protocol"] != "supervised"]
    if not pretrained:
        raise ValueError("pretraining_curve: no pretrained protocol's rows to plot")
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    protocols = {str(r["protocol"]) for r in pretrained}
    for protocol in [p for p in PROTOCOL_LABELS if p in protocols] + sorted(protocols - set(PROTOCOL_LABELS)):
        group = sorted((r for r in pretrained if r["protocol"] == protocol), key=lambda r: int(r["epochs"]))
        ax.errorbar(
            [int(r["epochs"]) for r in group],
            [100 * float(r["mean"]) for r in group],
            yerr=np.nan_to_num([100 * float(r.get("std") or 0.0) for r in group]),
            capsize=4,
            marker="o",
            markersize=5,
            label=PROTOCOL_LABELS.get(protocol, protocol),
        )
    scratch = [r for r in rows if r["protocol"] == "supervised"]
    if scratch:
        level = 100 * float(np.mean([float(r["mean"]) for r in scratch]))
        spread = 100 * float(np.mean([float(r.get("std") or 0.0) for r in scratch]))
        ax.axhline(level, linestyle="--", color="0.35", label=PROTOCOL_LABELS["supervised"])
        ax.axhspan(level - spread, level + spread, color="0.35", alpha=0.12)
    epochs = sorted({int(r["epochs"]) for r in pretrained})
    ax.set_xscale("log")
    ax.set_xticks(epochs, [str(e) for e in epochs])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("pretraining epochs (log scale)")
    ax.set_ylabel(f"test accuracy at {budget} (%)\n{_spread(rows)}")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    return _save(fig, path)


def _class_ids(values: ArrayLike, num_classes: int, name: str) -> np.ndarray:
    ids = _numpy(values)
    if ids.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {ids.shape}")
    ids = ids.astype(np.int64)
    outside = ids[(ids < 0) | (ids >= num_classes)]
    if outside.size:
        raise ValueError(f"{name} contain {outside[0]}, outside [0, {num_classes})")
    return ids


def confusion_matrix(labels: ArrayLike, predictions: ArrayLike, num_classes: int) -> np.ndarray:
    """int64 ``[num_classes, num_classes]`` counts: rows are true classes, columns predicted ones."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    y = _class_ids(labels, num_classes, "labels")
    p = _class_ids(predictions, num_classes, "predictions")
    if len(y) != len(p):
        raise ValueError(f"labels and predictions differ in length: {len(y)} vs {len(p)}")
    counts = np.bincount(y * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def confusion_matrix_plot(
    labels: ArrayLike,
    predictions: ArrayLike,
    classes: Sequence[str],
    path: str | Path,
    title: str = "Confusion matrix",
) -> Path:
    """Heat map of the row-normalised confusion matrix, counts written in the cells, accuracy in the title."""
    k = len(classes)
    counts = confusion_matrix(labels, predictions, k)
    total = int(counts.sum())
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    accuracy = np.trace(counts) / max(total, 1)

    side = max(4.0, 0.5 * k + 2.0)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    # Beyond ~30 classes the numbers no longer fit in their cells; the colours still read.
    if k <= 30:
        for i, j in np.ndindex(k, k):
            colour = "white" if rates[i, j] > 0.5 else "black"
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8, color=colour)
    ax.set_xticks(range(k), list(classes), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\naccuracy {100 * accuracy:.1f}% (n={total})")
    return _save(fig, path)


def stratified_sample(labels: ArrayLike, max_points: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``max_points`` rows, classes in proportion and each kept at least once."""
    y = _numpy(labels).reshape(-1)
    n = len(y)
    if n <= max_points:
        return np.arange(n)
    classes, sizes = np.unique(y, return_counts=True)
    if len(classes) > max_points:
        raise ValueError(f"max_points={max_points} cannot keep all {len(classes)} classes")
    # One per class, then the rest by largest remainder, so the total is exactly max_points.
    spare = max_points - len(classes)
    share = (sizes - 1) * spare / (n - len(classes))
    quota = 1 + np.floor(share).astype(np.int64)
    leftover = max_points - int(quota.sum())
    quota[np.argsort(-(share - np.floor(share)), kind="stable")[:leftover]] += 1

    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(y == c), size=q, replace=False) for c, q in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate(chosen))


def embedding_map(
    features: ArrayLike,
    labels: ArrayLike,
    classes: Sequence[str],
    path: str | Path,
    max_points: int = 2000,
    seed: int = 0,
    title: str = "t-SNE of test-set embeddings",
) -> Path:
    """2-D t-SNE of a seeded, class-stratified subsample of ``features`` ([N, D]), coloured by class."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = _numpy(features)
    x = x.reshape(len(x), -1).astype(np.float32)
    y = _class_ids(labels, len(classes), "labels")
    if len(x) != len(y):
        raise ValueError(f"features and labels differ in length: {len(x)} vs {len(y)}")
    if len(x) < 3:
        raise ValueError(f"t-SNE needs at least 3 points, got {len(x)}")
    keep = stratified_sample(y, max_points, seed)
    x, y = x[keep], y[keep]
    if x.shape[1] > 50:  # t-SNE's cost grows with the dimension; 50 PCA components keep the structure.
        x = PCA(n_components=min(50, len(x)), random_state=seed).fit_transform(x)
    tsne = TSNE(n_components=2, init="pca", perplexity=float(min(30, len(x) - 1)), random_state=seed)
    xy = tsne.fit_transform(x)

    fig = Figure(figsize=(7, 6))
    ax = fig.add_subplot()
    # tab10 repeats colours past ten classes; tab20 keeps them apart up to twenty.
    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    for i, name in enumerate(classes):
        mask = y == i
        if mask.any():
            ax.scatter(
                xy[mask, 0], xy[mask, 1], s=5, color=cmap(i % cmap.N), label=name, alpha=0.8, linewidths=0
            )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{title} (n={len(keep)})")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=3, fontsize=8, frameon=False)
    return _save(fig, path)


def sweep_figures(output: SweepOutput) -> list[Path]:
    """The sweep's three figures, and the curve's numbers as JSON beside them, in its folder."""
    import json

    import torch

    from tasks.promotion import HeldOutPredictions

    folder = Path(output.folder)
    saved = HeldOutPredictions.load(output.test_predictions_path)
    features = torch.load(output.test_features_path, map_location="cpu", weights_only=True)
    (folder / "label_efficiency.json").write_text(json.dumps(output.curve(), indent=2) + "\n")
    best = output.best_cell
    return [
        folder / "label_efficiency.json",
        label_efficiency_curve(output.curve(), folder / "label_efficiency.png"),
        confusion_matrix_plot(
            saved.labels,
            saved.predictions,
            output.classes,
            folder / "confusion_matrix.png",
            title=f"Confusion matrix: {best}, test set",
        ),
        embedding_map(
            features,
            saved.labels,
            output.classes,
            folder / "embedding_tsne.png",
            title="t-SNE of the pretrained encoder's test-set features",
        ),
    ]
