"""The data step: sources, limits, content hashes and errors that name the file."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_models.data import DataError
from tasks.config import load_config
from tasks.data import PreparedData, load_dataset, prepare_data
from tests.conftest import REPO


def save_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((28, 28), value, dtype=np.uint8)).save(path)


def folder_config(tmp_path: Path, *extra: str):
    return load_config(
        REPO / "params.yaml",
        "smoke",
        [
            "data.source=folder",
            f"data.unlabeled_dir={tmp_path / 'unlabeled'}",
            f"data.labeled_dir={tmp_path / 'labeled'}",
            f"data.test_dir={tmp_path / 'test'}",
            f"workspace={tmp_path / 'ws'}",
            *extra,
        ],
    )


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    for i in range(6):
        save_png(tmp_path / "unlabeled" / f"u{i}.png", 10 * i)
    for offset, split in enumerate(("labeled", "test")):
        for cls in ("boot", "shirt"):
            for i in range(3):
                save_png(tmp_path / split / cls / f"{i}.png", 40 * i + (0 if cls == "boot" else 5) + offset)
    return tmp_path


def test_folder_source_is_stored_under_content_hashes(folders: Path) -> None:
    prepared = prepare_data(folder_config(folders))
    assert prepared.unlabeled.num_images == 6 and prepared.labeled.classes == ("boot", "shirt")
    labeled = load_dataset(prepared.labeled)
    assert labeled.labels is not None and labeled.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert prepared.labeled.digest != prepared.test.digest
    # The same content gives the same hash; one changed pixel gives another.
    assert prepare_data(folder_config(folders)).digests() == prepared.digests()
    save_png(folders / "unlabeled" / "u0.png", 11)
    changed = prepare_data(folder_config(folders))
    assert changed.unlabeled.digest != prepared.unlabeled.digest
    assert changed.labeled.digest == prepared.labeled.digest
    assert Path(prepared.unlabeled.path).exists()  # the previous version is kept


def test_corrupt_image_stops_the_step_naming_it_or_is_listed(folders: Path) -> None:
    bad = folders / "unlabeled" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=r"broken\.png: cannot decode image"):
        prepare_data(folder_config(folders))
    prepared = prepare_data(folder_config(folders, "data.skip_corrupt=true"))
    assert prepared.unlabeled.num_images == 6
    assert [Path(f).name for f, _ in prepared.unlabeled.skipped] == ["broken.png"]


def test_test_classes_must_match_labeled_classes(folders: Path) -> None:
    save_png(folders / "test" / "hat" / "0.png", 1)
    with pytest.raises(DataError, match=r"classes \['boot', 'hat', 'shirt'\] differ"):
        prepare_data(folder_config(folders))


def test_fashion_mnist_limits_and_round_trip(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    cfg = load_config(REPO / "params.yaml", "smoke", [f"workspace={tmp_path}"])
    prepared = prepare_data(cfg)
    assert (prepared.unlabeled.num_images, prepared.labeled.num_images, prepared.test.num_images) == (
        512,
        1000,
        500,
    )
    assert 0.2 < prepared.mean < 0.4 and 0.25 < prepared.std < 0.45
    assert PreparedData.from_dict(json.loads(json.dumps(dataclasses.asdict(prepared)))) == prepared
