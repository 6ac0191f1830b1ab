"""A project of a user's own: ``ssl-pipeline init``, the built-in defaults, the installed wheel."""

import csv
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from PIL import Image

from ssl_models.data import load_fashion_mnist
from tasks.config import BUILT_IN_PARAMS, load_config
from tests.conftest import REPO
from tests.test_pipeline import run_cli


def write_class_folders(
    root: Path, fashion_mnist_dir: Path, mode: str = "L", per_class: int = 3, split: str = "train"
) -> Path:
    """``per_class`` Fashion-MNIST images of each class (of the ``split`` set) as PNG files in one
    sub-folder per class (``mode`` "RGB": colour files)."""
    train, test = load_fashion_mnist(fashion_mnist_dir)
    images = train if split == "train" else test
    written = dict.fromkeys(range(10), 0)
    for i, label in enumerate(images.labels.tolist()):
        if written[label] < per_class:
            folder = root / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images.images[i, 0].numpy()).convert(mode).save(folder / f"{i}.png")
            written[label] += 1
        if min(written.values()) == per_class:
            return root
    raise AssertionError("Fashion-MNIST has fewer images of a class")


def test_init_makes_a_project_for_a_users_folders(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    images = write_class_folders(tmp_path / "images", fashion_mnist_dir, mode="RGB")
    table = tmp_path / "images" / "labels.csv"
    table.write_text(
        "path,label\n"
        + "".join(f"{p.relative_to(images)},{p.parent.name}\n" for p in sorted(images.rglob("*.png")))
    )
    done = run_cli(
        "init",
        "proj",
        "--unlabeled",
        "images",
        "--labeled",
        "images/labels.csv",
        "--test",
        "images",
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Next: cd proj && ssl-pipeline run" in done.stdout
    project = tmp_path / "proj"
    cfg = load_config(project / "params.yaml")
    assert cfg.data.source == "folder"
    assert cfg.data.unlabeled_dir == str(images) and cfg.data.labeled_dir == str(table)
    assert (cfg.data.channels, cfg.data.image_size) == (3, 28)  # read from the first labeled image
    assert cfg.tracking.registered_model == "proj"
    text = (project / "params.yaml").read_text()
    assert "# fashion_mnist | folder" in text  # the built-in file's comments stay
    assert set((project / ".gitignore").read_text().split()) >= {"workspace/", ".venv/"}
    assert (project / ".git").is_dir() and (project / ".dvc" / "config").is_file()
    dvc_config = (project / ".dvc" / "config").read_text()
    assert "workspace/dvc-remote" in dvc_config and str(tmp_path) not in dvc_config  # no machine path

    again = run_cli("init", "proj", cwd=tmp_path, timeout=120)
    assert again.returncode == 2
    assert "params.yaml: the folder is a project already" in again.stdout
    assert (project / "params.yaml").read_text() == text


def test_init_refuses_a_missing_source_naming_the_option(tmp_path: Path) -> None:
    done = run_cli("init", "proj", "--unlabeled", "nowhere", "--labeled", ".", "--test", ".", cwd=tmp_path)
    assert done.returncode == 2
    assert "--unlabeled nowhere: no such folder or label table" in done.stdout
    assert not (tmp_path / "proj").exists()


def test_without_a_params_file_the_built_in_defaults_apply(tmp_path: Path) -> None:
    shown = run_cli("config", cwd=tmp_path, timeout=120)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    built_in = yaml.safe_load(BUILT_IN_PARAMS.read_text())
    assert json.loads(shown.stdout)["tracking"] == built_in["tracking"]
    named = run_cli("config", "--config", "missing.yaml", cwd=tmp_path)
    assert named.returncode == 2 and "missing.yaml: config file not found" in named.stdout


def test_the_wheel_carries_the_built_in_params_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            tmp_path / "dist",
            REPO,
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("ssl_pipeline-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert z.read("tasks/default_params.yaml") == (REPO / "params.yaml").read_bytes()
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, wheel],
        check=True,
        timeout=300,
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)}
    shown = subprocess.run(
        [
            sys.executable,
            "-c",
            "import tasks, sys; print(tasks.__file__); sys.argv[1:] = ['config']; "
            "from flows.cli import main; main()",
        ],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(str(site))  # the installed wheel's code, not the checkout's
    assert '"profile": "default"' in shown.stdout


@pytest.mark.slow
def test_a_new_user_goes_from_their_folders_to_predictions(
    tmp_path: Path, fashion_mnist_dir: Path, prefect_server: str
) -> None:
    """Outside the checkout: ``init`` on class folders whose labels come as a CSV, ``run --check``
    refusing a budget the labels cannot hold, ``run`` (smoke), then ``export`` and ``predict``."""
    train = write_class_folders(tmp_path / "images" / "train", fashion_mnist_dir, per_class=40)
    test = write_class_folders(tmp_path / "images" / "test", fashion_mnist_dir, per_class=10, split="test")
    table = tmp_path / "images" / "labels.csv"
    rows = [f"{p.relative_to(table.parent)},{p.parent.name}" for p in sorted(train.rglob("*.png"))]
    table.write_text("path,label\n" + "\n".join(rows) + "\n")
    made = run_cli(
        "init", "proj", "--unlabeled", str(train), "--labeled", str(table), "--test", str(test), cwd=tmp_path
    )
    assert made.returncode == 0, made.stdout + made.stderr
    project = tmp_path / "proj"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, cwd=project, timeout=900, prefect_api=prefect_server)

    refused = cli("run", "--check", "--profile", "smoke", "--set", "evaluate.labels_per_class=[50]")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert (
        "evaluate.labels_per_class: 50 labels a class, but a class has only 40 labeled images"
        in refused.stdout
    )
    assert not (project / "workspace").exists()

    ran = cli("run", "--profile", "smoke")
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "The champion is version 1" in ran.stdout

    exported = cli("export", "models:/proj@champion", "--format", "onnx", "--out", "exported")
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert {p.name for p in (project / "exported").iterdir()} >= {
        "encoder.onnx",
        "classifier.onnx",
        "README.md",
    }

    (test / "class_0" / "notes.txt").write_text("not an image")
    (test / "class_0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    predicted = cli("predict", "models:/proj@champion", str(test), "--out", "predictions.csv")
    assert predicted.returncode == 0, predicted.stdout + predicted.stderr
    assert "Classified 100 of 101 images into predictions.csv; 1 could not be read" in predicted.stdout
    with (project / "predictions.csv").open() as f:
        written = list(csv.DictReader(f))
    assert len(written) == 101
    good = [r for r in written if not r["error"]]
    assert {r["class"] for r in good} <= {f"class_{i}" for i in range(10)}
    assert all(0 < float(r["probability"]) <= 1 for r in good)
    (bad,) = [r for r in written if r["error"]]
    assert bad["path"].endswith("broken.png") and "cannot decode" in bad["error"]
