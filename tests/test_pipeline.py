"""The whole flow, end to end, as a user runs it: the CLI in a fresh process, real Prefect
(ephemeral API), real MLflow (SQLite), real Fashion-MNIST (the smoke profile's subset)."""

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from ssl_models.data import load_fashion_mnist
from tests.conftest import REPO

CLI = [sys.executable, "-m", "flows.cli"]


def run_cli_env(prefect_api: str | None = None) -> dict[str, str]:
    """The environment of a user's shell: none of the test process's Prefect or MLflow settings;
    ``prefect_api``: a Prefect server's API URL, as a user with one exports it (else the CLI starts
    a temporary server)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["PYTHONPATH"] = str(REPO)
    env["COLUMNS"] = "200"
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    return env


def run_cli(
    *args: str, cwd: Path = REPO, timeout: int = 600, prefect_api: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], cwd=cwd, env=run_cli_env(prefect_api), capture_output=True, text=True, timeout=timeout
    )


def smoke_args(workspace: Path, *overrides: str, command: str = "run") -> list[str]:
    """``ssl-pipeline COMMAND --profile smoke`` with ``--set`` overrides; the datasets' DVC
    repository is ``<workspace>/dvc-repo`` (by default it is the current folder)."""
    defaults = (f"workspace={workspace}", f"data.dvc.root={workspace / 'dvc-repo'}")
    sets = [arg for key in (*defaults, *overrides) for arg in ("--set", key)]
    return [command, "--config", str(REPO / "params.yaml"), "--profile", "smoke", *sets]


def smoke_run(
    workspace: Path, *overrides: str, timeout: int = 600, prefect_api: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``ssl-pipeline run --profile smoke`` in the workspace's parent folder."""
    args = smoke_args(workspace, *overrides)
    return run_cli(*args, cwd=workspace.parent, timeout=timeout, prefect_api=prefect_api)


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


def test_a_label_budget_the_data_cannot_hold_fails_before_any_work(tmp_path: Path) -> None:
    """One label a class leaves nothing to train on once a fifth is held out to select on: known
    from the source's listing, so neither Prefect nor the data step starts (exit code 2)."""
    out = smoke_run(tmp_path / "ws", "evaluate.labels_per_class=[1]", "data.dvc.enabled=false", timeout=600)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "check failed: evaluate.selection_share: the budget of 1 a class (10 labels)" in out.stdout
    assert "Starting temporary server" not in out.stdout + out.stderr
    assert not (tmp_path / "ws").exists()


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


# Slow: one smoke run, killed in pretraining and run again, that the tests below look at as a user would.
# The run that resumes starts its own temporary Prefect server, as a user's does; the other commands
# use one Prefect server (a user's PREFECT_API_URL), each saving the ~15 s of starting one.

EPOCHS = 4  # 512 images in batches of 128: 4 steps an epoch
MODEL = "ssl-pipeline-fashion-mnist"


def session_pids(sid: int) -> list[int]:
    """Processes of a session (the CLI and what it started: Ray's GCS, raylet, workers)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True, check=True).stdout
    return [int(pid) for pid, s in (line.split() for line in out.splitlines()) if int(s) == sid]


def kill_session(sid: int) -> None:
    for pid in session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def registered_step(workspace: Path) -> int:
    """The step of the latest checkpoint Ray Train registered for the workspace's pretraining."""
    for state in (workspace / "ray").glob("pretrain-*/checkpoint_manager_snapshot.json"):
        with contextlib.suppress(ValueError, KeyError, TypeError):  # being written
            return int(json.loads(state.read_text())["latest_checkpoint_result"]["metrics"]["step"])
    return 0


def epochs_trained(output: str) -> list[int]:
    return [int(m) for m in re.findall(r"pretrain epoch (\d+)/\d+", output)]


