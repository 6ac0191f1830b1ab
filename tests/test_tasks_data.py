"""The data step: sources, limits, content hashes, leaks of test images, errors that name the file."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_models.data import DataError
from tasks.config import load_config
from tasks.data import PreparedData, ingest_and_prepare, ingest_sources
from tasks.shards import read_manifest
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
            "data.dvc.enabled=false",
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


def test_folder_source_is_described_by_content_hashes(folders: Path) -> None:
    cfg = folder_config(folders)
    prepared = ingest_and_prepare(cfg)
    assert prepared.unlabeled.num_images == 6 and prepared.labeled.classes == ("boot", "shirt")
    assert prepared.test.classes == ("boot", "shirt") and prepared.labeled.digest != prepared.test.digest
    # An unchanged source is not read again, and describes the same datasets.
    assert ingest_sources(cfg) == {"unlabeled": None, "labeled": None, "test": None}
    assert ingest_and_prepare(cfg) == prepared
    # A changed image is a new image: a new version of that dataset only, the old images kept.
    save_png(folders / "unlabeled" / "u0.png", 11)
    changed = ingest_and_prepare(cfg)
    assert changed.unlabeled.digest != prepared.unlabeled.digest and changed.unlabeled.num_images == 7
    assert changed.labeled.digest == prepared.labeled.digest
    # The same images ingested elsewhere, in another order, have the same hashes.
    other = folders / "elsewhere"
    shutil.copytree(folders / "labeled", other / "labeled")
    again = ingest_and_prepare(
        folder_config(folders, f"workspace={other / 'ws'}", f"data.labeled_dir={other / 'labeled'}")
    )
    assert again.labeled.digest == prepared.labeled.digest


def test_corrupt_image_stops_the_step_naming_it_or_is_quarantined(folders: Path) -> None:
    bad = folders / "unlabeled" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=r"broken\.png: cannot decode image"):
        ingest_and_prepare(folder_config(folders))
    cfg = folder_config(folders, "data.skip_corrupt=true")
    reports = ingest_sources(cfg)
    assert reports["unlabeled"].added == 6
    assert [Path(f).name for f, _ in reports["unlabeled"].quarantined] == ["broken.png"]
    assert (cfg.workspace_path / "quarantine" / "unlabeled").is_dir()


def test_test_classes_must_be_labeled_classes(folders: Path) -> None:
    save_png(folders / "test" / "hat" / "0.png", 200)
    with pytest.raises(
        DataError, match=r"test class 'hat' is not one of the labeled classes \['boot', 'shirt'\]"
    ):
        ingest_and_prepare(folder_config(folders))


def test_a_test_image_in_the_unlabeled_source_fails_the_step_naming_it_and_is_not_stored(
    folders: Path,
) -> None:
    planted = folders / "unlabeled" / "planted.png"
    shutil.copy(folders / "test" / "shirt" / "1.png", planted)
    cfg = folder_config(folders)
    with pytest.raises(DataError) as failure:
        ingest_and_prepare(cfg)
    message = str(failure.value)
    assert f"{planted}: the same image is in the test set ({folders / 'test' / 'shirt' / '1.png'})" in message
    assert "data.allow_test_overlap" in message
    assert not (cfg.workspace_path / "data" / "unlabeled").exists()  # refused before anything was stored
    prepared = ingest_and_prepare(folder_config(folders, "data.allow_test_overlap=true"))
    assert prepared.unlabeled.num_images == 7
    # Stored now, a leak still fails every run that does not allow it, naming both files.
    planted.unlink()
    with pytest.raises(
        DataError, match=r"1 test images are also in the unlabeled set, e\.g\. .*1\.png is .*planted\.png"
    ):
        ingest_and_prepare(cfg)


def test_fashion_mnist_limits_and_round_trip(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    cfg = load_config(REPO / "params.yaml", "smoke", [f"workspace={tmp_path}", "data.dvc.enabled=false"])
    prepared = ingest_and_prepare(cfg)
    assert (prepared.unlabeled.num_images, prepared.labeled.num_images, prepared.test.num_images) == (
        512,
        1000,
        500,
    )
    assert 0.2 < prepared.mean < 0.4 and 0.25 < prepared.std < 0.45
    assert PreparedData.from_dict(json.loads(json.dumps(dataclasses.asdict(prepared)))) == prepared
    # Each Fashion-MNIST image stored once per dataset, as a PNG of its pixels, in one shard.
    assert prepared.unlabeled.shards == ("shards/00001-0000.parquet",)
    sources = read_manifest(Path(prepared.labeled.path), ["source"]).column("source").to_pylist()
    assert sources[0].endswith("train-images-idx3-ubyte.gz[0]")


def test_a_folder_of_one_png_per_image_is_converted_to_shards_once(folders: Path) -> None:
    cfg = folder_config(folders)
    prepared = ingest_and_prepare(cfg)
    legacy = folders / "legacy"  # the layout before shards: <id>.png, <class>/<id>.png
    for name in ("unlabeled", "labeled"):
        shutil.copytree(folders / name, legacy / name)
        for i, png in enumerate(sorted((legacy / name).rglob("*.png"))):
            png.rename(png.with_name(f"{i:032x}.png"))
    converted = folder_config(folders, f"workspace={legacy}")
    shutil.copytree(legacy / "unlabeled", converted.workspace_path / "data" / "unlabeled")
    shutil.copytree(legacy / "labeled", converted.workspace_path / "data" / "labeled")
    result = ingest_and_prepare(converted)
    assert result.digests() == prepared.digests()  # the same images: the PNGs' bytes, unchanged
    assert not list((converted.workspace_path / "data" / "unlabeled").glob("*.png"))
    assert not list((converted.workspace_path / "data").glob(".*"))  # nothing left aside


def test_a_conversion_that_fails_puts_the_pngs_back(tmp_path: Path) -> None:
    from tasks.data import convert_legacy_folder
    from tasks.ingest import ImageRules, IngestLimits

    folder = tmp_path / "data" / "unlabeled"
    for i in range(3):
        save_png(folder / f"{i:032x}.png", 10 * i)
    (folder / f"{9:032x}.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(DataError, match=rf"{9:032x}\.png: cannot decode image"):
        convert_legacy_folder(folder, "unlabeled", ImageRules(1), IngestLimits())
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["unlabeled"]
