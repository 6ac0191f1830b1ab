"""Label-efficiency sweeps on Ray Tune, on real Fashion-MNIST (the smoke subset) and a real local Ray.

One MLflow parent run per sweep, one child run per trial; the curve the parent logs is made
of the children's numbers; ASHA stops a trial with a bad learning rate within its own cell;
frozen features are computed once per (encoder, data version).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from ssl_models.evaluate import extract_features
from tasks import evaluate, plots, progress, tracking
from tasks.config import EvaluateConfig, PipelineConfig, load_config
from tasks.data import PreparedData, ingest_and_prepare
from tasks.evaluate import (
    Features,
    LabelBudget,
    TrialSpec,
    eval_inputs,
    feature_cache_path,
    label_splits,
    run_trial,
    trial_encoder,
    trial_specs,
)
from tasks.pretrain import build_encoder
from tasks.streaming import read_images
from tasks.sweep import run_sweep
from tests.conftest import REPO

TEN_PCT = LabelBudget(fraction=0.1)


def config(workspace: Path, *overrides: str) -> PipelineConfig:
    return load_config(
        REPO / "params.yaml", "smoke", [f"workspace={workspace}", "data.dvc.enabled=false", *overrides]
    )


def encoder_file(cfg: PipelineConfig, data: PreparedData, seed: int = 1) -> str:
    """An encoder's weights as a pretraining leaves them (here: a random init of the backbone)."""
    path = cfg.workspace_path / f"encoder-{seed}.pt"
    encoder = build_encoder(cfg.model_copy(update={"seed": seed}), data.mean, data.std)
    torch.save(encoder.state_dict(), path)
    return str(path)


def children(client: MlflowClient, run_id: str) -> list:  # type: ignore[type-arg]
    experiment = client.get_run(run_id).info.experiment_id
    return client.search_runs([experiment], f"tags.mlflow.parentRunId = '{run_id}'", max_results=1000)


