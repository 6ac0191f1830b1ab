"""The whole flow, end to end, as a user runs it: the CLI in a fresh process, real Prefect
(ephemeral API), real MLflow (SQLite), real Fashion-MNIST (the smoke profile's subset)."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import REPO

CLI = [sys.executable, "-m", "flows.cli"]


def run_cli_env() -> dict[str, str]:
    """The environment of a user's shell: none of the test process's Prefect or MLflow settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["PYTHONPATH"] = str(REPO)
    env["COLUMNS"] = "200"
    return env


def run_cli(*args: str, cwd: Path = REPO, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], cwd=cwd, env=run_cli_env(), capture_output=True, text=True, timeout=timeout
    )


def smoke_args(workspace: Path, *overrides: str, command: str = "run") -> list[str]:
    """``ssl-pipeline COMMAND --profile smoke`` with ``--set`` overrides; the datasets' DVC
    repository is ``<workspace>/dvc-repo`` (by default it is the current folder)."""
    defaults = (f"workspace={workspace}", f"data.dvc.root={workspace / 'dvc-repo'}")
    sets = [arg for key in (*defaults, *overrides) for arg in ("--set", key)]
    return [command, "--config", str(REPO / "params.yaml"), "--profile", "smoke", *sets]


def smoke_run(
    workspace: Path, *overrides: str, report: Path | None = None, timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    """``ssl-pipeline run --profile smoke`` in the workspace's parent folder."""
    extra = ["--report", str(report)] if report else []
    return run_cli(*smoke_args(workspace, *overrides), *extra, cwd=workspace.parent, timeout=timeout)


def test_methods_lists_methods_and_backbones() -> None:
    out = run_cli("methods", timeout=120)
    assert out.returncode == 0, out.stderr
    listed = out.stdout.split()
    methods = ["simclr", "moco", "byol", "simsiam", "barlow_twins", "vicreg", "dino", "mae", "rotation"]
    for name in [*methods, "relative_patch", "small_cnn", "tiny_cnn", "resnet18", "vit_tiny", "vit_small"]:
        assert name in listed or f"{name}," in listed, name


def test_bad_config_fails_before_any_work_naming_the_key(tmp_path: Path) -> None:
    out = smoke_run(tmp_path / "ws", "pretrain.lr=-0.1", timeout=120)
    assert out.returncode == 2
    assert "pretrain.lr: Input should be greater than 0" in out.stdout
    assert not (tmp_path / "ws").exists()


def test_a_label_budget_the_data_cannot_hold_fails_before_pretraining(tmp_path: Path) -> None:
    """One label a class leaves nothing to train on once a fifth is held out to select on: known as
    soon as the labels are read, so pretraining never starts."""
    out = smoke_run(tmp_path / "ws", "evaluate.labels_per_class=[1]", "data.dvc.enabled=false", timeout=600)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "evaluate.selection_share: the budget of 1 a class (10 labels)" in out.stdout
    assert "Task run 'check-label-budgets" in out.stdout + out.stderr
    assert (
        "pretrain epoch" not in out.stdout + out.stderr
        and "Task run 'pretraining" not in out.stdout + out.stderr
    )


def read_test_set(data: Path, version: Any) -> tuple[np.ndarray, Any]:
    """The test set's images (N x H x W uint8, decoded from the shards' PNG bytes) and class indices
    in the order of the model's classes (the labeled set's, sorted)."""
    import pyarrow.parquet as pq
    import torch

    classes = sorted(json.loads(version.tags["eval.class_accuracy"]))
    rows = [
        row
        for shard in sorted((data / "test" / "shards").glob("*.parquet"))
        for row in pq.read_table(shard).to_pylist()
    ]
    images = np.stack([np.asarray(Image.open(io.BytesIO(row["image"]))) for row in rows])
    return images, torch.tensor([classes.index(row["label"]) for row in rows])


@pytest.mark.slow
def test_smoke_run_registers_a_champion_and_bad_data_keeps_it(tmp_path: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    workspace = tmp_path / "ws"
    report = tmp_path / "report.json"
    out = smoke_run(workspace, report=report)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "supervised (scratch)" in out.stdout and "The champion is version 1" in out.stdout
    assert "version 1 promoted to champion: there is no champion yet" in out.stdout

    # Everything the run wrote is inside the workspace.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "ws"]
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    name = "ssl-pipeline-fashion-mnist"
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == "1"
    # Two runs: the pretraining, and the sweep that evaluated its encoder (the model's run).
    run = client.get_run(champion.run_id)
    pretraining = client.get_run(run.data.tags["sweep.pretrain_run"])
    assert champion.tags["pretrain.run_id"] == pretraining.info.run_id
    assert champion.tags["sweep.run_id"] == run.info.run_id
    assert run.info.status == pretraining.info.status == "FINISHED"
    assert (run.data.tags["pipeline.step"], pretraining.data.tags["pipeline.step"]) == ("sweep", "pretrain")
    metrics = run.data.metrics
    for key in (
        "knn_top1_10pct",
        "linear_top1_10pct",
        "linear_top1_100pct",
        "finetune_top1_10pct",
        "supervised_top1_10pct",
    ):
        assert 0.1 < metrics[key] <= 1.0, key
    assert metrics["gain_finetune_vs_supervised_10pct"] == pytest.approx(
        metrics["finetune_top1_10pct"] - metrics["supervised_top1_10pct"]
    )
    assert "With 10% of the labels, finetune from the pretrained encoder is" in out.stdout
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'", max_results=1000
    )
    assert len(children) > 10 and {c.info.status for c in children} == {"FINISHED"}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "sweep")}
    for figure in ("label_efficiency.png", "confusion_matrix.png", "embedding_tsne.png"):
        assert f"sweep/{figure}" in artifacts
    assert "sweep/model_test_predictions.pt" in artifacts  # what a later gate pairs with its challenger
    history = client.get_metric_history(pretraining.info.run_id, "pretrain_loss")
    assert [m.step for m in history] == [1, 2]
    assert run.data.params["pretrain.method"] == "simclr"
    assert len(run.data.tags["data.unlabeled.sha256"]) == 64
    assert len(champion.tags["git.commit"]) == 40  # the code's commit, though cwd is no checkout
    assert champion.tags["data.test.sha256"] == run.data.tags["data.test.sha256"]

    # The data step is DVC-backed: the run and the model version name the DVC versions of the
    # dataset folders, which the local remote holds.
    dvc_repo = workspace / "dvc-repo"
    splits = ("unlabeled", "labeled", "test")
    for split in splits:
        recorded = yaml.safe_load((dvc_repo / "data" / f"{split}.dvc").read_text())["outs"][0]["md5"]
        assert run.data.tags[f"data.{split}.dvc_md5"] == champion.tags[f"data.{split}.dvc_md5"] == recorded
    inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert {split: d.digest for split, d in inputs.items()} == {
        split: run.data.tags[f"data.{split}.dvc_md5"] for split in splits
    }
    assert inputs["unlabeled"].source_type == "dvc"
    # The remote holds every file of the three dataset folders (shards, manifests, records), each
    # under its md5, and DVC's listing of each folder.
    pushed = [p for p in (workspace / "dvc-remote").rglob("*") if p.is_file()]
    stored = [p for p in (dvc_repo / "data").glob("*/**/*") if p.is_file()]
    assert len(stored) == 12 and len(pushed) == len({p.read_bytes() for p in stored}) + 3

    result = json.loads(report.read_text())
    assert {r["protocol"] for r in result["accuracy"]} == {"knn", "linear", "finetune", "supervised"}
    assert result["data_sha256"]["unlabeled"] == run.data.tags["data.unlabeled.sha256"]
    assert result["gain_over_supervised"]["10pct"] == pytest.approx(
        metrics["gain_finetune_vs_supervised_10pct"], abs=1e-4
    )

    # The registered model loads and classifies real test images as well as the run measured.
    import torch

    model_source = client.get_model_version_download_uri(name, champion.version)
    assert model_source.startswith((workspace / "mlartifacts").as_uri()), model_source
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    images, labels = read_test_set(dvc_repo / "data", champion)
    answer = model.predict(images)  # uint8, N x H x W
    predicted = torch.tensor(answer["class_index"].tolist())
    accuracy = (predicted == labels).float().mean().item()
    assert float(champion.tags["eval.test_accuracy"]) == pytest.approx(accuracy, abs=1e-6)
    assert set(answer["class"]) <= set(json.loads(champion.tags["eval.class_accuracy"]))
    best = [c for c in children if c.data.tags["sweep.cell"] == run.data.tags["sweep.best_cell"]]
    best_seed0 = [
        c for c in best if c.data.params["seed"] == "0" and c.data.tags.get("sweep.selected") == "true"
    ]
    assert accuracy == pytest.approx(best_seed0[0].data.metrics["test_accuracy"], abs=1e-6)

    # Lineage: the DVC versions of the data, the code, both runs.
    chain = run_cli("lineage", f"models:/{name}@champion", "--set", f"workspace={workspace}", timeout=120)
    assert chain.returncode == 0, chain.stdout + chain.stderr
    for split in splits:
        assert f"{split}: DVC md5 {champion.tags[f'data.{split}.dvc_md5']}" in chain.stdout
    assert f"pretraining run {pretraining.info.run_id} (FINISHED" in chain.stdout
    assert f"git {champion.tags['git.commit']}" in chain.stdout

    # A corrupt image in new data stops the run with one sentence naming the file; what the
    # registry and the workspace already hold is untouched.
    for split in ("unlabeled", "labeled/a", "labeled/b", "test/a", "test/b"):
        (tmp_path / "new" / split).mkdir(parents=True)
    (tmp_path / "new" / "test" / "a" / "scan-0001.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    stored = {p: p.read_bytes() for p in sorted((dvc_repo / "data").rglob("*")) if p.is_file()}
    bad = smoke_run(
        workspace,
        "data.source=folder",
        f"data.unlabeled_dir={tmp_path / 'new' / 'unlabeled'}",
        f"data.labeled_dir={tmp_path / 'new' / 'labeled'}",
        f"data.test_dir={tmp_path / 'new' / 'test'}",
    )
    assert bad.returncode == 1
    assert "ssl-pipeline run failed: DataError:" in bad.stdout and "scan-0001.png" in bad.stdout
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert len(client.search_model_versions(f"name='{name}'")) == 1
    assert {p: p.read_bytes() for p in sorted((dvc_repo / "data").rglob("*")) if p.is_file()} == stored
