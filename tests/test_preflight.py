"""Checks before work (``ssl-pipeline run --check``): each failure one sentence naming the setting
or the file, with its exit code, before Prefect, the data step or pretraining start."""

import shutil
from collections import Counter
from pathlib import Path

import pytest

from ssl_models.data import DataError
from tasks.config import ConfigError, load_config
from tasks.preflight import SourceCount, check_disk, preflight
from tests.conftest import free_port
from tests.test_pipeline import run_cli
from tests.test_project import write_class_folders

# Budgets 200 labels can hold (the default 1% is one label a class: nothing left once a fifth selects).
BUDGETS = ["evaluate.label_fractions=[1.0]", "evaluate.finetune_fractions=[0.5]"]
SETS = [arg for key in BUDGETS for arg in ("--set", key)]


@pytest.fixture
def project(tmp_path: Path, fashion_mnist_dir: Path) -> Path:
    """A user's project (``ssl-pipeline init``) on class folders of 20 Fashion-MNIST images a class."""
    images = write_class_folders(tmp_path / "images", fashion_mnist_dir, per_class=20)
    done = run_cli(
        "init",
        "proj",
        "--unlabeled",
        str(images),
        "--labeled",
        str(images),
        "--test",
        str(images),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return tmp_path / "proj"


def test_run_check_passes_or_names_the_budget_the_labels_cannot_hold(project: Path) -> None:
    ok = run_cli("run", "--check", *SETS, "--set", "evaluate.labels_per_class=[10]", cwd=project)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok  labels: 200 in 10 classes" in ok.stdout and "Checks passed" in ok.stdout
    too_many = run_cli("run", "--check", *SETS, "--set", "evaluate.labels_per_class=[25]", cwd=project)
    assert too_many.returncode == 2, too_many.stdout + too_many.stderr
    assert (
        "check failed: evaluate.labels_per_class: 25 labels a class, but a class has only 20 labeled images"
        in too_many.stdout
    )
    assert not (project / "workspace").exists()  # nothing ran: no Prefect, no data step
    assert not (project / "data").exists()


def test_each_check_names_what_is_wrong(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project)
    cfg = load_config(overrides=BUDGETS)
    assert [line.split(":")[0] for line in preflight(cfg)] == [
        "servers",
        "backbone",
        "labels",
        "images",
        "disk",
    ]

    with pytest.raises(
        ConfigError, match=r"^model.backbone: small_cnn cannot take 8x8 images \(data.image_size\)"
    ):
        preflight(load_config(overrides=[*BUDGETS, "data.image_size=8"]))
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectionError, match=rf"^cannot reach {url} \(tracking.tracking_uri\)"):
        preflight(load_config(overrides=[*BUDGETS, f"tracking.tracking_uri={url}"]))
    only_some = project.parent / "images_0_to_4"
    only_some.mkdir()
    for c in range(5):
        (project.parent / "images" / f"class_{c}").rename(only_some / f"class_{c}")
    with pytest.raises(
        DataError, match=r"class 'class_5' of the test set has no labeled image in .*images_0_to_4"
    ):
        preflight(load_config(overrides=[*BUDGETS, f"data.labeled_dir={only_some}"]))


def test_the_disk_check_counts_what_the_sources_would_add(tmp_path: Path) -> None:
    cfg = load_config(overrides=[f"data.dvc.root={tmp_path}"])
    free = shutil.disk_usage(tmp_path).free
    fits = SourceCount("unlabeled", "a source", 1, free // 4, Counter(), None)
    assert check_disk(cfg, [fits]).startswith("disk:")
    too_big = SourceCount("unlabeled", "a source", 1, free, Counter(), None)
    with pytest.raises(ConfigError, match=r"^data.dvc.root: .* GiB free, the datasets need about"):
        check_disk(cfg, [too_big])