def test_sweep_logs_a_child_run_per_trial_and_a_curve_made_of_their_numbers(
    ray_cluster: str, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    cfg = config(
        tmp_path / "ws",
        "evaluate.labels_per_class=[5]",
        "evaluate.seeds=[0, 1]",
        "evaluate.distill.enabled=true",
    )
    data = ingest_and_prepare(cfg)
    run_id = tracking.start_run(cfg, data, "sweep")
    reports: list[tuple[str, int, int]] = []
    with progress.listening(lambda *report: reports.append(report)):
        output = run_sweep(cfg, data, encoder_file(cfg, data), tracking.trial_runs(cfg, run_id))
    figures = plots.sweep_figures(output)
    tracking.log_sweep(cfg, run_id, output, figures)
    tracking.end_run(cfg, run_id)

    # Every cell of the grid: each protocol at 5 labels a class, kNN and linear at 10% and 100%,
    # fine-tune, distillation and scratch at 10%; the label column counts every label a cell used
    # (1,000 labeled, 10% of each class rounded).
    labels = read_images(cfg, data.labeled).labels
    ten_pct = len(TEN_PCT.draw(labels, 0))  # type: ignore[arg-type]
    assert 95 <= ten_pct <= 105
    assert {(c.protocol, c.budget.name, c.num_labels) for c in output.cells} == {
        *((p, "5_per_class", 50) for p in evaluate.PROTOCOLS),
        ("knn", "10pct", ten_pct),
        ("knn", "100pct", 1000),
        ("linear", "10pct", ten_pct),
        ("linear", "100pct", 1000),
        ("finetune", "10pct", ten_pct),
        ("distill", "10pct", ten_pct),
        ("supervised", "10pct", ten_pct),
    }
    search = trial_specs(cfg, 0)
    seeds = cfg.evaluate.seeds
    searched = [c for c in output.cells if c.protocol != "distill"]
    repeats = [(c.cell, seed) for c in searched for seed in seeds[1:]]  # kNN too
    distilled = [(c.cell, seed) for c in output.cells if c.protocol == "distill" for seed in seeds]
    assert len(output.trials) == len(search) + len(repeats) + len(distilled)
    # The progress bars' feed: each finished trial, counted per phase, up to the phase's size.
    for phase, size in (("search", len(search)), ("repeat", len(repeats)), ("distill", len(distilled))):
        counts = [done for what, done, total in reports if what == f"sweep: {phase} trials" and total == size]
        assert counts == list(range(1, size + 1)), (phase, reports)

    client = tracking.client_for(cfg)
    runs = children(client, run_id)
    assert len(runs) == len(output.trials)
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.info.run_id for r in runs} == {t.run_id for t in output.trials}
    assert {r.data.tags["sweep.phase"] for r in runs} == {"search", "repeat", "distill"}

    # The three figures are PNG artifacts of the parent run.
    artifacts = tmp_path / "artifacts"
    client.download_artifacts(run_id, "sweep", str(artifacts))
    for name in ("label_efficiency.png", "confusion_matrix.png", "embedding_tsne.png"):
        with Image.open(artifacts / "sweep" / name) as image:
            assert image.format == "PNG" and min(image.size) > 200, name

    # The curve's numbers are the selected child runs' test accuracies, mean and std over seeds.
    curve = json.loads((artifacts / "sweep" / "label_efficiency.json").read_text())
    parent = client.get_run(run_id).data
    assert len(curve) == len(output.cells)
    for point in curve:
        cell = f"{point['protocol']}-{point['budget']}"
        selected = [
            r
            for r in runs
            if r.data.tags["sweep.cell"] == cell and r.data.tags.get("sweep.selected") == "true"
        ]
        accuracies = [r.data.metrics["test_accuracy"] for r in selected]
        assert len(accuracies) == point["n"] == len(cfg.evaluate.seeds), cell
        assert sorted(int(r.data.params["seed"]) for r in selected) == list(range(point["n"]))
        assert point["mean"] == pytest.approx(np.mean(accuracies), abs=1e-9), cell
        assert point["std"] == pytest.approx(np.std(accuracies, ddof=1) if len(accuracies) > 1 else 0.0), cell
        name = f"{point['protocol']}_top1_{point['budget']}"
        assert parent.metrics[name] == pytest.approx(point["mean"])
        for key, value in point["params"].items():  # the selected config, in the parent's params
            assert json.loads(parent.params[f"best.{cell}.{key}"]) == value
            assert {r.data.params[key] for r in selected} == {str(value)}
        if point["protocol"] == "distill":
            # Each seed's student learned from that seed's fine-tuned model of the selected config.
            budget = point["budget"]
            for run in selected:
                teacher = next(
                    r
                    for r in runs
                    if r.data.tags["sweep.cell"] == f"finetune-{budget}"
                    and r.data.tags.get("sweep.selected") == "true"
                    and r.data.params["seed"] == run.data.params["seed"]
                )
                assert teacher.data.tags["ray.trial_id"] in run.data.tags["sweep.teacher_checkpoint"]
            continue
        # Selection used validation accuracy: no other finished trial of the cell beat it there.
        best_val = max(r.data.metrics["val_accuracy"] for r in selected if r.data.params["seed"] == "0")
        rivals = [
            r for r in runs if r.data.tags["sweep.cell"] == cell and r.data.tags["sweep.phase"] == "search"
        ]
        assert best_val == max(
            r.data.metrics["val_accuracy"] for r in rivals if "test_accuracy" in r.data.metrics
        )
    assert parent.metrics["gain_finetune_vs_supervised_10pct"] == pytest.approx(
        parent.metrics["finetune_top1_10pct"] - parent.metrics["supervised_top1_10pct"]
    )
    assert parent.tags["sweep.best_cell"] == output.best_cell