@dataclass(frozen=True)
class SmokeRun:
    folder: Path  # where the commands ran
    workspace: Path
    args: list[str]  # the command: `run --profile smoke` with its --set keys
    prefect_api: str
    killed_after_step: int  # the latest checkpoint Ray had registered when the first run was killed
    killed: str  # the killed run's output
    resumed: str  # the second run's output
    report: dict[str, Any]  # what the second run's --report wrote

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, cwd=self.folder, prefect_api=self.prefect_api)

    def again(self, report: Path) -> str:
        """The same command with ``--report``; its output, once it has succeeded."""
        done = self.cli(*self.args, "--report", str(report))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout + done.stderr

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.workspace / 'mlflow.db'}"

    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri, registry_uri=self.tracking_uri)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory, prefect_server: str) -> SmokeRun:
    """``ssl-pipeline run --profile smoke`` killed with SIGKILL (no handler runs, as when a machine
    dies) once Ray has registered epoch 1's checkpoint, then the same command again."""
    folder = tmp_path_factory.mktemp("smoke")
    workspace = folder / "ws"
    args = smoke_args(workspace, f"pretrain.epochs={EPOCHS}")
    with (folder / "killed.log").open("w+") as log:
        first = subprocess.Popen(
            [*CLI, *args],
            cwd=folder,
            env=run_cli_env(prefect_server),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 400
            while (kept := registered_step(workspace)) < 4:
                assert first.poll() is None, Path(log.name).read_text()[-3000:]
                assert time.monotonic() < deadline, "pretraining never reached the end of epoch 1"
                time.sleep(0.05)
        finally:
            kill_session(first.pid)
            first.wait()
        killed = Path(log.name).read_text()
    report = folder / "report.json"
    # The run the tests look at is a user's default: its own temporary Prefect server.
    out = run_cli(*args, "--report", str(report), cwd=folder, timeout=900)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
    resumed, summary = out.stdout + out.stderr, json.loads(report.read_text())
    return SmokeRun(folder, workspace, args, prefect_server, kept, killed, resumed, summary)


@pytest.mark.slow
def test_a_run_killed_in_pretraining_resumes_from_its_checkpoint_and_the_cached_data(smoke: SmokeRun) -> None:
    assert "Task run 'prepare-data" in smoke.killed and "sweep-and-log-model" not in smoke.killed
    # The data stage's result came from the cache the killed run left.
    assert re.search(r"Task run 'prepare-data-\w+' - Finished in state Cached", smoke.resumed)
    # Pretraining resumed from the last checkpoint Ray registered: only the epochs after it ran again.
    step = smoke.report["pretrain_resumed_from_step"]
    assert step >= smoke.killed_after_step and step % 4 == 0, (step, smoke.killed_after_step)
    assert epochs_trained(smoke.resumed) == list(range(step // 4 + 1, EPOCHS + 1)), step
    assert "version 1 promoted to champion: there is no champion yet" in smoke.resumed
    # Its MLflow run holds every epoch once, those of the killed run included.
    client = smoke.client()
    history = client.get_metric_history(smoke.report["pretrain_run_id"], "pretrain_loss")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))


@pytest.mark.slow
def test_the_run_registers_a_champion_with_its_data_code_and_runs(smoke: SmokeRun) -> None:
    import mlflow

    workspace, out = smoke.workspace, smoke.resumed
    assert "supervised (scratch)" in out and "The champion is version 1" in out
    # Everything the runs wrote is inside the workspace.
    assert sorted(p.name for p in smoke.folder.iterdir()) == ["killed.log", "report.json", "ws"]
    client = smoke.client()
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == "1"
    # Two runs: the pretraining, and the sweep that evaluated its encoder (the model's run).
    run = client.get_run(champion.run_id)
    pretraining = client.get_run(run.data.tags["sweep.pretrain_run"])
    assert champion.tags["pretrain.run_id"] == pretraining.info.run_id == smoke.report["pretrain_run_id"]
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
    assert "With 10% of the labels, finetune from the pretrained encoder is" in out
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'", max_results=1000
    )
    assert len(children) > 10 and {c.info.status for c in children} == {"FINISHED"}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "sweep")}
    for figure in ("label_efficiency.png", "confusion_matrix.png", "embedding_tsne.png"):
        assert f"sweep/{figure}" in artifacts
    assert "sweep/model_test_predictions.pt" in artifacts  # what a later gate pairs with its challenger
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

    result = smoke.report
    assert {r["protocol"] for r in result["accuracy"]} == {"knn", "linear", "finetune", "supervised"}
    assert result["data_sha256"]["unlabeled"] == run.data.tags["data.unlabeled.sha256"]
    assert result["gain_over_supervised"]["10pct"] == pytest.approx(
        metrics["gain_finetune_vs_supervised_10pct"], abs=1e-4
    )

    # The registered model loads and classifies real test images as well as the run measured.
    import torch

    model_source = client.get_model_version_download_uri(MODEL, champion.version)
    assert model_source.startswith((workspace / "mlartifacts").as_uri()), model_source
    mlflow.set_tracking_uri(smoke.tracking_uri)
    mlflow.set_registry_uri(smoke.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
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
    chain = run_cli("lineage", f"models:/{MODEL}@champion", "--set", f"workspace={workspace}", timeout=120)
    assert chain.returncode == 0, chain.stdout + chain.stderr
    for split in splits:
        assert f"{split}: DVC md5 {champion.tags[f'data.{split}.dvc_md5']}" in chain.stdout
    assert f"pretraining run {pretraining.info.run_id} (FINISHED" in chain.stdout
    assert f"git {champion.tags['git.commit']}" in chain.stdout


@pytest.mark.slow
def test_the_same_command_again_takes_every_stage_from_the_cache(smoke: SmokeRun) -> None:
    """The same MLflow runs, nothing trained, nothing registered."""
    again_report = smoke.folder.parent / f"{smoke.folder.name}-again.json"
    output = smoke.again(again_report)
    for stage in ("prepare-data", "pretraining", "sweep-and-log-model"):
        assert re.search(rf"Task run '{stage}-\w+' - Finished in state Cached", output), stage
    assert epochs_trained(output) == [] and "Task run 'sweep-" not in output.replace(
        "sweep-and-log-model", ""
    )
    assert "not registered: version 1 already holds these weights" in output
    again = json.loads(again_report.read_text())
    assert (again["registered"], again["model_version"]) == (False, "1")
    runs = ("pretrain_run_id", "sweep_run_id")
    assert [again[k] for k in runs] == [smoke.report[k] for k in runs]


@pytest.mark.slow
def test_corrupt_new_data_stops_the_run_naming_the_file_and_keeps_what_is_stored(
    smoke: SmokeRun, tmp_path: Path, fashion_mnist_dir: Path
) -> None:
    """One sentence naming the file; what the registry and the workspace already hold is untouched."""
    train, test = load_fashion_mnist(fashion_mnist_dir)
    for i, split in enumerate(20 * ["unlabeled", "labeled/a", "labeled/b", "test/a", "test/b"]):
        # Images the stored datasets do not hold on the other side: test images past the smoke
        # run's 500 for the new test set, training images for the rest.
        pixels = test.images[5000 + i, 0] if split.startswith("test") else train.images[i, 0]
        (tmp_path / "new" / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.numpy()).save(tmp_path / "new" / split / f"{i}.png")
    (tmp_path / "new" / "test" / "a" / "scan-0001.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    data = smoke.workspace / "dvc-repo" / "data"
    stored = {p: p.read_bytes() for p in sorted(data.rglob("*")) if p.is_file()}
    bad = smoke_run(
        smoke.workspace,
        "data.source=folder",
        f"data.unlabeled_dir={tmp_path / 'new' / 'unlabeled'}",
        f"data.labeled_dir={tmp_path / 'new' / 'labeled'}",
        f"data.test_dir={tmp_path / 'new' / 'test'}",
        prefect_api=smoke.prefect_api,
    )
    assert bad.returncode == 3, bad.stdout + bad.stderr  # bad data
    assert "ssl-pipeline run failed: DataError:" in bad.stdout and "scan-0001.png" in bad.stdout
    assert "Traceback" not in bad.stdout + bad.stderr  # a user's error: the traceback is in the log
    log = Path(re.search(r"The whole log, with the traceback: (\S+)", bad.stdout)[1])  # type: ignore[index]
    assert "Traceback" in (smoke.workspace.parent / log).read_text()
    client = smoke.client()
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 1
    assert {p: p.read_bytes() for p in sorted(data.rglob("*")) if p.is_file()} == stored


@pytest.mark.slow
def test_the_sweep_command_evaluates_the_encoder_of_a_pretraining_run(smoke: SmokeRun) -> None:
    """``ssl-pipeline sweep --pretrain-run`` on the smoke run's pretraining, with kNN and the linear
    probe at 10% on one seed (the full grid is what the pipeline ran)."""
    pretrain_run = smoke.report["pretrain_run_id"]
    sets = (
        "evaluate.label_fractions=[0.1]",
        "evaluate.finetune_fractions=[]",
        "evaluate.primary_protocol=linear",
        "evaluate.seeds=[0]",
    )
    common = smoke_args(smoke.workspace, f"pretrain.epochs={EPOCHS}", *sets, command="sweep")

    missing = smoke.cli(*common, "--pretrain-run", "0" * 32)
    assert missing.returncode == 1
    assert f"--pretrain-run {'0' * 32}: no such MLflow run" in missing.stdout
    other = smoke.cli(*common, "--pretrain-run", pretrain_run, "--set", "model.backbone=tiny_cnn")
    assert other.returncode == 1
    assert "model.backbone: the pretraining run used 'small_cnn', this config says 'tiny_cnn'" in other.stdout

    swept = smoke.cli(*common, "--pretrain-run", pretrain_run)
    assert swept.returncode == 0, swept.stdout + swept.stderr
    sweep_run = re.search(r"MLflow sweep run (\w+);", swept.stdout).group(1)  # type: ignore[union-attr]
    assert sweep_run != smoke.report["sweep_run_id"]
    run = smoke.client().get_run(sweep_run)
    assert run.data.tags["sweep.pretrain_run"] == pretrain_run and run.info.status == "FINISHED"
    assert 0.1 < run.data.metrics["linear_top1_10pct"] <= 1.0
    assert "linear_top1_100pct" not in run.data.metrics and "finetune_top1_10pct" not in run.data.metrics