def test_asha_stops_a_trial_with_a_bad_learning_rate_before_its_budget(
    ray_cluster: str, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    cfg = config(
        tmp_path / "ws",
        "evaluate.label_fractions=[1.0]",
        "evaluate.finetune_fractions=[1.0]",
        "evaluate.seeds=[0]",
        "evaluate.finetune.steps=40",
        "evaluate.search.finetune.lr=[0.001, 10.0]",  # 10 diverges at once
        "evaluate.asha.reports=4",
        "evaluate.max_concurrent_trials=1",  # the good trial reaches each rung first
    )
    data = ingest_and_prepare(cfg)
    run_id = tracking.start_run(cfg, data, "sweep")
    output = run_sweep(cfg, data, encoder_file(cfg, data), tracking.trial_runs(cfg, run_id))

    by_name = {t.spec.name: t for t in output.trials}
    for protocol in ("finetune", "supervised"):
        good, bad = by_name[f"{protocol}-100pct-lr0.001-seed0"], by_name[f"{protocol}-100pct-lr10-seed0"]
        assert not good.stopped_early and good.reports == 4 and good.test_accuracy is not None
        assert bad.stopped_early and bad.reports < 4 and bad.test_accuracy is None
        assert bad.val_accuracy < good.val_accuracy  # type: ignore[operator]
        run = tracking.client_for(cfg).get_run(bad.run_id)  # type: ignore[arg-type]
        assert run.info.status == "FINISHED" and run.data.tags["sweep.stopped_early"] == "true"
        assert run.data.metrics["progress"] < 1.0 and "test_accuracy" not in run.data.metrics
    # The other cells' trials were never compared with these: none of them was stopped.
    assert all(not t.stopped_early for t in output.trials if t.spec.protocol in ("knn", "linear"))


def budgets(*fractions: float, per_class: tuple[int, ...] = ()) -> list[LabelBudget]:
    return [LabelBudget(per_class=n) for n in per_class] + [LabelBudget(fraction=f) for f in fractions]


def test_each_cell_trains_and_selects_within_its_own_budget_drawn_per_seed() -> None:
    labels = torch.arange(10).repeat_interleave(100)
    ev = EvaluateConfig(
        labels_per_class=[10], label_fractions=[0.1, 0.5, 1.0], finetune_fractions=[0.1], seeds=[0, 1]
    )
    splits = label_splits(labels, ev, seed=0)
    assert set(splits) == {(s, b) for s in (0, 1) for b in budgets(0.1, 0.5, 1.0, per_class=(10,))}
    for (seed, budget), split in splits.items():
        # Disjoint parts that make up the budget, a fifth of it (stratified) to select on.
        assert torch.equal(split.indices.sort().values, budget.draw(labels, seed))
        assert not set(split.train.tolist()) & set(split.select.tolist())
        per_class = budget.per_class or round(budget.fraction * 100)  # type: ignore[operator]
        assert split.num_labels == 10 * per_class
        assert torch.bincount(labels[split.select]).tolist() == [round(0.2 * per_class)] * 10
    for seed in (0, 1):  # a seed's budgets are nested: 5 a class within 10% within 50%
        drawn = [set(b.draw(labels, seed).tolist()) for b in budgets(0.1, 0.5, per_class=(5,))]
        assert drawn[0] < drawn[1] < drawn[2]
    ten = LabelBudget(fraction=0.1)
    assert not torch.equal(splits[0, ten].train, splits[1, ten].train)  # each seed its own labels
    one_each = ev.model_copy(update={"labels_per_class": [1]})
    with pytest.raises(ValueError, match=r"evaluate.selection_share: the budget of 1 a class \(10 labels\)"):
        label_splits(labels, one_each, seed=0)


def test_a_separate_validation_split_is_shared_and_counted_in_every_cell() -> None:
    labels = torch.arange(10).repeat_interleave(100)
    ev = EvaluateConfig(
        labels_per_class=[3],
        label_fractions=[0.1, 1.0],
        finetune_fractions=[0.1],
        seeds=[0, 1],
        selection="validation",
        validation_size=200,
    )
    splits = label_splits(labels, ev, seed=0)
    validation = splits[0, LabelBudget(fraction=0.1)].select
    assert len(validation) == 200 and torch.bincount(labels[validation]).tolist() == [20] * 10
    for (_, budget), split in splits.items():
        assert torch.equal(split.select, validation)
        assert not set(split.train.tolist()) & set(validation.tolist())
        per_class = budget.per_class or round(budget.fraction * 80)  # type: ignore[operator]
        assert torch.bincount(labels[split.train]).tolist() == [per_class] * 10
        assert split.num_labels == len(split.train) + 200
    with pytest.raises(ValueError, match=r"evaluate.validation_size: 1000 is not below the 1000"):
        label_splits(labels, ev.model_copy(update={"validation_size": 1000}), seed=0)


def test_trial_inputs_hold_features_labels_and_the_splits_images_not_the_datasets(
    ray_cluster: str, fashion_mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(tmp_path / "ws", "evaluate.seeds=[0, 1]", "evaluate.distill.enabled=true")
    data = ingest_and_prepare(cfg)
    encoder = encoder_file(cfg, data)
    inputs = eval_inputs(cfg, data, encoder)
    path = feature_cache_path(cfg, data, encoder)
    assert path.exists() and feature_cache_path(cfg, data, encoder_file(cfg, data, seed=2)) != path

    # The features a pass of Ray Data computed are the encoder's on the decoded images, in order.
    labeled, test = read_images(cfg, data.labeled), read_images(cfg, data.test)
    model = build_encoder(cfg, data.mean, data.std)
    model.load_state_dict(torch.load(encoder, weights_only=True))
    assert torch.allclose(inputs.features.labeled, extract_features(model, labeled.images), atol=1e-5)
    assert torch.allclose(inputs.features.test, extract_features(model, test.images), atol=1e-5)
    assert torch.equal(inputs.labels, labeled.labels) and torch.equal(inputs.test_labels, test.labels)
    # Images are held for each seed's fine-tuning budget only, and are the right ones.
    seeds = cfg.evaluate.seeds
    finetune = [inputs.splits[seed, TEN_PCT].indices for seed in seeds]
    assert len(seeds) > 1 and not torch.equal(finetune[0], finetune[1])
    held = set().union(*(set(idx.tolist()) for idx in finetune))
    assert len(inputs.held) == len(held) < len(inputs.labels)
    assert torch.equal(inputs.images(finetune[1]), labeled.images[finetune[1]])

    # A cell reads no label outside its budget: with every other label changed, every other labeled
    # feature and held image replaced, each protocol's trial predicts and validates exactly as before.
    budget = finetune[0]
    outside = torch.ones(len(inputs.labels), dtype=torch.bool)
    outside[budget] = False
    g = torch.Generator().manual_seed(7)
    labels = inputs.labels.clone()
    labels[outside] = (labels[outside] + torch.randint(1, 10, (int(outside.sum()),), generator=g)) % 10
    features = inputs.features.labeled.clone()
    features[outside] = torch.randn(features[outside].shape, generator=g)
    held_images = inputs.held_images.clone()
    held_images[~torch.isin(inputs.held, budget)] = 0
    scrambled = replace(
        inputs, labels=labels, features=Features(features, inputs.features.test), held_images=held_images
    )
    cells = [spec for spec in trial_specs(cfg, seeds[0], search=False) if spec.budget == TEN_PCT]
    assert sorted(spec.protocol for spec in cells) == sorted(set(evaluate.PROTOCOLS) - {"distill"})
    outcomes = {}
    for spec in cells:
        honest, other = run_trial(cfg, spec, inputs), run_trial(cfg, spec, scrambled)
        assert honest.val_accuracy == other.val_accuracy, spec.protocol
        assert torch.equal(honest.test_predictions, other.test_predictions), spec.protocol
        outcomes[spec.protocol] = honest
    # The distilled student reads the unlabeled images and its cell's labels, nothing more.
    teacher = outcomes["finetune"].classifier_state
    [student] = evaluate.distill_specs(cfg.evaluate, {(seeds[0], TEN_PCT): "its checkpoint"})
    pool = evaluate.unlabeled_batches(cfg, data)
    honest, other = (
        run_trial(cfg, student, replace(i, unlabeled=pool), teacher_state=teacher)
        for i in (inputs, scrambled)
    )
    assert honest.val_accuracy == other.val_accuracy
    assert torch.equal(honest.test_predictions, other.test_predictions)
    with pytest.raises(ValueError, match="needs its teacher"):
        run_trial(cfg, student, inputs)
    # Each seed starts the baseline from its own initialisation; the pretrained arm from the encoder.
    specs = {(p, s): TrialSpec(p, TEN_PCT, s, {}) for p in ("supervised", "finetune") for s in seeds[:2]}
    weights = {k: next(trial_encoder(cfg, inputs, spec).parameters()) for k, spec in specs.items()}
    assert not torch.equal(weights["supervised", seeds[0]], weights["supervised", seeds[1]])
    assert torch.equal(weights["finetune", seeds[0]], weights["finetune", seeds[1]])
    assert torch.equal(torch.cat([images for images, _ in inputs.test_batches()]), test.images)

    calls = []
    monkeypatch.setattr(evaluate.streaming, "features", lambda *a, **k: calls.append(1))
    again = eval_inputs(cfg, data, encoder)  # from disk, nothing recomputed
    assert calls == [] and torch.equal(again.features.labeled, inputs.features.labeled)


@pytest.mark.parametrize(("steps", "reports"), [(10, 4), (300, 4), (20, 2), (5, 4), (1, 4), (7, 7)])
def test_a_trial_reports_at_most_asha_reports_times_the_last_at_its_end(steps: int, reports: int) -> None:
    every = evaluate._eval_every(steps, reports)
    made = [s for s in range(1, steps) if s % every == 0] + [steps]
    assert len(made) <= reports and made[-1] == steps
